"""quality_multiclass's own scorer and plain loop, without Ray: hand counts and tiny runs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.bench.quality_multiclass import (Split, class_table, confusion, flip,
                                                predict_plain, scores, train_plain, user_config)
from seg_core.metrics import compute_metrics, counts_from_confusion
from seg_core.scene_data import CLASS_NAMES

TRUTH = np.array([[0, 0, 1, 255],
                  [1, 1, 2, 255]])
PRED = np.array([[0, 1, 1, 2],
                 [1, 0, 2, 0]])


def test_confusion_skips_ignored_truth_pixels() -> None:
    matrix = confusion(PRED, TRUTH, 4, ignore_index=255)
    expected = np.zeros((4, 4), np.int64)
    # row = truth, column = prediction; the two 255 pixels are not counted
    expected[0, 0], expected[0, 1] = 1, 1
    expected[1, 1], expected[1, 0] = 2, 1
    expected[2, 2] = 1
    np.testing.assert_array_equal(matrix, expected)


def test_scores_from_hand_counts_with_an_empty_class() -> None:
    result = scores(confusion(PRED, TRUTH, 4))
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1, fn 1 -> 1/2; class 2: tp 1 -> 1;
    # class 3: absent from truth and prediction -> nan, left out of the mean
    assert result["iou"][:3] == pytest.approx([1 / 3, 1 / 2, 1.0])
    assert math.isnan(result["iou"][3])
    assert result["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert result["pixel_accuracy"] == pytest.approx(4 / 6)


def test_scores_agree_with_seg_core_metrics_macro_nan_policy() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, (30, 40))
    truth[rng.random(truth.shape) < 0.1] = 255
    pred = rng.integers(0, 4, (30, 40))  # class 4 never predicted; class 5 nowhere
    matrix = confusion(pred, truth, 6)
    ours = scores(matrix)
    counts = counts_from_confusion(matrix)
    theirs = compute_metrics(counts["tp"], counts["fp"], counts["fn"], counts["tn"],
                             reduction="macro", empty_policy="nan")
    np.testing.assert_allclose(ours["iou"], theirs["per_class"]["iou"], equal_nan=True)
    assert ours["miou"] == pytest.approx(theirs["iou"])
    assert ours["pixel_accuracy"] == pytest.approx(theirs["pixel_accuracy"])


def test_confusion_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ"):
        confusion(PRED[:, :3], TRUTH, 4)


def test_flip_moves_image_and_mask_together() -> None:
    images = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    masks = images[:, 0].astype(np.int64)  # mask = first channel, so pairs stay comparable
    for seed in range(8):
        out_images, out_masks = flip(images, masks, np.random.default_rng(seed), hflip=True,
                                     vflip=True)
        np.testing.assert_array_equal(out_images[:, 0].astype(np.int64), out_masks)
        assert out_images.flags.c_contiguous and out_images.shape == images.shape


def test_plain_loop_runs_and_predicts_native_size(tmp_path) -> None:
    cfg = user_config(tmp_path / "manifest.csv", ["model.base_width=4", "model.depth=2",
                                                  "batch_size=2"])
    rng = np.random.default_rng(0)
    data = Split(rng.standard_normal((3, 3, 24, 40)).astype(np.float32),
                 rng.integers(0, len(CLASS_NAMES), (3, 24, 40)))
    run = train_plain(cfg, data, epochs=2, budget_s=60.0)
    assert (run.steps, run.epochs) == (4, 2) and run.step_s > 0
    masks = predict_plain(run.model, data.images[:1])
    assert masks[0].shape == (24, 40)


def test_class_table_lists_every_class() -> None:
    table = class_table(np.ones(len(CLASS_NAMES)), [0.5] * len(CLASS_NAMES),
                        [None] * len(CLASS_NAMES))
    assert all(name in table for name in CLASS_NAMES) and "n/a" in table
