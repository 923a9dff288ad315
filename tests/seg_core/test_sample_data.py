"""Synthetic dataset: manifest layout, formats, stability per seed, learnability, bad files."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from seg_core.codecs import decode_image, decode_mask, sniff_format
from seg_core.config import MaskSpec
from seg_core.errors import InputError
from tests.hostile_files import write_bad_files
from seg_core.sample_data import generate_sample_dataset


def read_rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as handle:
        return list(csv.DictReader(handle))


def load_arrays(manifest: Path, spec: MaskSpec) -> list[tuple[np.ndarray, np.ndarray]]:
    root = manifest.parent
    pairs = []
    for row in read_rows(manifest):
        image = decode_image((root / row["image"]).read_bytes(), source=row["image"])
        blobs = [(root / p).read_bytes() for p in row["mask"].split(";")]
        pairs.append((image, decode_mask(blobs if spec.multilabel else blobs[0], spec)))
    return pairs


def test_manifest_formats_and_splits(tmp_path: Path) -> None:
    manifest = generate_sample_dataset(tmp_path, n=10, size=(40, 48), num_classes=4, nfolds=3)
    rows = read_rows(manifest)
    assert list(rows[0]) == ["image", "mask", "split", "fold"]
    assert [sniff_format((tmp_path / r["image"]).read_bytes()) for r in rows[:5]] == \
        ["png", "jpeg", "bmp", "gif", "tiff"]
    assert all(sniff_format((tmp_path / r["mask"]).read_bytes()) == "png" for r in rows)
    assert sum(r["split"] == "val" for r in rows) == round(10 * 0.25)
    assert sorted(int(r["fold"]) for r in rows) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    for image, mask in load_arrays(manifest, MaskSpec(num_classes=4)):
        assert image.shape == (40, 48, 3) and mask.shape == (40, 48)
        assert mask.min() >= 0 and mask.max() <= 3


def test_same_seed_same_arrays_different_seed_differs(tmp_path: Path) -> None:
    spec = MaskSpec(num_classes=3)
    first = load_arrays(generate_sample_dataset(tmp_path / "a", n=5, seed=3), spec)
    again = load_arrays(generate_sample_dataset(tmp_path / "b", n=5, seed=3), spec)
    other = load_arrays(generate_sample_dataset(tmp_path / "c", n=5, seed=4), spec)
    for (img_a, mask_a), (img_b, mask_b) in zip(first, again):
        assert img_a.tobytes() == img_b.tobytes() and mask_a.tobytes() == mask_b.tobytes()
    assert any(a[1].tobytes() != c[1].tobytes() for a, c in zip(first, other))


def test_classes_are_separable_by_colour(tmp_path: Path) -> None:
    """Learnable: each class has a distinct mean colour (nearest-mean pixel accuracy is high)."""
    manifest = generate_sample_dataset(tmp_path, n=12, num_classes=4, formats=("png",))
    pairs = load_arrays(manifest, MaskSpec(num_classes=4))
    pixels = np.concatenate([img.reshape(-1, 3) for img, _ in pairs]).astype(np.float32)
    labels = np.concatenate([mask.ravel() for _, mask in pairs])
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
    means = np.stack([pixels[labels == k].mean(0) for k in range(4)])
    nearest = np.argmin(((pixels[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() > 0.85


def test_multilabel_one_png_per_class(tmp_path: Path) -> None:
    manifest = generate_sample_dataset(tmp_path, n=6, num_classes=3, multilabel=True)
    rows = read_rows(manifest)
    assert all(len(r["mask"].split(";")) == 3 for r in rows)
    pairs = load_arrays(manifest, MaskSpec(num_classes=3, multilabel=True))
    masks = np.stack([mask for _, mask in pairs])
    assert masks.shape == (6, 3, 96, 96) and set(np.unique(masks).tolist()) == {0, 1}
    assert (masks.sum(axis=1) >= 2).any(), "expected at least one overlap between classes"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes must be in 2..4"):
        generate_sample_dataset("/nonexistent", num_classes=5)
    with pytest.raises(ValueError, match="formats"):
        generate_sample_dataset("/nonexistent", formats=("webp",))


def test_bad_files_trigger_each_reason(tmp_path: Path) -> None:
    paths = write_bad_files(tmp_path, size=(32, 32), num_classes=3)
    spec = MaskSpec(num_classes=3)
    expected = {"corrupt": "corrupt", "truncated": "truncated", "empty": "empty_file",
                "text": "not_an_image", "bomb": "too_many_pixels"}
    for name, reason in expected.items():
        with pytest.raises(InputError) as info:
            decode_image(paths[name].read_bytes(), source=str(paths[name]))
        assert info.value.reason == reason, name
        assert str(paths[name]) in str(info.value)
    with pytest.raises(InputError, match="lossy_mask"):
        decode_mask(paths["jpeg_mask"].read_bytes(), spec)
    with pytest.raises(InputError, match="unknown_label"):
        decode_mask(paths["mask_unknown_label"].read_bytes(), spec)
    image = decode_image(paths["image"].read_bytes())
    mismatch = decode_mask(paths["mask_size_mismatch"].read_bytes(), spec)
    assert image.shape[:2] == (32, 32) and mismatch.shape != image.shape[:2]
    assert paths["bomb"].stat().st_size < 100_000
