"""Metrics: hand-computed counts and scores on tiny masks written out in full."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seg_core.config import MaskSpec
from seg_core.metrics import (
    COUNT_NAMES,
    compute_metrics,
    confusion_counts,
    confusion_matrix,
    mask_counts,
    multilabel_counts,
    per_image_counts,
)

IGN = 255
# 2x3 masks, K = 3.  Pixel by pixel (target -> pred):
#   (0,0) 0->0 ok   (0,1) 1->1 ok   (0,2) ignored
#   (1,0) 2->2 ok   (1,1) 2->0      (1,2) 0->1
TARGET = np.array([[0, 1, IGN], [2, 2, 0]])
PRED = np.array([[0, 1, 1], [2, 0, 1]])


def test_confusion_matrix_by_hand() -> None:
    cm = confusion_matrix(PRED, TARGET, 3, IGN)
    expected = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]])  # rows: target, cols: pred
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, expected)


def test_counts_by_hand_with_ignore_index() -> None:
    counts = confusion_counts(PRED, TARGET, 3, IGN)
    np.testing.assert_array_equal(counts["tp"], [1, 1, 1])
    np.testing.assert_array_equal(counts["fp"], [1, 1, 0])
    np.testing.assert_array_equal(counts["fn"], [1, 0, 1])
    np.testing.assert_array_equal(counts["tn"], [2, 3, 3])  # 5 kept pixels each


def test_scores_by_hand_macro_and_micro() -> None:
    counts = confusion_counts(PRED, TARGET, 3, IGN)
    macro = compute_metrics(**counts, reduction="macro")
    assert macro["per_class"]["iou"] == pytest.approx([1 / 3, 1 / 2, 1 / 2])
    assert macro["per_class"]["dice"] == pytest.approx([1 / 2, 2 / 3, 2 / 3])
    assert macro["per_class"]["precision"] == pytest.approx([1 / 2, 1 / 2, 1.0])
    assert macro["per_class"]["recall"] == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert macro["per_class"]["support"] == [2, 1, 2]
    assert macro["iou"] == pytest.approx(4 / 9)
    assert macro["dice"] == pytest.approx((1 / 2 + 4 / 3) / 3)
    assert macro["pixel_accuracy"] == pytest.approx(3 / 5)
    micro = compute_metrics(**counts, reduction="micro")
    assert micro["iou"] == pytest.approx(3 / 7)  # 3 / (3 + 2 + 2)
    assert micro["precision"] == pytest.approx(3 / 5) and micro["recall"] == pytest.approx(3 / 5)
    assert micro["reduction"] == "micro" and micro["empty_policy"] == "nan"


@pytest.mark.parametrize("policy,expected_class1,expected_mean", [
    ("nan", math.nan, 1.0), ("one", 1.0, 1.0), ("zero", 0.0, 0.5),
])
def test_both_empty_follows_the_stated_policy(
    policy: str, expected_class1: float, expected_mean: float
) -> None:
    target = np.array([[0, 0, 0], [0, 0, IGN]])  # class 1 absent from target ...
    pred = np.array([[0, 0, 0], [0, 0, 1]])  # ... and only "predicted" on an ignored pixel
    result = compute_metrics(**confusion_counts(pred, target, 2, IGN), empty_policy=policy)
    assert result["empty_policy"] == policy
    assert result["empty_classes"] == [1]
    for name in ("iou", "dice", "precision", "recall"):
        np.testing.assert_equal(result["per_class"][name], [1.0, expected_class1])
        assert result[name] == pytest.approx(expected_mean)


def test_one_sided_empty_scores_zero_not_policy() -> None:
    target = np.array([[0, 0, 1], [0, 0, 0]])  # class 1 present, never predicted
    pred = np.zeros((2, 3), dtype=np.int64)
    result = compute_metrics(**confusion_counts(pred, target, 2, IGN), empty_policy="one")
    assert result["per_class"]["iou"] == pytest.approx([5 / 6, 0.0])
    assert result["per_class"]["precision"] == pytest.approx([5 / 6, 0.0])
    assert result["per_class"]["recall"] == pytest.approx([1.0, 0.0])
    assert result["empty_classes"] == []


def test_everything_ignored_uses_policy_for_pixel_accuracy() -> None:
    target = np.full((2, 3), IGN)
    counts = confusion_counts(np.zeros((2, 3), dtype=np.int64), target, 2, IGN)
    assert all(int(v.sum()) == 0 for v in counts.values())
    assert math.isnan(compute_metrics(**counts)["pixel_accuracy"])
    assert compute_metrics(**counts, empty_policy="zero")["pixel_accuracy"] == 0.0


def test_per_image_reduction_by_hand() -> None:
    target = np.array([[[0, 0, 0], [1, 1, 1]], [[0, 0, 0], [0, 0, 0]]])
    pred = np.array([[[0, 0, 0], [1, 1, 1]], [[0, 0, 0], [0, 0, 1]]])
    counts = per_image_counts(pred, target, 2, IGN)
    np.testing.assert_array_equal(counts["tp"], [[3, 3], [5, 0]])
    np.testing.assert_array_equal(counts["fp"], [[0, 0], [0, 1]])
    np.testing.assert_array_equal(counts["fn"], [[0, 0], [1, 0]])
    result = compute_metrics(**counts, reduction="per_image")
    # image 0: IoU (1, 1) -> 1 ; image 1: class 0 5/6, class 1 0/1 -> 5/12
    assert result["per_image"]["iou"] == pytest.approx([1.0, 5 / 12])
    assert result["iou"] == pytest.approx((1 + 5 / 12) / 2)
    assert result["per_class"]["iou"] == pytest.approx([(1 + 5 / 6) / 2, 0.5])
    assert result["pixel_accuracy"] == pytest.approx((1 + 5 / 6) / 2)
    macro = compute_metrics(**counts, reduction="macro")  # summed first: (8/9 + 3/4) / 2
    assert macro["iou"] == pytest.approx((8 / 9 + 3 / 4) / 2)


def test_per_image_counts_sum_to_whole_and_workers_add() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (6, 9, 7))
    target[rng.random(target.shape) < 0.2] = IGN
    pred = rng.integers(0, 4, (6, 9, 7))
    whole = confusion_counts(pred, target, 4, IGN)
    per_image = per_image_counts(pred, target, 4, IGN)
    worker_a = confusion_counts(pred[:2], target[:2], 4, IGN)
    worker_b = confusion_counts(pred[2:], target[2:], 4, IGN)
    for name in ("tp", "fp", "fn", "tn"):
        np.testing.assert_array_equal(per_image[name].sum(axis=0), whole[name])
        np.testing.assert_array_equal(worker_a[name] + worker_b[name], whole[name])


def test_multilabel_counts_by_hand() -> None:
    target = np.array([
        [[1, 1, 0], [0, IGN, 0]],  # channel 0, pixel (1,1) ignored
        [[1, 0, 0], [1, 1, 0]],  # channel 1 overlaps channel 0 at (0,0)
    ])
    pred = np.array([
        [[1, 0, 0], [1, 1, 0]],
        [[1, 0, 1], [1, 0, 0]],
    ])
    counts = multilabel_counts(pred, target, ignore_index=IGN)
    np.testing.assert_array_equal(counts["tp"], [1, 2])
    np.testing.assert_array_equal(counts["fp"], [1, 1])
    np.testing.assert_array_equal(counts["fn"], [1, 1])
    np.testing.assert_array_equal(counts["tn"], [2, 2])
    result = compute_metrics(**counts, multilabel=True)
    assert result["per_class"]["iou"] == pytest.approx([1 / 3, 1 / 2])
    assert result["pixel_accuracy"] == pytest.approx(7 / 11)  # (3 tp + 4 tn) / 11 kept
    per_img = multilabel_counts(np.stack([pred, pred]), np.stack([target, target]), per_image=True)
    assert per_img["tp"].shape == (2, 2)
    np.testing.assert_array_equal(per_img["tp"].sum(axis=0), [2, 4])


def test_mask_counts_multiclass_by_hand_and_images_add() -> None:
    spec = MaskSpec(num_classes=3, ignore_index=IGN)
    perfect = np.array([[1, 1, 1], [0, 0, 0]])  # a second image, predicted exactly
    first = mask_counts(PRED.astype(np.uint8), TARGET, spec)  # uint8 like Prediction.mask
    second = mask_counts(perfect, perfect, spec)
    expected = {  # TARGET/PRED pixel by pixel (see the top), plus 3 tp each for classes 0 and 1
        "tp": [1 + 3, 1 + 3, 1 + 0],
        "fp": [1, 1, 0],
        "fn": [1, 0, 1],
        "tn": [2 + 3, 3 + 3, 3 + 6],  # 5 + 6 kept pixels minus the class's tp, fp, fn
    }
    for name in COUNT_NAMES:
        assert first[name].dtype == np.int64 and first[name].shape == (3,)
        np.testing.assert_array_equal(first[name] + second[name], expected[name])
    both = mask_counts(np.stack([PRED, perfect]), np.stack([TARGET, perfect]), spec)  # N,H,W
    for name in COUNT_NAMES:
        np.testing.assert_array_equal(both[name], expected[name])
    with pytest.raises(ValueError, match="integer class ids"):  # not silently truncated
        mask_counts(PRED.astype(np.float32), TARGET, spec)


def test_mask_counts_multilabel_by_hand() -> None:
    spec = MaskSpec(num_classes=2, ignore_index=IGN, multilabel=True)
    target = np.array([[[1, 0], [IGN, 1]], [[1, 1], [0, 0]]], dtype=np.uint8)  # K,H,W
    pred = np.array([[[1, 1], [1, 0]], [[1, 0], [0, 0]]], dtype=np.uint8)
    # channel 0: (0,0) tp, (0,1) fp, (1,0) ignored, (1,1) fn
    # channel 1: (0,0) tp, (0,1) fn, (1,0) tn, (1,1) tn
    counts = mask_counts(pred, target, spec)
    expected = {"tp": [1, 1], "fp": [1, 0], "fn": [1, 1], "tn": [0, 2]}
    for name in COUNT_NAMES:
        assert counts[name].dtype == np.int64
        np.testing.assert_array_equal(counts[name], expected[name])


def _pixel_loop_counts(pred: np.ndarray, target: np.ndarray, spec: MaskSpec) -> dict[str, list]:
    """Reference counts, one pixel (multi-label: one pixel-channel) at a time."""
    k = spec.num_classes
    out = {name: [0] * k for name in COUNT_NAMES}
    if spec.multilabel:  # K,H,W: each channel is its own binary mask
        for c in range(k):
            for p, t in zip(pred[c].ravel(), target[c].ravel()):
                if t != spec.ignore_index:
                    name = ("tp" if t == 1 else "fp") if p == 1 else ("fn" if t == 1 else "tn")
                    out[name][c] += 1
        return out
    for p, t in zip(pred.ravel(), target.ravel()):
        if t == spec.ignore_index:
            continue
        for c in range(k):
            name = ("tp" if t == c else "fp") if p == c else ("fn" if t == c else "tn")
            out[name][c] += 1
    return out


@pytest.mark.parametrize("multilabel", [False, True])
def test_mask_counts_match_a_pixel_loop(multilabel: bool) -> None:
    rng = np.random.default_rng(3)
    spec = MaskSpec(num_classes=4, ignore_index=IGN, multilabel=multilabel)
    shape, high = ((4, 7, 5), 2) if multilabel else ((7, 5), 4)
    pred = rng.integers(0, high, shape).astype(np.uint8)
    target = rng.integers(0, high, shape).astype(np.uint8)
    target[rng.random(shape) < 0.2] = IGN
    counts = mask_counts(pred, target, spec)
    for name, values in _pixel_loop_counts(pred, target, spec).items():
        np.testing.assert_array_equal(counts[name], values)


def test_torch_inputs_match_numpy() -> None:
    rng = np.random.default_rng(1)
    target = rng.integers(0, 3, (2, 5, 4))
    target[0, 0] = IGN
    pred = rng.integers(0, 3, (2, 5, 4))
    expected = per_image_counts(pred, target, 3, IGN)
    got = per_image_counts(torch.from_numpy(pred), torch.from_numpy(target), 3, IGN)
    for name in expected:
        assert isinstance(got[name], np.ndarray)
        np.testing.assert_array_equal(got[name], expected[name])
    ml_t, ml_p = (rng.random((2, 3, 4, 4)) < 0.5 for _ in range(2))
    ml_expected = multilabel_counts(ml_p, ml_t.astype(np.uint8))
    ml_got = multilabel_counts(torch.from_numpy(ml_p), torch.from_numpy(ml_t.astype(np.uint8)))
    for name in ml_expected:
        np.testing.assert_array_equal(ml_got[name], ml_expected[name])


def test_scores_stay_within_unit_interval() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        target = rng.integers(0, 5, (3, 4, 4))
        pred = rng.integers(0, 5, (3, 4, 4))
        counts = per_image_counts(pred, target, 5, IGN)
        for reduction in ("micro", "macro", "per_image"):
            result = compute_metrics(**counts, reduction=reduction, empty_policy="one")
            for name in ("iou", "dice", "precision", "recall", "pixel_accuracy"):
                assert 0.0 <= result[name] <= 1.0
            assert max(result["per_class"]["iou"]) <= 1.0


def test_bad_arguments_raise_value_error() -> None:
    expected = r"target values must be 0..2 or ignore_index=255, got \[7\]"
    with pytest.raises(ValueError, match=expected):
        confusion_counts(np.zeros((1, 2), dtype=int), np.array([[7, 0]]), 3, IGN)
    with pytest.raises(ValueError, match=r"pred values must be 0..2, got \[3\]"):
        confusion_counts(np.array([[3, 0]]), np.zeros((1, 2), dtype=int), 3, IGN)
    with pytest.raises(ValueError, match=r"shapes differ: \(2, 3\) vs \(3, 2\)"):
        confusion_matrix(np.zeros((2, 3), dtype=int), np.zeros((3, 2), dtype=int), 2)
    with pytest.raises(ValueError, match="integer class ids, got dtype float"):
        confusion_matrix(np.zeros((2, 3)), np.zeros((2, 3), dtype=int), 2)
    with pytest.raises(ValueError, match=r"tp must be non-negative integers, got \[-1, 2\]"):
        compute_metrics(np.array([-1, 2]), np.zeros(2), np.zeros(2))  # would give IoU > 1
    with pytest.raises(ValueError, match="reduction must be micro, macro or per_image, got 'mean'"):
        compute_metrics(np.ones(2), np.ones(2), np.ones(2), reduction="mean")  # type: ignore
    with pytest.raises(ValueError, match=r"per_image needs N,K counts, got shape \(2,\)"):
        compute_metrics(np.ones(2), np.ones(2), np.ones(2), reduction="per_image")
    with pytest.raises(ValueError, match="needs tn counts"):
        compute_metrics(np.ones(2), np.ones(2), np.ones(2), multilabel=True)
    with pytest.raises(ValueError, match=r"pred_bin values must be 0 or 1.*got \[0.7\]"):
        multilabel_counts(np.full((1, 2, 2), 0.7), np.zeros((1, 2, 2)))
