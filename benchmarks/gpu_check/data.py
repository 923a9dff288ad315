"""The check's data: the ISBI 2012 slices, or EM-like stand-ins generated for a rehearsal."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from benchmarks import REPO
from seg_core.codecs import decode_image, decode_mask, encode_png
from seg_core.config import MaskSpec

MASK = MaskSpec(num_classes=2, class_names=("membrane", "cell"), mask_values=(0, 255),
                ignore_index=255)
MEMBRANE = 0
Pairs = list[tuple[np.ndarray, np.ndarray]]


def find_data(explicit: str | None) -> Path | None:
    """The ISBI folder (holding ``manifest.csv``), first of: ``explicit``, ``$GPU_CHECK_DATA``,
    ``.gpu_check_data/isbi2012_em_membrane``, ``../shared/data/isbi2012_em_membrane``."""
    candidates = [explicit, os.environ.get("GPU_CHECK_DATA"),
                  REPO / ".gpu_check_data" / "isbi2012_em_membrane",
                  REPO.parent / "shared" / "data" / "isbi2012_em_membrane"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "manifest.csv").is_file():
            return Path(candidate)
    return None


def load_slices(root: Path) -> dict[str, Pairs]:
    """``{"train": [...], "val": [...]}`` of (grey uint8 H x W image, class-id mask) from the
    manifest's fixed split, decoded as training decodes them (mask value 0 = membrane = class
    0, 255 = cell = class 1, through :data:`MASK`)."""
    split: dict[str, Pairs] = {"train": [], "val": []}
    with open(root / "manifest.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            image = decode_image((root / row["image"]).read_bytes(), source=row["image"])[..., 0]
            mask = decode_mask((root / row["mask"]).read_bytes(), MASK, source=row["mask"])
            split.setdefault(row["split"], []).append((image, mask.astype(np.uint8)))
    if not split["train"] or not split["val"]:
        raise SystemExit(f"{root}/manifest.csv: needs train and val rows")
    return split


def synthetic_membranes(count: int, height: int, width: int, seed: int) -> Pairs:
    """EM-like stand-ins: Voronoi cells of uneven size and brightness, dark membranes 1-2 px
    wide between them (the minority class, as in ISBI), dark organelles inside cells that are
    not membrane, noise and a brightness gradient across the frame (position-dependent), on a
    non-square frame.  Masks are class ids (0 membrane, 1 cell)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pairs = []
    for _ in range(count):
        seeds = rng.uniform((0, 0), (height, width), size=(int(rng.integers(8, 16)), 2))
        distance = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        nearest = np.sort(np.sqrt(distance), axis=-1)
        cell = distance.argmin(-1)
        membrane = (nearest[..., 1] - nearest[..., 0]) < rng.uniform(1.0, 2.5)
        shade = rng.uniform(140, 220, size=len(seeds))[cell] + 30 * xx / width
        image = np.where(membrane, 50.0, shade)
        for y, x, r in rng.uniform((0, 0, 1.5), (height, width, 4.0), size=(6, 3)):
            blob = (yy - y) ** 2 + (xx - x) ** 2 < r * r
            image[blob & ~membrane] = 75.0    # dark, but labelled cell
        image += rng.normal(0, 25, size=(height, width))
        pairs.append((np.clip(image, 0, 255).astype(np.uint8), (~membrane).astype(np.uint8)))
    return pairs


def write_membrane_dataset(out_dir: str | Path, *, train: int = 8, val: int = 3,
                           size: tuple[int, int] = (64, 96), seed: int = 1) -> Path:
    """A folder laid out like the ISBI 2012 set (grey PNG slices, masks 0 = membrane and 255 =
    cell, ``manifest.csv`` with a train/val split) of :func:`synthetic_membranes`; returns the
    folder.  A stand-in for benchmarks that read ISBI (``rayseg bench --isbi-dir``)."""
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rows = []
    for index, (image, mask) in enumerate(synthetic_membranes(train + val, *size, seed=seed)):
        name = f"{index:02d}.png"
        (root / "images" / name).write_bytes(encode_png(image))
        (root / "masks" / name).write_bytes(encode_png(mask * 255))
        rows.append(f"images/{name},masks/{name},{'train' if index < train else 'val'}\n")
    (root / "manifest.csv").write_text("image,mask,split\n" + "".join(rows))
    return root
