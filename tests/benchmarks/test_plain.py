"""The quality benchmarks' plain baseline (benchmarks.plain), without Ray: its scorer against hand
counts and seg_core's metrics, its augmentation, its schedule, and tiny runs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.plain import (Split, augment, class_table, confusion, load_split, predict_plain,
                              scores, train_plain, warmup_cosine)
from benchmarks.quality_multiclass import user_config
from benchmarks.scene_data import CLASS_NAMES
from seg_core.engine import WarmupDecay
from seg_core.metrics import compute_metrics, counts_from_confusion

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


def test_scores_give_dice_from_hand_counts() -> None:
    result = scores(confusion(PRED, TRUTH, 4))
    # class 0: tp 1, fp 1, fn 1 -> 2/4; class 1: tp 2, fp 1, fn 1 -> 4/6; class 2: tp 1 -> 1
    assert result["dice"][:3] == pytest.approx([0.5, 4 / 6, 1.0])


def test_augment_moves_image_and_mask_together_and_turns_square_images() -> None:
    images = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
    masks = images[:, 0].astype(np.int64)  # mask = first channel, so pairs stay comparable
    seen = set()
    for seed in range(16):
        out_images, out_masks = augment(images, masks, np.random.default_rng(seed), hflip=True,
                                        vflip=True, rot90=True)
        np.testing.assert_array_equal(out_images[:, 0].astype(np.int64), out_masks)
        assert out_images.flags.c_contiguous and out_images.shape == images.shape
        seen.add(out_masks[0].tobytes())
    assert len(seen) == 8   # all 8 symmetries of the square, from flips and turns


def test_the_schedule_matches_seg_cores_warmup_and_cosine() -> None:
    plain, ours = warmup_cosine(100, 10, 0.05), WarmupDecay(100, 10, "cosine", 0.05)
    assert [plain(s) for s in range(0, 120, 7)] == pytest.approx([ours(s) for s in
                                                                   range(0, 120, 7)])


def test_plain_loop_runs_and_predicts_native_size(tmp_path) -> None:
    cfg = user_config(tmp_path / "manifest.csv", ["model.base_width=4", "model.depth=2",
                                                  "batch_size=2"])
    rng = np.random.default_rng(0)
    masks = rng.integers(0, len(CLASS_NAMES), (3, 24, 40))
    data = Split(rng.standard_normal((3, 3, 24, 40)).astype(np.float32), masks, list(masks))
    run = train_plain(cfg, data, epochs=2, budget_s=60.0)
    assert (run.steps, run.epochs) == (4, 2) and run.step_s > 0
    assert run.final_lr == pytest.approx(0.0)   # the cosine ran its whole span
    predicted = predict_plain(run.model, data)
    assert predicted[0].shape == (24, 40)


def test_a_resized_split_predicts_at_the_original_size(tmp_path) -> None:
    from benchmarks.gpu_check.data import write_membrane_dataset
    from pipelines.config import load_train_config

    root = write_membrane_dataset(tmp_path / "isbi", train=2, val=1, size=(40, 56))
    cfg = load_train_config(None, ["model.in_channels=1", "preprocessing.channels=1",
                                   "preprocessing.mean=[0.5]", "preprocessing.std=[0.2]",
                                   "model.num_classes=2", "mask.num_classes=2",
                                   "mask.mask_values=[0, 255]", "preprocessing.resize=[32, 32]",
                                   "model.base_width=4", "model.depth=2"])
    split = load_split(root / "manifest.csv", "val", cfg, mask_values=(0, 255))
    assert split.images.shape == (1, 1, 32, 32) and split.masks.shape == (1, 32, 32)
    assert split.full_masks[0].shape == (40, 56) and set(np.unique(split.full_masks[0])) <= {0, 1}
    run = train_plain(cfg, load_split(root / "manifest.csv", "train", cfg,
                                      mask_values=(0, 255)), epochs=1, budget_s=60.0)
    assert predict_plain(run.model, split)[0].shape == (40, 56)


def test_class_table_lists_every_class() -> None:
    table = class_table(CLASS_NAMES, np.ones(len(CLASS_NAMES)),
                        {"rayseg IoU": [0.5] * len(CLASS_NAMES),
                         "plain IoU": [None] * len(CLASS_NAMES)})
    assert all(name in table for name in CLASS_NAMES) and "n/a" in table
