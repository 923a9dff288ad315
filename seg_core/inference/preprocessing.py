"""Image array -> the network's input tensor: scale by dtype or ``bit_depth``, channels, resize,
normalise (:func:`prepare_image`), exactly as training feeds the network."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from seg_core.config import Preprocessing
from seg_core.errors import InputError


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
    arr = _pixels(image)
    colour = 1 if arr.shape[2] <= 2 else 3  # alpha (channel 2 of 2, 4 of 4) is dropped
    x = torch.empty(colour, *arr.shape[:2], dtype=torch.float32)  # C x H x W
    for c in range(colour):
        x[c] = _to_unit_float(arr[..., c], pre.bit_depth)
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


# ------------------------------------------------------------------ the compact training cache
#
# Training caches decoded images as the integers they were decoded as (uint8, or uint16 for
# high bit depth: 1-2 bytes per channel instead of prepare_image's 4) and the training worker
# turns each batch into the network's input on its device with :func:`normalise_pixels`.  Both
# steps are per-pixel, so cropping and flipping the integers first gives exactly the values
# prepare_image would have given (tests/seg_core/test_inference.py checks bit for bit).  A resize
# is not per-pixel: an image that training resizes is cached as prepare_image's float32.


def compact_pixels(image: np.ndarray, pre: Preprocessing,
                   dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """``image`` as C x H x W integers of ``dtype`` (alpha dropped, channels as decoded) for
    :func:`normalise_pixels`: the decoded integers themselves when they are of ``dtype``, else
    the pixel's [0, 1] value on ``dtype``'s scale, rounded (a 16-bit image in an 8-bit set, or a
    float one).  Only for training without a resize: a resize is not per-pixel."""
    if pre.resize is not None and tuple(np.shape(image)[:2]) != tuple(pre.resize):
        raise ValueError(f"compact_pixels: the image is {np.shape(image)[:2]} and training "
                         f"resizes to {pre.resize}; cache prepare_image's float32 instead")
    arr = _pixels(image)
    colour = 1 if arr.shape[2] <= 2 else 3
    dtype = np.dtype(dtype)
    if arr.dtype == dtype:
        return np.ascontiguousarray(np.moveaxis(arr[..., :colour], -1, 0))
    scale = _scale(dtype, pre.bit_depth)
    return np.stack([np.rint(_to_unit_float(arr[..., c], pre.bit_depth).numpy() * scale)
                     .astype(dtype) for c in range(colour)])


def normalise_pixels(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """[N x] C x H x W uint8/uint16 from :func:`compact_pixels` -> the float32 input
    :func:`prepare_image` makes of the same pixels, computed where ``x`` is (the training
    device): scale by the dtype's range (uint16 by ``bit_depth``, clipped), channels, standardise."""
    unit = _unit(x, pre.bit_depth)
    return _standardise(_to_channels(unit, pre.channels).contiguous(), pre)


def _pixels(image: np.ndarray) -> np.ndarray:
    """``image`` as an H x W x C array with C in 1..4 (a view), or InputError."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise InputError("bad_channels", f"expected an H x W x C image with C in 1..4, got "
                         f"shape {arr.shape}", hint="pass grey, grey+alpha, RGB or RGBA pixels")
    return arr


def _to_unit_float(plane: np.ndarray, bit_depth: int | None = None) -> torch.Tensor:
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
    unit = x.to(torch.float32).div_(_scale(np.uint8 if x.dtype == torch.uint8 else np.uint16,
                                           bit_depth))
    if x.dtype == torch.uint16 and bit_depth is not None:
        unit.clamp_(max=1.0)
    return unit


def _scale(dtype: np.dtype | type, bit_depth: int | None) -> float:
    """The integer that means 1.0: 255 for uint8; 65535, or 2**bit_depth - 1, for uint16."""
    if np.dtype(dtype) == np.uint8:
        return 255.0
    return 65535.0 if bit_depth is None else float(2**bit_depth - 1)
