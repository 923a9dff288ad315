"""A generated outdoor-scene set that is as hard as real multi-class data, for quality benchmarks.

Each scene is a street by a river, seen from the side (``H x W``, non-square by default):

- ``sky`` on top and ``water`` at the bottom share one blue (the water reflects the sky), and
  ``wall`` (buildings on the skyline) and ``road`` share one grey.  Colour alone cannot tell
  them apart; vertical position and context can (sky is above the ground line, water below
  the shore; walls stand above the ground line, the road lies below it).
- ``sign`` (small plates on walls) and ``person`` (small figures on the road) are rare: each
  is well under 2% of the pixels.
- Void (:data:`IGNORE_INDEX`) marks a one-pixel boundary between the large regions (as in
  VOC) and unlabelled cars on the road, so scores must skip ignored pixels.

Textures (windows, lane dashes, clouds, ripples) and lighting vary per image; noise and blur
keep edges soft.  Masks are single-channel PNG index masks (value = class id, 255 = void).
Everything is a pure function of ``seed`` (each scene has its own generator ``[seed, index]``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from seg_core.codecs import encode_png
from seg_core.sample_data import dataset_dirs, split_ranks, write_manifest_csv

CLASS_NAMES: tuple[str, ...] = ("sky", "wall", "road", "water", "sign", "person")
SKY, WALL, ROAD, WATER, SIGN, PERSON = range(len(CLASS_NAMES))
RARE_CLASSES: tuple[int, ...] = (SIGN, PERSON)
IGNORE_INDEX = 255
_SIGN_COLOURS = np.array([[205, 45, 40], [225, 190, 45], [240, 240, 235]], dtype=np.float32)


def generate_scene_dataset(out_dir: str | Path, *, n: int = 200,
                           size: tuple[int, int] = (120, 184), seed: int = 0,
                           val_fraction: float = 0.25) -> Path:
    """Write ``n`` scenes under ``out_dir`` and return the path of ``manifest.csv``.

    Layout: ``images/scene_NNNN.png`` (RGB), ``masks/scene_NNNN.png`` (class ids, 255 = void)
    and ``manifest.csv`` with columns ``image, mask, split`` (paths relative to the manifest).
    ``round(n * val_fraction)`` scenes, chosen by ``seed``, are ``val``; the rest ``train``.
    """
    height, width = size
    if n < 1 or not 0.0 <= val_fraction < 1.0 or min(height, width) < 48:
        raise ValueError(f"generate_scene_dataset: need n >= 1, 0 <= val_fraction < 1 and both "
                         f"sides >= 48 px, got n={n}, val_fraction={val_fraction}, size={size}")
    root = dataset_dirs(out_dir)
    rank, n_val = split_ranks(n, seed, val_fraction)
    rows = []
    for index in range(n):
        image, mask = render_scene(index, size=size, seed=seed)
        image_rel, mask_rel = f"images/scene_{index:04d}.png", f"masks/scene_{index:04d}.png"
        (root / image_rel).write_bytes(encode_png(image))
        (root / mask_rel).write_bytes(encode_png(mask))
        rows.append({"image": image_rel, "mask": mask_rel,
                     "split": "val" if rank[index] < n_val else "train"})
    return write_manifest_csv(root / "manifest.csv", rows)


def render_scene(index: int, *, size: tuple[int, int] = (120, 184),
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H x W x 3 uint8 image, H x W uint8 mask of class ids and 255 for void)."""
    rng = np.random.default_rng([seed, index])
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # The ground line tilts a little; the shore lies a band below it (no river in 1 of 5).
    tilt = rng.uniform(-0.06, 0.06) * height * (xx / width - 0.5)
    ground = height * rng.uniform(0.5, 0.62) + tilt  # H x W, constant down each column
    has_water = rng.random() < 0.8
    shore = (ground + height * rng.uniform(0.16, 0.28)) if has_water else \
        np.full_like(ground, 2.0 * height)
    roof = _skyline(rng, width, height, float(ground.mean()))  # W: wall top row, or inf
    mask = np.where(yy < ground, SKY, np.where(yy < shore, ROAD, WATER)).astype(np.uint8)
    mask[(yy >= roof[None, :]) & (yy < ground)] = WALL

    sky_rgb = np.array([100.0, 150.0, 210.0]) + rng.normal(0, 8, 3)
    image = np.zeros((height, width, 3), np.float32)
    lighter = 0.82 + 0.25 * np.clip(yy / ground, 0, 1)  # the sky is lighter near the horizon
    image[:] = sky_rgb * lighter[..., None]
    image += _clouds(rng, yy, xx, height * 0.45)[..., None] * (250.0 - image)
    depth = np.clip((yy - shore) / max(1.0, height - float(shore.min())), 0, 1)
    ripples = 7.0 * np.sin(yy * 1.3 + rng.uniform(0, 6.3) + 0.6 * np.sin(xx / 9.0))
    water = (sky_rgb + rng.normal(0, 8, 3)) * (1.02 - 0.22 * depth)[..., None] + ripples[..., None]
    image = np.where((mask == WATER)[..., None], water, image)
    road_grey = 122.0 + rng.normal(0, 12)
    road = road_grey * np.array([0.97, 1.0, 1.03]) + rng.normal(0, 6, (height, width, 1))
    if rng.random() < 0.5:  # dashed lane marking half-way down the road
        lane = (np.abs(yy - (ground + shore.clip(max=height)) / 2) < 1.0) & (xx % 24 < 12)
        road[lane] = 225.0
    image = np.where((mask == ROAD)[..., None], road, image)
    image = _paint_walls(rng, image, mask == WALL, roof, yy, xx)

    boundary = np.zeros_like(mask, dtype=bool)  # one-pixel void line between large regions
    boundary[:-1] |= mask[:-1] != mask[1:]
    boundary[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    mask[boundary] = IGNORE_INDEX
    if has_water or rng.random() < 0.5:
        _car(rng, image, mask, yy, xx, ground, shore)
    _signs(rng, image, mask, roof, ground)
    _people(rng, image, mask, yy, xx, ground, shore)

    cast = rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, 3)  # exposure, white balance
    image *= cast * (1.06 - 0.12 * yy / height)[..., None]  # and the sun from above
    image += rng.normal(0, 5, image.shape)
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    blurred = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 0.9))))
    return np.asarray(blurred).copy(), mask


def _skyline(rng: np.random.Generator, width: int, height: int, ground: float) -> np.ndarray:
    """Top row of the wall in each column (inf where there is no building)."""
    roof = np.full(width, np.inf, np.float32)
    x = 0
    while x < width:
        span = int(rng.uniform(0.1, 0.3) * width)
        if rng.random() < 0.75:
            roof[x:x + span] = ground - height * rng.uniform(0.12, 0.38)
        x += span + int(rng.integers(0, 6))
    return roof


def _clouds(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
            max_row: float) -> np.ndarray:
    """Soft white blobs in the upper part, as an opacity map in [0, 0.8]."""
    alpha = np.zeros_like(yy)
    for _ in range(int(rng.integers(0, 4))):
        cy, cx = rng.uniform(0, max_row), rng.uniform(0, yy.shape[1])
        ry, rx = rng.uniform(3, 8), rng.uniform(10, 30)
        alpha = np.maximum(alpha, 0.8 * np.exp(-((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2))
    return alpha


def _paint_walls(rng: np.random.Generator, image: np.ndarray, wall: np.ndarray,
                 roof: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Each building its own grey (overlapping the road's), half of them with dark windows."""
    out = image.copy()
    for top in np.unique(roof[np.isfinite(roof)]):
        building = wall & (roof[None, :] == top)
        grey = (128.0 + rng.normal(0, 15)) * np.array([1.0, 0.98, 0.95])
        shade = np.ones_like(yy)
        if rng.random() < 0.5:
            pitch = int(rng.integers(7, 12))
            windows = ((yy - top) % pitch >= pitch - 3) & (xx % pitch >= pitch - 3)
            shade[windows] = 0.6
        out[building] = (grey * shade[..., None])[building]
    return out


def _car(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, yy: np.ndarray,
         xx: np.ndarray, ground: np.ndarray, shore: np.ndarray) -> None:
    """An unlabelled car (void) on the road, in place."""
    width = mask.shape[1]
    cx = rng.uniform(0.1, 0.9) * width
    column = min(int(cx), width - 1)
    bottom = min(float(shore[0, column]), mask.shape[0]) - 2
    cy = rng.uniform(float(ground[0, column]) + 4, max(float(ground[0, column]) + 5, bottom - 4))
    body = ((yy - cy) / rng.uniform(3.5, 5.5)) ** 2 + ((xx - cx) / rng.uniform(7, 13)) ** 2 <= 1
    image[body] = rng.uniform(20, 235, 3)
    mask[body] = IGNORE_INDEX


def _signs(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, roof: np.ndarray,
           ground: np.ndarray) -> None:
    """One to three small plates on walls (class ``sign``), in place."""
    width = mask.shape[1]
    tall = np.flatnonzero(ground[0] - roof >= 16)  # columns whose wall has room for a plate
    for _ in range(int(rng.integers(1, 4)) if tall.size else 0):
        h, w = int(rng.integers(6, 10)), int(rng.integers(7, 12))
        fits = tall[tall + w <= width]
        fits = fits[roof[fits + w - 1] == roof[fits]]  # the whole plate on one building
        if not fits.size:
            continue
        x = int(rng.choice(fits))
        top = int(rng.uniform(roof[x] + 2, ground[0, x] - h - 2))
        image[top:top + h, x:x + w] = _SIGN_COLOURS[rng.integers(0, len(_SIGN_COLOURS))]
        image[top + 1:top + h - 1, x + 1:x + w - 1] *= rng.uniform(0.85, 1.0)
        mask[top:top + h, x:x + w] = SIGN


def _people(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, yy: np.ndarray,
            xx: np.ndarray, ground: np.ndarray, shore: np.ndarray) -> None:
    """Zero to three small standing figures on the road (class ``person``), in place."""
    height, width = mask.shape
    for _ in range(int(rng.integers(0, 4))):
        tall, broad = rng.uniform(12, 20), rng.uniform(5, 8)
        cx = rng.uniform(0.05, 0.95) * width
        column = min(int(cx), width - 1)
        road_top, road_bottom = float(ground[0, column]), min(float(shore[0, column]), height)
        feet = rng.uniform(road_top + 3, max(road_top + 4, road_bottom - 1))
        body_cy = feet - 0.4 * tall
        body = ((yy - body_cy) / (0.4 * tall)) ** 2 + ((xx - cx) / (broad / 2)) ** 2 <= 1
        head_r = broad * 0.38
        head = (yy - (feet - 0.8 * tall - head_r)) ** 2 + (xx - cx) ** 2 <= head_r ** 2
        image[body] = rng.uniform(30, 120, 3)
        image[head] = np.array([205.0, 165.0, 135.0]) * rng.uniform(0.6, 1.05)
        mask[body | head] = PERSON
