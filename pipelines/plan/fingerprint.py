"""A dataset fingerprint, nnU-Net's idea: the facts a training plan is derived from.

It is gathered in the one Ray Data pass of ``rayseg validate`` (:mod:`pipelines.validate`): each
accepted pair gives :func:`pair_stats` (a few numbers, no pixels) and the driver sums them in
:class:`FingerprintTotals`.  ``fingerprint.json`` holds:

- ``sizes``: H x W quantiles (min, 10%, median, 90%, max), the distinct sizes, aspect ratios;
- ``channels`` and ``pixel_types`` (how many images have each);
- ``mean`` / ``std`` per channel, in [0, 1] units (uint8 / 255, uint16 / 65535), over the
  images with the most common channel count;
- ``class_share`` (share of labelled pixels; multi-label: of all pixels) and ``class_presence``
  (share of images where the class appears), ``empty_mask_rate``;
- ``position``: each class's share of the top and bottom thirds and of the left and right
  thirds, and whether a class depends on the vertical or horizontal position
  (:data:`POSITION_RATIO`).

Images over :data:`SAMPLE_PIXELS` are sampled on a regular grid for the intensity and position
figures, so a pass over huge images stays cheap; sizes and class pixels are exact.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from seg_core.config import MaskSpec

SAMPLE_PIXELS = 1_000_000  # intensity and position figures: at most this many pixels an image
CHANNEL_SLOTS = 4          # grey, grey+alpha, RGB, RGBA
POSITION_RATIO = 2.0       # a class whose share differs this much between thirds is positional
POSITION_MIN_SHARE = 0.01  # ... among classes with at least this share of the pixels
_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def class_pixels(mask: np.ndarray, spec: MaskSpec) -> np.ndarray:
    """Pixel count per class, plus ignored pixels as a last entry (K + 1 int64)."""
    k = spec.num_classes
    if spec.multilabel:  # K x H x W {0, 1}, ignore_index where an ignore mask marks pixels
        on = (mask == 1).reshape(k, -1).sum(axis=1, dtype=np.int64)
        return np.append(on, int((mask[0] == spec.ignore_index).sum()))
    counts = np.bincount(np.where(mask == spec.ignore_index, k, mask).ravel(), minlength=k + 1)
    return counts.astype(np.int64)


def pair_stats(image: np.ndarray, mask: np.ndarray, spec: MaskSpec) -> dict[str, Any]:
    """One accepted pair -> channels, pixel type, per-channel sum and sum of squares (in [0, 1]
    units, over the sampled pixels) and, for the four border thirds (top, bottom, left, right),
    their class pixels, ignored pixels and all pixels (4 x (K + 2))."""
    planes = image if image.ndim == 3 else image[..., None]
    height, width = planes.shape[:2]
    stride = max(1, math.ceil(math.sqrt(height * width / SAMPLE_PIXELS)))
    sample = planes[::stride, ::stride]
    scale = _SCALE.get(sample.dtype, 1.0)
    sums, squares = np.zeros(CHANNEL_SLOTS), np.zeros(CHANNEL_SLOTS)
    for c in range(min(sample.shape[2], CHANNEL_SLOTS)):
        plane = sample[..., c].astype(np.float64) / scale
        sums[c], squares[c] = plane.sum(), np.square(plane).sum()
    grid = mask[..., ::stride, ::stride]
    rows, cols = grid.shape[-2:]
    third_h, third_w = max(1, rows // 3), max(1, cols // 3)
    thirds = [grid[..., :third_h, :], grid[..., rows - third_h:, :],
              grid[..., :, :third_w], grid[..., :, cols - third_w:]]
    return {"channels": int(planes.shape[2]), "pixel_type": str(planes.dtype),
            "sampled": int(sample.shape[0] * sample.shape[1]),
            "channel_sum": sums, "channel_sumsq": squares,
            "thirds": np.stack([np.append(class_pixels(t, spec), t.shape[-2] * t.shape[-1])
                                for t in thirds])}


class FingerprintTotals:
    """Sums of :func:`pair_stats` over accepted pairs, on the driver (no pixels kept)."""

    def __init__(self, spec: MaskSpec) -> None:
        self.spec = spec
        k = spec.num_classes
        self.sizes: list[tuple[int, int]] = []
        self.channels: Counter[int] = Counter()
        self.pixel_types: Counter[str] = Counter()
        self.sums = {c: np.zeros(CHANNEL_SLOTS) for c in range(1, CHANNEL_SLOTS + 1)}
        self.squares = {c: np.zeros(CHANNEL_SLOTS) for c in range(1, CHANNEL_SLOTS + 1)}
        self.sampled: Counter[int] = Counter()
        self.class_pixels = np.zeros(k + 1, np.int64)
        self.presence = np.zeros(k, np.int64)
        self.thirds = np.zeros((4, k + 2), np.int64)
        self.empty = 0

    def add(self, row: dict[str, Any]) -> None:
        """One accepted pair's summary row (validate's columns plus :func:`pair_stats`)."""
        k = self.spec.num_classes
        counts = np.asarray(row["class_pixels"], np.int64)
        channels = int(row["channels"])
        self.sizes.append((int(row["height"]), int(row["width"])))
        self.channels[channels] += 1
        self.pixel_types[row["pixel_type"]] += 1
        if channels in self.sums:
            self.sums[channels] += np.asarray(row["channel_sum"], np.float64)
            self.squares[channels] += np.asarray(row["channel_sumsq"], np.float64)
            self.sampled[channels] += int(row["sampled"])
        self.class_pixels += counts
        self.presence += counts[:k] > 0
        self.thirds += np.asarray(row["thirds"], np.int64).reshape(4, k + 2)
        self.empty += bool(row["empty"])

    def result(self) -> dict[str, Any]:
        """The fingerprint (see the module docstring); ``{"images": 0}`` when nothing was read."""
        n = len(self.sizes)
        if n == 0:
            return {"images": 0}
        k, spec = self.spec.num_classes, self.spec
        heights, widths = np.array(self.sizes).T
        quantile = {name: [int(np.quantile(heights, q, method="nearest")),
                           int(np.quantile(widths, q, method="nearest"))]
                    for name, q in (("min", 0), ("p10", .1), ("median", .5), ("p90", .9),
                                    ("max", 1))}
        aspect = widths / heights
        channels = self.channels.most_common(1)[0][0]
        pixels = max(1, self.sampled[channels])
        mean = self.sums[channels][:channels] / pixels
        std = np.sqrt(np.maximum(self.squares[channels][:channels] / pixels - mean ** 2, 0))
        labelled = self.class_pixels[:k].sum() if not spec.multilabel else int(
            (heights * widths).sum())
        share = self.class_pixels[:k] / max(1, labelled)
        return {"images": n, "num_classes": k, "class_names": list(spec.names),
                "multilabel": spec.multilabel,
                "sizes": {**quantile, "distinct": len(set(self.sizes)),
                          "aspect_ratio": {"min": round(float(aspect.min()), 3),
                                           "median": round(float(np.median(aspect)), 3),
                                           "max": round(float(aspect.max()), 3)}},
                "channels": {str(c): m for c, m in sorted(self.channels.items())},
                "pixel_types": dict(self.pixel_types),
                "mean": [round(float(v), 4) for v in mean],
                "std": [round(float(v), 4) for v in std],
                "class_share": [round(float(v), 5) for v in share],
                "class_presence": [round(float(v) / n, 4) for v in self.presence],
                "empty_mask_rate": round(self.empty / n, 4),
                "position": self._position(share)}

    def _position(self, share: np.ndarray) -> dict[str, Any]:
        """Each class's share of the four border thirds, and which classes are positional."""
        k = self.spec.num_classes
        parts = self.thirds[:, :k].astype(np.float64)
        # multi-class: of the labelled pixels; multi-label: of all pixels of the third
        totals = self.thirds[:, k + 1:] if self.spec.multilabel else parts.sum(axis=1,
                                                                               keepdims=True)
        shares = parts / np.maximum(totals, 1.0)
        names = self.spec.names

        def dependent(a: np.ndarray, b: np.ndarray) -> list[str]:
            found = []
            for c in range(k):
                if share[c] < POSITION_MIN_SHARE:
                    continue
                low, high = sorted((a[c], b[c]))
                if high >= POSITION_MIN_SHARE and high >= POSITION_RATIO * low:
                    found.append(names[c])
            return found

        vertical, horizontal = dependent(shares[0], shares[1]), dependent(shares[2], shares[3])
        return {"top": [round(float(v), 4) for v in shares[0]],
                "bottom": [round(float(v), 4) for v in shares[1]],
                "left": [round(float(v), 4) for v in shares[2]],
                "right": [round(float(v), 4) for v in shares[3]],
                "vertical_classes": vertical, "horizontal_classes": horizontal}
