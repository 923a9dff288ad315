"""Sliding-window (tiled) inference with blended overlaps.

The image is cut into ``tile x tile`` windows that overlap by ``overlap`` (a fraction of the
tile), the last window on each axis is shifted back to end exactly at the border, and windows
are run through ``predict_fn`` in batches on the *compute* device.  Results are stitched on the
CPU, weighted by a Gaussian (centre-heavy, hides seams) or constant window, and divided by the
summed weights.

Stitching accumulates in float64, so a predictor that returns float32 values reproduces them
bit-exactly: ``sum(w_i * v) / sum(w_i)`` differs from ``v`` by far less than a float32 step.
Inputs smaller than a tile are padded (reflect where possible) and the output cropped back.
:func:`sliding_window_many` streams the tiles of several images through the same batches.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

BlendKind = Literal["gaussian", "constant"]
PredictFn = Callable[[torch.Tensor], torch.Tensor]
_Window = tuple[int, int, int]  # (image index, y, x)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Window start offsets along one axis; the last window ends at ``length`` when possible."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_weights(
    tile: int,
    blend: BlendKind = "gaussian",
    sigma_scale: float = 0.125,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``tile x tile`` positive weights, 1 at the centre (gaussian) or everywhere (constant)."""
    if blend == "constant":
        return torch.ones(tile, tile, dtype=dtype)
    if blend != "gaussian":
        raise ValueError(f"blend_weights: blend must be 'gaussian' or 'constant', got {blend!r}")
    centre, sigma = (tile - 1) / 2.0, max(sigma_scale * tile, 1e-3)
    axis = torch.exp(-0.5 * ((torch.arange(tile, dtype=dtype) - centre) / sigma) ** 2)
    weights = torch.outer(axis, axis)
    # Keep corners strictly positive so that border pixels never divide by zero.
    return (weights / weights.max()).clamp_min(1e-12)


def sliding_window(
    predict_fn: PredictFn,
    image: torch.Tensor,
    tile: int,
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
        predict_fn: maps a batch ``B, C, tile, tile`` on ``device`` to ``B, num_out, tile, tile``
            (e.g. a model returning logits, or a function returning probabilities).
        image: ``C, H, W`` or ``1, C, H, W``, any ``H, W`` (smaller than ``tile`` too).
        tile: window side in pixels.
        overlap: fraction of ``tile`` shared by neighbouring windows, ``0 <= overlap < 1``.
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
    tile: int,
    overlap: float,
    num_out: int,
    batch_size: int = 4,
    blend: BlendKind = "gaussian",
    *,
    device: torch.device | str | None = None,
    accum_dtype: torch.dtype = torch.float64,
) -> list[torch.Tensor]:
    """:func:`sliding_window` over several images (any mix of sizes) in one stream of tiles.

    The windows of all images are cut in order and sent to ``predict_fn`` ``batch_size`` at a
    time, so a call can hold tiles of several images: eight small images that each fit in one
    tile take one forward of batch 8, not eight forwards of batch 1.  Each image is stitched
    into its own accumulator exactly as :func:`sliding_window` does, so the per-image arithmetic
    is the same; only the batch composition seen by ``predict_fn`` changes.  Memory: one
    accumulator per image plus ``batch_size`` tiles.

    Returns:
        one float32 ``num_out, H, W`` CPU tensor per image, in order.
    """
    prepared = [_validated_image(image, tile, overlap, num_out, batch_size) for image in images]
    if not prepared:
        return []
    first = prepared[0]
    device = first.device if device is None else torch.device(device)
    stride = max(1, int(tile * (1.0 - overlap)))
    weights = blend_weights(tile, blend, dtype=accum_dtype)
    padded, totals, weight_sums, windows = [], [], [], []
    for index, image in enumerate(prepared):
        _, height, width = image.shape
        padded.append(_pad_bottom_right(image, max(height, tile), max(width, tile)))
        _, pad_h, pad_w = padded[-1].shape
        totals.append(torch.zeros(num_out, pad_h, pad_w, dtype=accum_dtype))
        weight_sums.append(torch.zeros(pad_h, pad_w, dtype=accum_dtype))
        windows += [(index, y, x) for y in tile_starts(pad_h, tile, stride)
                    for x in tile_starts(pad_w, tile, stride)]
    with torch.inference_mode():
        for chunk in _chunks(windows, batch_size):
            batch = torch.stack([padded[i][:, y:y + tile, x:x + tile] for i, y, x in chunk])
            pred = predict_fn(batch.to(device))
            expected = (len(chunk), num_out, tile, tile)
            if tuple(pred.shape) != expected:
                raise ValueError(
                    f"sliding_window: predict_fn must return {expected}, got {tuple(pred.shape)}"
                )
            pred = pred.to("cpu", accum_dtype)  # stitching happens on the CPU
            for (i, y, x), tile_pred in zip(chunk, pred):
                totals[i][:, y:y + tile, x:x + tile] += tile_pred * weights
                weight_sums[i][y:y + tile, x:x + tile] += weights
    return [(total / weight_sum)[:, :image.shape[1], :image.shape[2]].to(torch.float32)
            for total, weight_sum, image in zip(totals, weight_sums, prepared)]


def _validated_image(
    image: torch.Tensor, tile: int, overlap: float, num_out: int, batch_size: int
) -> torch.Tensor:
    """Check arguments; return the image as ``C, H, W``."""
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(
            f"sliding_window: expected image C,H,W or 1,C,H,W, got {tuple(image.shape)}"
        )
    if tile < 1 or num_out < 1 or batch_size < 1:
        raise ValueError(
            f"sliding_window: tile, num_out and batch_size must be >= 1, got "
            f"{tile}, {num_out}, {batch_size}"
        )
    if not (0.0 <= overlap < 1.0) or math.isnan(overlap):
        raise ValueError(f"sliding_window: overlap must be in [0, 1), got {overlap}")
    return image


def _pad_bottom_right(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad ``C, H, W`` to ``C, height, width`` (reflect, or replicate when too small to reflect)."""
    pad_h, pad_w = height - image.shape[1], width - image.shape[2]
    if pad_h == 0 and pad_w == 0:
        return image
    mode = "reflect" if pad_h < image.shape[1] and pad_w < image.shape[2] else "replicate"
    batch = image[None] if image.is_floating_point() else image[None].float()  # N,C,H,W
    return F.pad(batch, (0, pad_w, 0, pad_h), mode=mode)[0].to(image.dtype)


def _chunks(items: list[_Window], size: int) -> Iterator[list[_Window]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
