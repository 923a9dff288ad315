"""A small, learnable synthetic segmentation dataset (the demo's and the tests' data).

Scenes hold discs, rectangles and triangles on a textured background.  Each shape type has its own
colour and texture, so a U-Net learns it in a few epochs; noise and blur keep it from being trivial.

- Multi-class: class 0 is background, class ``1 + t`` is shape type ``t`` (``num_classes`` 2..4).
  Masks are single PNG index masks; later shapes occlude earlier ones.
- Multi-label: one channel per shape type (``num_classes`` 1..3), no background channel; shapes
  may overlap and are blended in the image.  Masks are one binary PNG per class (0/255), joined
  with ``;`` in the manifest's mask column.

Images cycle through ``formats`` (PNG, JPEG, BMP, GIF, TIFF); masks are always lossless PNG.
Everything is a pure function of ``seed`` (each sample has its own generator ``[seed, index]``).

For instances, :func:`touching_discs` makes clusters of discs that touch or overlap a little
(what connected components merge and a watershed should cut) and :func:`render_discs` paints
them as an RGB image, each disc its own brightness, shaded darker towards its rim.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from seg_core.codecs import encode_png

SHAPES: tuple[str, ...] = ("disc", "rectangle", "triangle")
_BASE_COLOURS = np.array([[215, 70, 55], [70, 190, 85], [65, 95, 225]], dtype=np.float32)
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "bmp": "bmp", "gif": "gif", "tiff": "tif"}


def generate_sample_dataset(out_dir: str | Path, *, n: int = 24, size: tuple[int, int] = (96, 96),
                            num_classes: int = 3, seed: int = 0,
                            formats: Sequence[str] = ("png", "jpeg", "bmp", "gif", "tiff"),
                            multilabel: bool = False, val_fraction: float = 0.25,
                            nfolds: int = 0,
                            shape_probs: Sequence[float] | None = None) -> Path:
    """Write ``n`` image/mask pairs under ``out_dir`` and return the path of ``manifest.csv``.

    Manifest columns: ``image, mask, split`` (+ ``fold`` when ``nfolds > 0``), paths relative to
    the manifest.  ``round(n * val_fraction)`` samples (chosen by ``seed``) are ``val``, the rest
    ``train``; folds are assigned round-robin over the same shuffled order.  ``shape_probs``
    (one per shape type) makes some classes rarer than others; by default they are equally likely.
    """
    shape_types = num_classes if multilabel else num_classes - 1
    if not 1 <= shape_types <= len(SHAPES):
        expected = "1..3" if multilabel else "2..4"
        raise ValueError(f"generate_sample_dataset: num_classes must be in {expected} "
                         f"(multilabel={multilabel}), got {num_classes}")
    unknown = sorted(set(formats) - set(_EXTENSIONS))
    if unknown or not formats:
        raise ValueError(f"generate_sample_dataset: formats must be non-empty and from "
                         f"{sorted(_EXTENSIONS)}, got {list(formats)}")
    if n < 1 or not 0.0 <= val_fraction < 1.0 or nfolds < 0:
        raise ValueError(f"generate_sample_dataset: need n >= 1, 0 <= val_fraction < 1 and "
                         f"nfolds >= 0, got n={n}, val_fraction={val_fraction}, nfolds={nfolds}")
    root = dataset_dirs(out_dir)
    rank, n_val = split_ranks(n, seed, val_fraction)
    rows = []
    for index in range(n):
        image, mask = render_sample(index, size=size, shape_types=shape_types, seed=seed,
                                    multilabel=multilabel, shape_probs=shape_probs)
        fmt = formats[index % len(formats)]
        image_rel = f"images/sample_{index:04d}.{_EXTENSIONS[fmt]}"
        (root / image_rel).write_bytes(_encode_image(image, fmt))
        mask_rels = []
        for channel, plane in enumerate(mask if multilabel else mask[None]):
            suffix = f"_c{channel}" if multilabel else ""
            mask_rels.append(f"masks/sample_{index:04d}{suffix}.png")
            (root / mask_rels[-1]).write_bytes(encode_png(plane * (255 if multilabel else 1)))
        row = {"image": image_rel, "mask": ";".join(mask_rels),
               "split": "val" if rank[index] < n_val else "train"}
        if nfolds:
            row["fold"] = str(int(rank[index]) % nfolds)
        rows.append(row)
    return write_manifest_csv(root / "manifest.csv", rows)


def dataset_dirs(out_dir: str | Path) -> Path:
    """``out_dir`` with ``images/`` and ``masks/`` created."""
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    return root


def split_ranks(n: int, seed: int, val_fraction: float) -> tuple[np.ndarray, int]:
    """A seeded rank per sample and the val count: samples ranked below it are ``val``."""
    order = np.random.default_rng([seed, n]).permutation(n)
    n_val = min(n - 1, round(n * val_fraction)) if n > 1 else 0
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank, n_val


def write_manifest_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write ``rows`` (same keys each) as a CSV manifest at ``path``; returns ``path``."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def render_sample(index: int, *, size: tuple[int, int] = (96, 96), shape_types: int = 2,
                  seed: int = 0, multilabel: bool = False,
                  shape_probs: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H x W x 3 uint8 image, mask).

    The mask is H x W uint8 class ids (0 = background) or, with ``multilabel``, K x H x W uint8
    {0, 1} with one channel per shape type.
    """
    rng = np.random.default_rng([seed, index])
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, yy, xx)
    mask = np.zeros((shape_types, height, width) if multilabel else (height, width), np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        kind = int(rng.integers(0, shape_types)) if shape_probs is None else \
            int(rng.choice(shape_types, p=np.asarray(shape_probs, float) / sum(shape_probs)))
        region = _shape_region(SHAPES[kind], rng, yy, xx)
        colour = _BASE_COLOURS[kind] + rng.normal(0, 12, 3)
        paint = colour * (0.8 + 0.2 * _texture(kind, rng, yy, xx))[..., None]  # H x W x 3
        alpha = 0.6 if multilabel else 1.0  # blended overlaps stay visible for multi-label
        image[region] = (1 - alpha) * image[region] + alpha * paint[region]
        if multilabel:
            mask[kind][region] = 1
        else:
            mask[region] = kind + 1
    image += rng.normal(0, 8, image.shape)
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    blurred = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return np.asarray(blurred).copy(), mask


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Grey-brown low-frequency gradient with fine mottling, H x W x 3 float32."""
    height, width = yy.shape
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)  # roughly -1..1
    level = 110 + 30 * ramp + rng.normal(0, 6, yy.shape)
    tint = np.array([1.0, 0.95, 0.85]) * rng.uniform(0.9, 1.1)
    return (level[..., None] * tint).astype(np.float32)


def _shape_region(kind: str, rng: np.random.Generator, yy: np.ndarray,
                  xx: np.ndarray) -> np.ndarray:
    height, width = yy.shape
    scale = min(height, width)
    cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
    if kind == "disc":
        radius = rng.uniform(0.08, 0.2) * scale
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    if kind == "rectangle":
        half_h, half_w = rng.uniform(0.07, 0.2, 2) * scale
        return (np.abs(yy - cy) <= half_h) & (np.abs(xx - cx) <= half_w)
    radius = rng.uniform(0.12, 0.28) * scale
    angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
    vy, vx = cy + radius * np.sin(angles), cx + radius * np.cos(angles)
    inside = np.ones_like(yy, dtype=bool)
    for a in range(3):  # same side of all three edges as the centroid (counter-clockwise order)
        b = (a + 1) % 3
        cross = (vx[b] - vx[a]) * (yy - vy[a]) - (vy[b] - vy[a]) * (xx - vx[a])
        inside &= cross >= 0
    return inside


def _texture(kind: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Per-type texture in [-1, 1]: stripes (disc), checker (rectangle), dots (triangle)."""
    phase = rng.uniform(0, 2 * np.pi)
    if kind == 0:
        return np.sin((xx + yy) / 2.0 + phase)
    if kind == 1:
        return np.sign(np.sin(xx / 2.5 + phase) * np.sin(yy / 2.5 + phase))
    return np.cos(xx / 1.7 + phase) * np.cos(yy / 1.7 + phase)


def _encode_image(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    kwargs = {"quality": 92} if fmt == "jpeg" else {}
    Image.fromarray(image).save(buffer, format=fmt.upper(), **kwargs)
    return buffer.getvalue()


def touching_discs(size: tuple[int, int] = (96, 128), n: int = 12,
                   radius: tuple[float, float] = (6.0, 10.0),
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(H x W uint8 semantic mask with class 1 on every disc, H x W int32 instance labels).

    Most discs are placed touching an earlier one, their centres 80-95% of the sum of the two
    radii apart; no disc overlaps another deeper than that.  Centres lie inside the image, so
    some discs are cut by its edge.  A pixel two discs share goes to the one it is relatively
    nearer the centre of, so the cut between them is straight.  Fewer than ``n`` discs when
    the image has no room left for them.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    centres: list[np.ndarray] = []
    radii: list[float] = []
    for _ in range(50 * n):
        if len(centres) == n:
            break
        r = float(rng.uniform(*radius))
        if centres and rng.random() < 0.8:   # touch an earlier disc
            j = int(rng.integers(len(centres)))
            angle = rng.uniform(0, 2 * np.pi)
            gap = (radii[j] + r) * rng.uniform(0.8, 0.95)
            centre = centres[j] + gap * np.array([np.sin(angle), np.cos(angle)])
        else:
            centre = rng.uniform([0, 0], [height, width])
        inside = 0 <= centre[0] < height and 0 <= centre[1] < width
        if inside and all(np.hypot(*(centre - c)) >= 0.8 * (r + rc)
                          for c, rc in zip(centres, radii)):
            centres.append(centre)
            radii.append(r)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    reach = np.full((height, width), np.inf, np.float32)   # distance / radius of the owner
    labels = np.zeros((height, width), np.int32)
    for index, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        relative = np.hypot(yy - cy, xx - cx) / r
        owns = (relative <= 1.0) & (relative < reach)
        labels[owns], reach[owns] = index, relative[owns]
    return (labels > 0).astype(np.uint8), labels


def render_discs(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """An H x W x 3 uint8 image of :func:`touching_discs`' labels: a mottled background, each
    disc its own brightness and tint, darker towards its own rim (also where it touches
    another), then noise and a slight blur."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng([seed, 1])
    height, width = labels.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, yy, xx) * 0.6
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        region = labels[box] == index
        depth = ndi.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1][region]
        colour = np.array([200.0, 170.0, 210.0]) * rng.uniform(0.65, 1.0) + rng.normal(0, 10, 3)
        shade = 0.55 + 0.45 * np.sqrt(depth / max(depth.max(), 1.0))
        image[box][region] = colour * shade[:, None]
    image += rng.normal(0, 10, image.shape)
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=0.7))).copy()
