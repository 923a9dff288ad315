"""Sliding-window (tiled) inference with blended overlaps.

The image is cut into ``tile_h x tile_w`` windows that overlap by ``overlap`` (a fraction of the
window side), the last window on each axis is shifted back to end exactly at the border, and
windows are run through ``predict_fn`` in batches on the *compute* device.  Results are stitched
on the *stitch* device (the CPU unless told otherwise; a GPU caller stitches where the windows
already are, so only the finished output crosses to the host), weighted by a Gaussian
(centre-heavy, hides seams) or constant window, and divided by the summed weights.

A window never extends past the image: on an axis where the image is shorter than the tile, the
window shrinks to the image.  Nothing is padded here, so the network sees exactly the pixels it is
given and an image no larger than the tile takes one forward on itself (the U-Net pads to a
multiple of ``2**depth`` on its own, as it did in training).  Padding a small image up to a large
tile moves the image borders away from where the network learned to see them and changes its
answer (issue 11: 76% pixel agreement on a 176x240 model run in 256x256 tiles).

Stitching streams: windows arrive row by row (or column by column, whichever leaves the smaller
band), and only a band one window deep is accumulated before it is divided into the float32
output, so an image costs its output plus one band, never a full-size accumulator.  The band
accumulates in float64 by default, so a predictor that returns float32 values is reproduced
bit-exactly: ``sum(w_i * v) / sum(w_i)`` differs from ``v`` by far less than a float32 step
(``accum_dtype=torch.float32`` halves the band and is within a few float32 steps).  :func:`sliding_window_many` streams the windows of
several images through shared batches; windows of one shape are batched together.
:func:`forward_pixels` counts what the network processes, padding included.
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
    stitch_device: torch.device | str = "cpu",
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
        accum_dtype: accumulation dtype of the stitch band.  float64 (the default)
            reproduces a float32 predictor bit-exactly; float32 halves the band's memory and
            is within a few float32 steps.
        stitch_device: where the band and the output live (the CPU by default).

    Returns:
        float32 ``num_out, H, W`` on ``stitch_device``.
    """
    return sliding_window_many(predict_fn, [image], tile, overlap, num_out, batch_size, blend,
                               device=device, accum_dtype=accum_dtype,
                               stitch_device=stitch_device)[0]


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
    stitch_device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """:func:`sliding_window` over several images (any mix of sizes) in one stream of tiles.

    Windows of the same shape are sent to ``predict_fn`` ``batch_size`` at a time, so a call can
    hold windows of several images: eight images of one size that each fit in a tile take one
    forward of batch 8, not eight forwards of batch 1.  Images of different sizes below the tile
    get windows of different shapes, and those never share a forward (padding them to one shape
    would change what the network sees).  Each image is stitched into its own output exactly
    as :func:`sliding_window` does, so only the batch composition seen by ``predict_fn``
    changes.  Memory: each image's float32 output, a band one window deep for an image being
    stitched (see :class:`_Stitch`), and ``batch_size`` windows.

    Returns:
        one float32 ``num_out, H, W`` tensor per image on ``stitch_device``, in order.
    """
    prepared = [_validated_image(image, overlap, num_out, batch_size) for image in images]
    if not prepared:
        return []
    tile_h, tile_w = tile_shape(tile)
    device = prepared[0].device if device is None else torch.device(device)
    stitch_device = torch.device(stitch_device)
    stitches: list[_Stitch] = []
    by_shape: dict[tuple[int, int], list[_Window]] = {}  # insertion order = first appearance
    for index, image in enumerate(prepared):
        _, height, width = image.shape
        window = (min(tile_h, height), min(tile_w, width))
        rows = tile_starts(height, window[0], window_stride(window[0], overlap))
        cols = tile_starts(width, window[1], window_stride(window[1], overlap))
        along_x = window[1] * height < window[0] * width  # the smaller band (see _Stitch)
        stitches.append(_Stitch(num_out, height, width, window, len(rows) * len(cols),
                                accum_dtype, along_x, stitch_device))
        order = ((x, y) for x in cols for y in rows) if along_x else \
            ((x, y) for y in rows for x in cols)
        by_shape.setdefault(window, []).extend((index, y, x) for x, y in order)
    with torch.inference_mode():
        for (height, width), windows in by_shape.items():
            weights = blend_weights((height, width), blend, dtype=accum_dtype).to(stitch_device)
            for chunk in _chunks(windows, batch_size):
                batch = torch.stack([prepared[i][:, y:y + height, x:x + width]
                                     for i, y, x in chunk])
                pred = predict_fn(batch.to(device))
                expected = (len(chunk), num_out, height, width)
                if tuple(pred.shape) != expected:
                    raise ValueError(f"sliding_window: predict_fn must return {expected}, got "
                                     f"{tuple(pred.shape)}")
                pred = pred.to(stitch_device, accum_dtype)
                for (i, y, x), window_pred in zip(chunk, pred):
                    stitches[i].add(window_pred, weights, y, x)
    return [stitch.out for stitch in stitches]


def window_stride(window: int, overlap: float) -> int:
    """Step between window starts along an axis: the window side less the overlap, >= 1."""
    return max(1, int(window * (1.0 - overlap)))


def window_grid(height: int, width: int, tile: TileSize,
                overlap: float) -> tuple[int, int, int, int]:
    """``(rows, cols, window_h, window_w)``: the windows :func:`sliding_window` cuts from a
    ``height x width`` image, counted rather than enumerated, so any size is cheap to ask about."""
    tile_h, tile_w = tile_shape(tile)
    window_h, window_w = min(tile_h, height), min(tile_w, width)

    def starts(length: int, window: int) -> int:  # len(tile_starts(...)), without the list
        if length <= window:
            return 1
        steps, rest = divmod(length - window, window_stride(window, overlap))
        return steps + 1 + (rest > 0)

    return starts(height, window_h), starts(width, window_w), window_h, window_w


def forward_pixels(height: int, width: int, tile: TileSize, overlap: float,
                   size_multiple: int = 1) -> int:
    """Pixels the network processes for one ``height x width`` image: windows x window area.

    Each window side is rounded up to ``size_multiple``, as a network that pads its input to
    a multiple of ``2**depth`` does: a 1 x N image costs 16 rows per window at depth 4.
    """
    rows, cols, window_h, window_w = window_grid(height, width, tile, overlap)
    return rows * cols * padded_side(window_h, size_multiple) * padded_side(window_w, size_multiple)


def padded_side(side: int, size_multiple: int) -> int:
    """``side`` rounded up to a multiple of ``size_multiple``."""
    return -(-side // size_multiple) * size_multiple


class _Stitch:
    """One image's float32 output, stitched band by band.

    Windows arrive one row of windows after another (or one column after another: the stitch
    streams along whichever axis leaves the smaller band, so a 1 x N strip holds one window,
    not the strip).  The weighted sums and summed weights live in a band one window deep, in
    ``accum_dtype``; once the windows move on to row ``y``, the rows before ``y`` can get no
    more contributions, so they are divided into the output and the band moves on.  The band,
    allocated at the first window and freed after the last, is all the stitch holds beyond the
    output.  An image of one window is that window's prediction (the weights cancel exactly).
    """

    def __init__(self, num_out: int, height: int, width: int, window: tuple[int, int],
                 windows: int, accum_dtype: torch.dtype, along_x: bool,
                 device: torch.device) -> None:
        self.out = torch.empty(num_out, height, width, dtype=torch.float32, device=device)
        # The streamed axis is dim 1 of this view: rows, or columns of the transposed output.
        self._view = self.out.transpose(1, 2) if along_x else self.out
        self.depth = window[1] if along_x else window[0]  # band depth along the streamed axis
        self.along_x, self.windows, self.remaining = along_x, windows, windows
        self.accum_dtype, self.top = accum_dtype, 0  # streamed index of band position 0
        self.total = self.weight = torch.empty(0)

    def add(self, pred: torch.Tensor, weights: torch.Tensor, y: int, x: int) -> None:
        """Add one window's ``num_out x h x w`` prediction at ``(y, x)``, weighted."""
        if self.windows == 1:
            self.out.copy_(pred)
            return
        if self.along_x:  # the same band logic, on transposed windows
            pred, weights, y, x = pred.transpose(1, 2), weights.T, x, y
        if self.remaining == self.windows:
            num_out, _, across = self._view.shape
            self.total = torch.zeros(num_out, self.depth, across, dtype=self.accum_dtype,
                                     device=self.out.device)
            self.weight = torch.zeros(self.depth, across, dtype=self.accum_dtype,
                                      device=self.out.device)
        if y > self.top:
            self._emit(y)
        depth, width = weights.shape
        self.total[:, :depth, x:x + width] += pred * weights
        self.weight[:depth, x:x + width] += weights
        self.remaining -= 1
        if self.remaining == 0:
            self._emit(self._view.shape[1])
            self.total = self.weight = torch.empty(0)

    def _emit(self, until: int) -> None:
        """Positions ``top .. until - 1`` are final: divide them into the output, move the band."""
        done = until - self.top
        self._view[:, self.top:until] = self.total[:, :done] / self.weight[:done]
        keep = self.depth - done
        if keep > 0:
            self.total[:, :keep] = self.total[:, done:].clone()
            self.weight[:keep] = self.weight[done:].clone()
        self.total[:, keep:] = 0
        self.weight[keep:] = 0
        self.top = until


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
