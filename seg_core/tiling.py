"""Sliding-window (tiled) inference with blended overlaps.

The image is cut into ``tile x tile`` windows that overlap by ``overlap`` (a fraction of the
tile), the last window on each axis is shifted back to end exactly at the border, and windows
are run through ``predict_fn`` in batches on the *compute* device.  Results are stitched on the
CPU, weighted by a Gaussian (centre-heavy, hides seams) or constant window, and divided by the
summed weights.

Stitching accumulates in float64, so a predictor that returns float32 values reproduces them
bit-exactly: ``sum(w_i * v) / sum(w_i)`` differs from ``v`` by far less than a float32 step.
Inputs smaller than a tile are padded (reflect where possible) and the output cropped back.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F

BlendKind = Literal["gaussian", "constant"]
PredictFn = Callable[[torch.Tensor], torch.Tensor]


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
    image = _validated_image(image, tile, overlap, num_out, batch_size)
    device = image.device if device is None else torch.device(device)
    _, height, width = image.shape
    padded = _pad_bottom_right(image, max(height, tile), max(width, tile))
    _, pad_h, pad_w = padded.shape
    stride = max(1, int(tile * (1.0 - overlap)))
    rows, cols = tile_starts(pad_h, tile, stride), tile_starts(pad_w, tile, stride)
    positions = [(y, x) for y in rows for x in cols]
    weights = blend_weights(tile, blend, dtype=accum_dtype)
    total = torch.zeros(num_out, pad_h, pad_w, dtype=accum_dtype)
    weight_sum = torch.zeros(pad_h, pad_w, dtype=accum_dtype)
    with torch.inference_mode():
        for chunk in _chunks(positions, batch_size):
            batch = torch.stack([padded[:, y:y + tile, x:x + tile] for y, x in chunk]).to(device)
            pred = predict_fn(batch)
            expected = (len(chunk), num_out, tile, tile)
            if tuple(pred.shape) != expected:
                raise ValueError(
                    f"sliding_window: predict_fn must return {expected}, got {tuple(pred.shape)}"
                )
            pred = pred.to("cpu", accum_dtype)  # stitching happens on the CPU
            for (y, x), tile_pred in zip(chunk, pred):
                total[:, y:y + tile, x:x + tile] += tile_pred * weights
                weight_sum[y:y + tile, x:x + tile] += weights
    return (total / weight_sum)[:, :height, :width].to(torch.float32)


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


def _chunks(items: list[tuple[int, int]], size: int) -> Iterator[list[tuple[int, int]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
