"""Decoded pixel arrays before torch sees them: the layout check, the compact training cache's
integers and nearest-neighbour mask resizing, in NumPy alone.

Ray Data's decode tasks import only this (and :mod:`seg_core.codecs`), not torch: a torch import
costs about 1.4 s of CPU per process, and a 2-core node starts up to eight decode workers when a
training run caches its data (issue 30 measured 5 s of a run's start-up in those imports).
:func:`compact_pixels` still converts a 16-bit or float image into another type through
:mod:`seg_core.inference.preprocessing`, so its values stay bit for bit ``prepare_image``'s.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from seg_core.config import Preprocessing
from seg_core.errors import InputError


def as_hwc(image: np.ndarray) -> np.ndarray:
    """``image`` as an H x W x C array with C in 1..4 (a view), or InputError."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise InputError("bad_channels", f"expected an H x W x C image with C in 1..4, got "
                         f"shape {arr.shape}", hint="pass grey, grey+alpha, RGB or RGBA pixels")
    return arr


def unit_scale(dtype: np.dtype | type, bit_depth: int | None) -> float:
    """The integer that means 1.0: 255 for uint8; 65535, or 2**bit_depth - 1, for uint16."""
    if np.dtype(dtype) == np.uint8:
        return 255.0
    return 65535.0 if bit_depth is None else float(2**bit_depth - 1)


# ------------------------------------------------------------------ the compact training cache
#
# Training caches decoded images as the integers they were decoded as (uint8, or uint16 for
# high bit depth: 1-2 bytes per channel instead of prepare_image's 4) and the training worker
# turns each batch into the network's input on its device with
# :func:`seg_core.inference.normalise_pixels`.  Both steps are per-pixel, so cropping and
# flipping the integers first gives exactly the values prepare_image would have given
# (tests/seg_core/test_inference.py checks bit for bit).  A resize is not per-pixel: an image
# that training resizes is cached as prepare_image's float32.


def compact_pixels(image: np.ndarray, pre: Preprocessing,
                   dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """``image`` as C x H x W integers of ``dtype`` (alpha dropped, channels as decoded) for
    ``normalise_pixels``: the decoded integers themselves when they are of ``dtype``, else
    the pixel's [0, 1] value on ``dtype``'s scale, rounded (a 16-bit image in an 8-bit set, or a
    float one).  Only for training without a resize: a resize is not per-pixel."""
    if pre.resize is not None and tuple(np.shape(image)[:2]) != tuple(pre.resize):
        raise ValueError(f"compact_pixels: the image is {np.shape(image)[:2]} and training "
                         f"resizes to {pre.resize}; cache prepare_image's float32 instead")
    arr = as_hwc(image)
    colour = 1 if arr.shape[2] <= 2 else 3
    dtype = np.dtype(dtype)
    if arr.dtype == dtype:
        return np.ascontiguousarray(np.moveaxis(arr[..., :colour], -1, 0))
    from seg_core.inference.preprocessing import to_unit_float   # torch: prepare_image's scaling

    scale = unit_scale(dtype, pre.bit_depth)
    return np.stack([np.rint(to_unit_float(arr[..., c], pre.bit_depth).numpy() * scale)
                     .astype(dtype) for c in range(colour)])


# ------------------------------------------------------------------------------ mask resizing


def resize_mask_nearest(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of H x W or K x H x W to ``size`` = (H, W), at pixel centres
    (as ``nearest-exact``)."""
    height, width = int(size[0]), int(size[1])
    if mask is None or mask.shape[-2:] == (height, width):
        return mask
    rows = _nearest_index(mask.shape[-2], height)
    cols = _nearest_index(mask.shape[-1], width)
    return np.ascontiguousarray(np.take(np.take(mask, rows, axis=-2), cols, axis=-1))


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel centre."""
    centres = (np.arange(size_out) + 0.5) * (size_in / size_out)
    return np.minimum(centres.astype(np.int64), size_in - 1)
