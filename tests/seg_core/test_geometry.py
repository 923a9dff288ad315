"""Inference geometry follows training geometry (issue 11), against an independent reference.

The reference (``tests/geometry_reference.py``) is plain PyTorch: one forward at the training size
and a bilinear upsample, or Gaussian sliding windows at the crop size.  On rayseg 0.1 the first
test failed: the 48 x 80 input was reflect-padded to a 256 x 256 tile and the masks moved.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seg_core.artifact import load_artifact, save_artifact
from seg_core.config import DEFAULT_TILE, MaskSpec, ModelConfig, Preprocessing
from seg_core.inference import Segmenter
from seg_core.model import UNet
from tests.geometry_reference import (CLASS_NAMES, MEAN, NUM_CLASSES, STD, STORED_SIZE,
                                      TRAIN_SIZE, assert_masks_match, reference_resized,
                                      reference_windows, render, to_input)

# one torch thread, as the session's position model was trained with
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPEC = MaskSpec(num_classes=NUM_CLASSES, class_names=CLASS_NAMES)
RESIZED = Preprocessing(mean=(MEAN,) * 3, std=(STD,) * 3, resize=TRAIN_SIZE, train_size=TRAIN_SIZE)
TEST_SEEDS = range(6)




def test_the_model_learned_a_task_that_padding_breaks(position_model) -> None:
    """Guards the test's power: the task is learned, and padded inputs visibly change it."""
    agree_truth, agree_padded = [], []
    for seed in TEST_SEEDS:
        image, truth = render(seed)
        reference = reference_resized(position_model, image).argmax(dim=0).numpy()
        agree_truth.append((reference == truth).mean())
        x = to_input(image, TRAIN_SIZE)
        # rayseg 0.1: pad to the 256 tile (replicate, as the pad exceeds the image)
        padded = F.pad(x, (0, 256 - x.shape[-1], 0, 256 - x.shape[-2]), mode="replicate")
        with torch.no_grad():
            probs = position_model(padded)[..., :x.shape[-2], :x.shape[-1]].softmax(dim=1)
        up = F.interpolate(probs, size=STORED_SIZE, mode="bilinear", align_corners=False)
        agree_padded.append((up[0].argmax(dim=0).numpy() == reference).mean())
    assert np.mean(agree_truth) > 0.98, agree_truth
    assert np.mean(agree_padded) < 0.97, agree_padded  # padding moves > 3% of the pixels


def test_resized_model_equals_one_forward_at_the_training_size(position_model) -> None:
    segmenter = Segmenter.from_model(position_model, SPEC, RESIZED)
    for seed in TEST_SEEDS:
        image, _ = render(seed)
        prediction = segmenter.predict(image)
        reference = reference_resized(position_model, image)
        np.testing.assert_allclose(prediction.probs, reference.numpy(), atol=1e-4)
        assert_masks_match(prediction.mask, reference)


def test_batches_of_mixed_sizes_equal_the_reference(position_model) -> None:
    segmenter = Segmenter.from_model(position_model, SPEC, RESIZED, batch_size=8)
    images = [render(seed, size)[0] for seed, size in
              enumerate([STORED_SIZE, (60, 60), STORED_SIZE, (30, 200)])]
    for image, prediction in zip(images, segmenter.predict_batch(images)):
        assert_masks_match(prediction.mask, reference_resized(position_model, image))


def test_version_1_artifact_gets_the_corrected_geometry(position_model, tmp_path) -> None:
    """An artifact written before train_size was recorded (format 1, tile_size 256, resize set)
    loads, and predicts with one forward at its resize, not in 256-pixel tiles."""
    old = Preprocessing(mean=(MEAN,) * 3, std=(STD,) * 3, resize=TRAIN_SIZE, tile_size=256)
    directory = save_artifact(tmp_path / "v1", position_model, name="old", version="1",
                              mask_spec=SPEC, preprocessing=old)
    meta = json.loads((directory / "artifact.json").read_text())
    meta["format_version"] = 1
    del meta["preprocessing"]["train_size"]
    (directory / "artifact.json").write_text(json.dumps(meta))
    artifact = load_artifact(directory)
    assert artifact.preprocessing.inference_window() == TRAIN_SIZE
    image, _ = render(3)
    with pytest.warns(UserWarning, match="larger than the 48x80 inputs"):
        segmenter = Segmenter(artifact, engine="torch")
    assert_masks_match(segmenter.predict(image).mask, reference_resized(position_model, image))


def test_crop_trained_model_uses_windows_of_the_crop_size() -> None:
    """A model trained on 32 x 32 random crops runs in 32-pixel windows over a 64 x 96 image."""
    torch.manual_seed(1)
    model = UNet(ModelConfig(in_channels=3, num_classes=NUM_CLASSES, depth=2, base_width=8))
    with torch.no_grad():  # large weights: masks that depend on every input pixel
        for param in model.parameters():
            if param.ndim == 4:
                param.mul_(3.0)
    model.eval()
    pre = Preprocessing(mean=(MEAN,) * 3, std=(STD,) * 3, train_size=(32, 32))
    image, _ = render(7, (64, 96))
    prediction = Segmenter.from_model(model, SPEC, pre).predict(image)
    reference = reference_windows(model, image, 32)
    np.testing.assert_allclose(prediction.probs, reference.numpy(), atol=1e-4)
    assert_masks_match(prediction.mask, reference)
    one_forward = Segmenter.from_model(model, SPEC, Preprocessing(
        mean=(MEAN,) * 3, std=(STD,) * 3, train_size=(64, 96))).predict(image)
    assert (one_forward.mask != prediction.mask).mean() > 0.01  # the window size matters here


@pytest.mark.parametrize("pre, window", [
    (Preprocessing(), (DEFAULT_TILE, DEFAULT_TILE)),                 # nothing recorded
    (Preprocessing(tile_size=128), (128, 128)),                      # an explicit override
    (Preprocessing(resize=(176, 240)), (176, 240)),                  # format 1: from resize
    (Preprocessing(resize=(176, 240), tile_size=256), (176, 240)),   # the issue's own case
    (Preprocessing(train_size=(96, 96), tile_size=(64, 200)), (64, 96)),
    (Preprocessing(resize=(512, 512), train_size=(256, 256)), (256, 256)),  # crops of a resize
])
def test_inference_window(pre: Preprocessing, window: tuple[int, int]) -> None:
    assert pre.inference_window() == window


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="tile_size: expected an int or \\[H, W\\]"):
        Preprocessing(tile_size=(1, 2, 3))
    with pytest.raises(ValueError, match="train_size must be positive"):
        Preprocessing(train_size=(0, 4))


def test_windows_never_pad_an_image_smaller_than_the_tile() -> None:
    """An image below the window is one forward on exactly its own pixels."""
    seen: list[tuple[int, ...]] = []
    model = UNet(ModelConfig(in_channels=3, num_classes=2, depth=2, base_width=4)).eval()
    model.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    Segmenter.from_model(model, MaskSpec(2), Preprocessing(tile_size=256)).predict(
        np.zeros((37, 50, 3), np.uint8))
    assert seen == [(1, 3, 37, 50)]


def test_reference_module_stays_independent() -> None:
    source = (Path(__file__).parents[1] / "geometry_reference.py").read_text()
    assert "seg_core.inference" not in source.replace("``seg_core.inference``", "")
    assert "seg_core.tiling" not in source.replace("``seg_core.tiling``", "")
