"""Image array -> the network's input tensor: scale by dtype or ``bit_depth``, channels, resize,
normalise (:func:`prepare_image`), exactly as training feeds the network.

The compact training cache's integers (:func:`seg_core.pixels.compact_pixels`)
become the same input on the training device through :func:`normalise_pixels`."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from seg_core.config import Preprocessing
from seg_core.errors import InputError
from seg_core.pixels import as_hwc, unit_scale


# ITU-R BT.601 luma, the same weights PIL uses for RGB -> L.
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def prepare_image(image: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """H x W x C (or H x W) uint8/uint16/bool/float array -> normalised float32 C x H' x W'.

    Steps: scale to [0, 1] by the dtype's range (uint16 by ``2**pre.bit_depth - 1`` when set,
    clipped; floats are taken as already in [0, 1]); drop alpha; grey <-> RGB to
    ``pre.channels``; bilinear resize (antialiased when shrinking, as ``transforms.Resize``) to
    ``pre.resize`` if set; ``(x - mean) / std``.  Colour planes are converted one at a time and
    normalised in place, so the peak is the result plus one float plane.
    """
    arr = as_hwc(image)
    colour = 1 if arr.shape[2] <= 2 else 3  # alpha (channel 2 of 2, 4 of 4) is dropped
    x = torch.empty(colour, *arr.shape[:2], dtype=torch.float32)  # C x H x W
    for c in range(colour):
        x[c] = to_unit_float(arr[..., c], pre.bit_depth)
    x = _to_channels(x, pre.channels)
    if pre.resize is not None and tuple(x.shape[-2:]) != tuple(pre.resize):
        shrinking = pre.resize[0] < x.shape[1] or pre.resize[1] < x.shape[2]  # as transforms.Resize
        x = F.interpolate(x[None], size=tuple(pre.resize), mode="bilinear", align_corners=False,
                          antialias=shrinking)[0]
    return _standardise(x.contiguous(), pre)   # contiguous: an expanded grey plane becomes three


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """[N x] C x H x W in [0, 1] -> ``channels`` planes: RGB -> grey by luma, grey -> RGB."""
    colour = x.shape[-3]
    if channels == 1 and colour == 3:
        return (x * _LUMA.to(x.device)).sum(dim=-3, keepdim=True)
    if channels == 3 and colour == 1:
        return x.expand(*x.shape[:-3], 3, -1, -1)
    return x


def _standardise(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place on [N x] C x H x W float32."""
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def normalise_pixels(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """[N x] C x H x W uint8/uint16 from :func:`compact_pixels` -> the float32 input
    :func:`prepare_image` makes of the same pixels, computed where ``x`` is (the training
    device): scale by the dtype's range (uint16 by ``bit_depth``, clipped), channels, standardise."""
    unit = _unit(x, pre.bit_depth)
    return _standardise(_to_channels(unit, pre.channels).contiguous(), pre)


def to_unit_float(plane: np.ndarray, bit_depth: int | None = None) -> torch.Tensor:
    """One H x W plane scaled to [0, 1] float32 by its dtype's range (uint16: by ``bit_depth``)."""
    if plane.dtype in (np.uint8, np.uint16):
        with warnings.catch_warnings():   # a read-only plane (Arrow, Ray's object store) is
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            source = torch.from_numpy(np.ascontiguousarray(plane))   # only read: no copy
        return _unit(source, bit_depth)
    if plane.dtype == np.bool_ or plane.dtype.kind == "f":
        return torch.from_numpy(plane.astype(np.float32))
    raise InputError("unsupported_format", f"pixel type {plane.dtype} is not supported",
                     hint="pass uint8, uint16 or float images in [0, 1]")


def _unit(x: torch.Tensor, bit_depth: int | None) -> torch.Tensor:
    """uint8 / uint16 pixels -> float32 in [0, 1]: / 255, / 65535 or / (2**bit_depth - 1)
    clipped.  One op for inference and the training cache, so both give the same bits."""
    if x.dtype not in (torch.uint8, torch.uint16):
        raise TypeError(f"expected uint8 or uint16 pixels, got {x.dtype}")
    unit = x.to(torch.float32).div_(unit_scale(np.uint8 if x.dtype == torch.uint8
                                               else np.uint16, bit_depth))
    if x.dtype == torch.uint16 and bit_depth is not None:
        unit.clamp_(max=1.0)
    return unit
