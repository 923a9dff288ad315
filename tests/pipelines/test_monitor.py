"""The drift baseline reads val images as ``rayseg predict`` would (no Ray here)."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from pipelines.operate.monitor import BASELINE_FILE, val_images, write_baseline
from seg_core.codecs import encode_png
from seg_core.config import MaskSpec, ModelConfig, Preprocessing
from seg_core.model import UNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiff_stack(seed: int) -> bytes:
    """A two-page TIFF: page 0 the image (noise), page 1 another (flat)."""
    rng = np.random.default_rng(seed)
    pages = [Image.fromarray(rng.integers(0, 255, (48, 40, 3), np.uint8)),
             Image.fromarray(np.full((48, 40, 3), 128, np.uint8))]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    return buffer.getvalue()


def _artifact(path, tiff_page):
    import torch

    from seg_core.artifact import save_artifact

    torch.manual_seed(0)
    return save_artifact(path, UNet(ModelConfig(in_channels=3, num_classes=2, depth=2,
                                                base_width=4)).eval(),
                         name="stack", version="s1", mask_spec=MaskSpec(num_classes=2),
                         preprocessing=Preprocessing(tile_size=32, tiff_page=tiff_page),
                         metrics={})


def test_a_multi_page_tiff_dataset_gets_a_baseline_through_the_artifacts_tiff_page(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask", "split"])
        for index in range(5):
            (root / "images" / f"s{index}.tif").write_bytes(_tiff_stack(index))
            (root / "masks" / f"s{index}.png").write_bytes(
                encode_png(np.zeros((48, 40), np.uint8)))
            writer.writerow([f"images/s{index}.tif", f"masks/s{index}.png",
                             "val" if index < 4 else "train"])
    blobs = val_images(str(root / "manifest.csv"), kind="manifest", split="val")
    assert len(blobs) == 4
    baseline = write_baseline(_artifact(tmp_path / "paged", tiff_page=0), blobs)
    assert baseline["images"] == 4 and len(baseline["area"][0]) == 4
    written = json.loads((tmp_path / "paged" / BASELINE_FILE).read_text())
    assert written["images"] == 4
    # without a page the artifact refuses a multi-page file, as predict would: nothing to keep
    assert write_baseline(_artifact(tmp_path / "unpaged", tiff_page=None), blobs)["images"] == 0
