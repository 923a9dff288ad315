"""Sliding-window (tiled) inference with blended overlaps.

The image is cut into ``tile_h x tile_w`` windows that overlap by ``overlap`` (a fraction of the
window side), the last window on each axis is shifted back to end exactly at the border, and
windows are run through ``predict_fn`` in batches on the *compute* device.  Results are stitched
on the CPU, weighted by a Gaussian (centre-heavy, hides seams) or constant window, and divided by
the summed weights.

A window never extends past the image: on an axis where the image is shorter than the tile, the
window shrinks to the image.  Nothing is padded here, so the network sees exactly the pixels it is
given and an image no larger than the tile takes one forward on itself (the U-Net pads to a
multiple of ``2**depth`` on its own, as it did in training).  Padding a small image up to a large
tile moves the image borders away from where the network learned to see them and changes its
answer (issue 11: 76% pixel agreement on a 176x240 model run in 256x256 tiles).

Stitching accumulates in float64, so a predictor that returns float32 values reproduces them
bit-exactly: ``sum(w_i * v) / sum(w_i)`` differs from ``v`` by far less than a float32 step.
:func:`sliding_window_many` streams the windows of several images through shared batches; windows
of one shape are batched together.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch

BlendKind = Literal["gaussian", "constant"]
PredictFn = Callable[[torch.Tensor], torch.Tensor]
TileSize = int | tuple[int, int]
_Window = tuple[int, int, int]  # (image index, y, x)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Window start offsets along one axis; the last window ends at ``length`` when possible."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def tile_shape(tile: TileSize) -> tuple[int, int]:
    """``tile`` as ``(height, width)``: an int is a square."""
    height, width = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if min(height, width) < 1:
        raise ValueError(f"sliding_window: tile sides must be >= 1, got {tile}")
    return int(height), int(width)


def blend_weights(
    tile: TileSize,
    blend: BlendKind = "gaussian",
    sigma_scale: float = 0.125,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``tile_h x tile_w`` positive weights, 1 at the centre (gaussian) or everywhere (constant).

    The Gaussian is separable, with sigma ``sigma_scale`` times the side on each axis.
    """
    height, width = tile_shape(tile)
    if blend == "constant":
        return torch.ones(height, width, dtype=dtype)
    if blend != "gaussian":
        raise ValueError(f"blend_weights: blend must be 'gaussian' or 'constant', got {blend!r}")

    def axis(side: int) -> torch.Tensor:
        centre, sigma = (side - 1) / 2.0, max(sigma_scale * side, 1e-3)
        return torch.exp(-0.5 * ((torch.arange(side, dtype=dtype) - centre) / sigma) ** 2)

    weights = torch.outer(axis(height), axis(width))
    # Keep corners strictly positive so that border pixels never divide by zero.
    return (weights / weights.max()).clamp_min(1e-12)


def sliding_window(
    predict_fn: PredictFn,
    image: torch.Tensor,
    tile: TileSize,
    overlap: float,
    num_out: int,
    batch_size: int = 4,
    blend: BlendKind = "gaussian",
    *,
    device: torch.device | str | None = None,
    accum_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Run ``predict_fn`` over overlapping tiles of ``image`` and blend the results.

    Args:
        predict_fn: maps a batch ``B, C, h, w`` on ``device`` to ``B, num_out, h, w``, where
            ``h x w`` is the tile clipped to the image (e.g. a model returning logits, or a
            function returning probabilities).
        image: ``C, H, W`` or ``1, C, H, W``, any ``H, W``.
        tile: window side in pixels, or ``(height, width)``; clipped to the image per axis.
        overlap: fraction of the window side shared by neighbouring windows, ``0 <= overlap < 1``.
        num_out: channels ``predict_fn`` returns.
        batch_size: windows per ``predict_fn`` call.
        blend: window weights, ``"gaussian"`` or ``"constant"``.
        device: compute device for ``predict_fn``; defaults to ``image.device``.
        accum_dtype: CPU accumulation dtype (float64 keeps the result exact; float32 halves
            memory for very large images).

    Returns:
        float32 ``num_out, H, W`` on the CPU.
    """
    return sliding_window_many(predict_fn, [image], tile, overlap, num_out, batch_size, blend,
                               device=device, accum_dtype=accum_dtype)[0]


def sliding_window_many(
    predict_fn: PredictFn,
    images: Sequence[torch.Tensor],
    tile: TileSize,
    overlap: float,
    num_out: int,
    batch_size: int = 4,
    blend: BlendKind = "gaussian",
    *,
    device: torch.device | str | None = None,
    accum_dtype: torch.dtype = torch.float64,
) -> list[torch.Tensor]:
    """:func:`sliding_window` over several images (any mix of sizes) in one stream of tiles.

    Windows of the same shape are sent to ``predict_fn`` ``batch_size`` at a time, so a call can
    hold windows of several images: eight images of one size that each fit in a tile take one
    forward of batch 8, not eight forwards of batch 1.  Images of different sizes below the tile
    get windows of different shapes, and those never share a forward (padding them to one shape
    would change what the network sees).  Each image is stitched into its own accumulator exactly
    as :func:`sliding_window` does, so only the batch composition seen by ``predict_fn``
    changes.  Memory: one accumulator per image plus ``batch_size`` windows.

    Returns:
        one float32 ``num_out, H, W`` CPU tensor per image, in order.
    """
    prepared = [_validated_image(image, overlap, num_out, batch_size) for image in images]
    if not prepared:
        return []
    tile_h, tile_w = tile_shape(tile)
    device = prepared[0].device if device is None else torch.device(device)
    totals, weight_sums = [], []
    by_shape: dict[tuple[int, int], list[_Window]] = {}  # insertion order = first appearance
    for index, image in enumerate(prepared):
        _, height, width = image.shape
        window = (min(tile_h, height), min(tile_w, width))
        totals.append(torch.zeros(num_out, height, width, dtype=accum_dtype))
        weight_sums.append(torch.zeros(height, width, dtype=accum_dtype))
        rows = tile_starts(height, window[0], max(1, int(window[0] * (1.0 - overlap))))
        cols = tile_starts(width, window[1], max(1, int(window[1] * (1.0 - overlap))))
        by_shape.setdefault(window, []).extend((index, y, x) for y in rows for x in cols)
    with torch.inference_mode():
        for (height, width), windows in by_shape.items():
            weights = blend_weights((height, width), blend, dtype=accum_dtype)
            for chunk in _chunks(windows, batch_size):
                batch = torch.stack([prepared[i][:, y:y + height, x:x + width]
                                     for i, y, x in chunk])
                pred = predict_fn(batch.to(device))
                expected = (len(chunk), num_out, height, width)
                if tuple(pred.shape) != expected:
                    raise ValueError(f"sliding_window: predict_fn must return {expected}, got "
                                     f"{tuple(pred.shape)}")
                pred = pred.to("cpu", accum_dtype)  # stitching happens on the CPU
                for (i, y, x), window_pred in zip(chunk, pred):
                    totals[i][:, y:y + height, x:x + width] += window_pred * weights
                    weight_sums[i][y:y + height, x:x + width] += weights
    return [(total / weight_sum).to(torch.float32)
            for total, weight_sum in zip(totals, weight_sums)]


def _validated_image(
    image: torch.Tensor, overlap: float, num_out: int, batch_size: int
) -> torch.Tensor:
    """Check arguments; return the image as ``C, H, W``."""
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or min(image.shape[-2:]) < 1:
        raise ValueError(
            f"sliding_window: expected image C,H,W or 1,C,H,W, got {tuple(image.shape)}"
        )
    if num_out < 1 or batch_size < 1:
        raise ValueError(
            f"sliding_window: num_out and batch_size must be >= 1, got {num_out}, {batch_size}"
        )
    if not (0.0 <= overlap < 1.0) or math.isnan(overlap):
        raise ValueError(f"sliding_window: overlap must be in [0, 1), got {overlap}")
    return image


def _chunks(items: list[_Window], size: int) -> Iterator[list[_Window]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
