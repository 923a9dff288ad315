"""Scene set: manifest layout, rare classes, void, determinism, position-dependent classes."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from seg_core.codecs import decode_image, decode_mask
from seg_core.config import MaskSpec
from benchmarks.scene_data import (CLASS_NAMES, IGNORE_INDEX, RARE_CLASSES, ROAD, SKY, WALL, WATER,
                                 generate_scene_dataset, render_scene)

SIZE = (120, 184)


@pytest.fixture(scope="module")
def scenes() -> tuple[np.ndarray, np.ndarray]:
    """40 scenes: images N,H,W,3 float and masks N,H,W."""
    pairs = [render_scene(i, size=SIZE, seed=0) for i in range(40)]
    return (np.stack([p[0] for p in pairs]).astype(np.float64),
            np.stack([p[1] for p in pairs]))


def test_manifest_decodes_as_rayseg_reads_it(tmp_path: Path) -> None:
    manifest = generate_scene_dataset(tmp_path, n=8, size=SIZE, seed=1)
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "mask", "split"]
    assert sum(r["split"] == "val" for r in rows) == 2 and len(rows) == 8
    spec = MaskSpec(num_classes=len(CLASS_NAMES), ignore_index=IGNORE_INDEX)
    for row in rows:
        image = decode_image((tmp_path / row["image"]).read_bytes())
        mask = decode_mask((tmp_path / row["mask"]).read_bytes(), spec)
        assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == SIZE  # non-square, single channel
        assert set(np.unique(mask)) <= set(range(len(CLASS_NAMES))) | {IGNORE_INDEX}


def test_two_rare_classes_and_void_pixels(scenes: tuple[np.ndarray, np.ndarray]) -> None:
    _, masks = scenes
    share = np.bincount(masks.ravel(), minlength=256) / masks.size
    for k in RARE_CLASSES:
        assert 0 < share[k] < 0.02, (CLASS_NAMES[k], share[k])
    common = [k for k in range(len(CLASS_NAMES)) if k not in RARE_CLASSES]
    assert min(share[k] for k in common) > 0.05
    assert 0.005 < share[IGNORE_INDEX] < 0.1
    assert (masks == IGNORE_INDEX).any(axis=(1, 2)).all()  # void in every scene (boundaries)


def test_same_seed_same_scene_other_seed_differs() -> None:
    first, again, other = (render_scene(3, size=SIZE, seed=s) for s in (0, 0, 1))
    assert first[0].tobytes() == again[0].tobytes() and first[1].tobytes() == again[1].tobytes()
    assert first[1].tobytes() != other[1].tobytes()


def test_same_colour_classes_are_split_by_row(scenes: tuple[np.ndarray, np.ndarray]) -> None:
    """Sky/water and wall/road: nearest-mean colour barely separates them, the row does."""
    images, masks = scenes
    rows = np.broadcast_to(np.arange(SIZE[0])[None, :, None], masks.shape)
    for upper, lower in ((SKY, WATER), (WALL, ROAD)):
        a, b = masks == upper, masks == lower
        mean_a, mean_b = images[a].mean(axis=0), images[b].mean(axis=0)
        closer_to_b = [np.linalg.norm(images[m] - mean_b, axis=1)
                       < np.linalg.norm(images[m] - mean_a, axis=1) for m in (a, b)]
        colour_accuracy = (1 - closer_to_b[0].mean() + closer_to_b[1].mean()) / 2
        row_accuracy = max(((rows[a] < t).mean() + (rows[b] >= t).mean()) / 2
                           for t in range(SIZE[0]))
        names = CLASS_NAMES[upper], CLASS_NAMES[lower]
        assert colour_accuracy < 0.75, (names, colour_accuracy)
        assert row_accuracy > 0.9, (names, row_accuracy)
        for mask in masks:  # in every column, the upper class lies above the lower one
            top_of_lower = np.where((mask == lower).any(0), (mask == lower).argmax(0), SIZE[0])
            bottom_of_upper = np.where((mask == upper).any(0),
                                       SIZE[0] - 1 - (mask[::-1] == upper).argmax(0), -1)
            assert (bottom_of_upper < top_of_lower).all()


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"val_fraction": 1.0}, {"size": (32, 184)}])
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="generate_scene_dataset"):
        generate_scene_dataset(tmp_path, **kwargs)
