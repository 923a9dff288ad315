"""Image array -> the network's input tensor: scale by dtype or ``bit_depth``, channels, resize,
normalise (:func:`prepare_image`), exactly as training feeds the network."""
from __future__ import annotations

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
        x[c] = torch.from_numpy(_to_unit_float(arr[..., c], pre.bit_depth))
    if pre.channels == 1 and colour == 3:
        x = (x * _LUMA).sum(dim=0, keepdim=True)
    elif pre.channels == 3 and colour == 1:
        x = x.expand(3, -1, -1)
    if pre.resize is not None and tuple(x.shape[-2:]) != tuple(pre.resize):
        shrinking = pre.resize[0] < x.shape[1] or pre.resize[1] < x.shape[2]  # as transforms.Resize
        x = F.interpolate(x[None], size=tuple(pre.resize), mode="bilinear", align_corners=False,
                          antialias=shrinking)[0]
    x = x.contiguous()  # an expanded grey plane becomes three
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def _pixels(image: np.ndarray) -> np.ndarray:
    """``image`` as an H x W x C array with C in 1..4 (a view), or InputError."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise InputError("bad_channels", f"expected an H x W x C image with C in 1..4, got "
                         f"shape {arr.shape}", hint="pass grey, grey+alpha, RGB or RGBA pixels")
    return arr


def _to_unit_float(plane: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
    """One H x W plane scaled to [0, 1] float32 by its dtype's range (uint16: by ``bit_depth``)."""
    if plane.dtype == np.uint8:
        unit = plane.astype(np.float32)
        unit /= np.float32(255.0)
        return unit
    if plane.dtype == np.uint16:
        unit = plane.astype(np.float32)
        unit /= np.float32(65535.0 if bit_depth is None else 2**bit_depth - 1)
        return unit if bit_depth is None else np.minimum(unit, np.float32(1.0), out=unit)
    if plane.dtype == np.bool_ or plane.dtype.kind == "f":
        return plane.astype(np.float32)
    raise InputError("unsupported_format", f"pixel type {plane.dtype} is not supported",
                     hint="pass uint8, uint16 or float images in [0, 1]")
