"""Segmentation metrics: integer counts first, then a named reduction.

Counting functions return ``int64`` NumPy arrays ``tp, fp, fn, tn`` of shape ``K`` (or ``N, K``
per image).  Counts from different batches or workers simply add, so distributed evaluation
is a sum followed by one :func:`compute_metrics` call; never average per-batch scores.

Inputs may be NumPy arrays or torch tensors; tensors are counted on their own device and only
the small count arrays are copied back.  Pixels whose *target* equals ``ignore_index`` are
left out of every count.

Empty-mask policy (``empty_policy``): a class that is absent from both prediction and target
(``tp + fp + fn == 0``) has every score ``0/0``; the policy sets it to ``nan`` (skipped by the
means), ``1`` or ``0``.  One-sided ``0/0`` (precision when the class was never predicted but is
present; recall when it was predicted but is absent) is an error, scored ``0``.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from seg_core.config import EmptyPolicy, MaskSpec

Reduction = Literal["micro", "macro", "per_image"]
ArrayLike = np.ndarray | torch.Tensor

_POLICY_VALUE = {"nan": np.nan, "one": 1.0, "zero": 0.0}
SCORE_NAMES = ("iou", "dice", "precision", "recall")
COUNT_NAMES = ("tp", "fp", "fn", "tn")
SCORES = ("iou", "dice", "precision", "recall")   # per-class scores compute_metrics gives


def confusion_matrix(
    pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """``K x K`` int64 matrix; row = target class, column = predicted class.

    ``pred`` and ``target`` are integer class ids of the same shape (any shape).
    """
    pred, target = _check_pair(pred, target, num_classes, ignore_index)
    valid = target != ignore_index
    index = _long(target[valid]) * num_classes + _long(pred[valid])
    return _bincount(index, num_classes * num_classes).reshape(num_classes, num_classes)


def counts_from_confusion(matrix: ArrayLike) -> dict[str, np.ndarray]:
    """``tp, fp, fn, tn`` (shape ``...,K``) from confusion matrices of shape ``..., K, K``."""
    cm = _numpy(matrix).astype(np.int64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1).copy()
    fp = cm.sum(axis=-2) - tp  # predicted as k, truly another class
    fn = cm.sum(axis=-1) - tp  # truly k, predicted as another class
    tn = cm.sum(axis=(-2, -1))[..., None] - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def confusion_counts(
    pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int = 255
) -> dict[str, np.ndarray]:
    """Per-class ``tp, fp, fn, tn`` (each int64 shape ``K``) summed over all pixels given."""
    return counts_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


def per_image_counts(
    pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int = 255
) -> dict[str, np.ndarray]:
    """Per-image, per-class counts (each int64 ``N, K``) for class ids of shape ``N,H,W``."""
    pred, target = _check_pair(pred, target, num_classes, ignore_index)
    if pred.ndim != 3:
        raise ValueError(
            f"per_image_counts: expected N,H,W class ids, got shape {tuple(pred.shape)}"
        )
    n, k = pred.shape[0], num_classes
    image = _arange_like(n, target).reshape(n, 1, 1)
    index = (image * k + _long(target)) * k + _long(pred)  # N,H,W flat index into N,K,K
    counts = _bincount(index[target != ignore_index], n * k * k)
    return counts_from_confusion(counts.reshape(n, k, k))


def multilabel_counts(
    pred_bin: ArrayLike, target_bin: ArrayLike, *, ignore_index: int = 255, per_image: bool = False
) -> dict[str, np.ndarray]:
    """Counts for multi-label masks, each class its own binary channel.

    ``pred_bin`` and ``target_bin`` are ``N,K,H,W`` (or ``K,H,W``) with values in ``{0, 1}``;
    ``target_bin == ignore_index`` skips that pixel of that channel.  Returns int64 arrays of
    shape ``K`` (summed over images) or ``N, K`` with ``per_image=True``.
    """
    if tuple(pred_bin.shape) != tuple(target_bin.shape) or pred_bin.ndim not in (3, 4):
        raise ValueError(
            f"multilabel_counts: expected pred and target both N,K,H,W (or K,H,W), got "
            f"{tuple(pred_bin.shape)} and {tuple(target_bin.shape)}"
        )
    if pred_bin.ndim == 3:
        pred_bin, target_bin = pred_bin[None], target_bin[None]
    valid = target_bin != ignore_index
    _check_binary(pred_bin, None, "pred_bin", "0 or 1 (threshold probabilities first)")
    _check_binary(target_bin, valid, "target_bin", f"0, 1 or ignore_index={ignore_index}")
    pred_on, truth_on = (pred_bin == 1) & valid, (target_bin == 1) & valid
    counts = {
        "tp": pred_on & truth_on,
        "fp": pred_on & ~truth_on & valid,
        "fn": ~pred_on & truth_on,
        "tn": ~pred_on & ~truth_on & valid,
    }
    out = {name: _numpy(mask.sum(axis=(-2, -1))).astype(np.int64) for name, mask in counts.items()}
    return out if per_image else {name: value.sum(axis=0) for name, value in out.items()}


def mask_counts(pred: ArrayLike, target: ArrayLike, spec: MaskSpec) -> dict[str, np.ndarray]:
    """``tp, fp, fn, tn`` (int64, ``K`` each) of one mask, or a stack of them, as ``spec`` reads it.

    Multi-class: ``pred`` and ``target`` are class ids of one shape (e.g. ``H, W``), counted by
    :func:`confusion_counts`.  Multi-label: ``K, H, W`` (or ``N, K, H, W``) in ``{0, 1}``,
    counted by :func:`multilabel_counts`.  ``spec.ignore_index`` pixels of ``target`` are skipped.
    """
    if spec.multilabel:
        return multilabel_counts(pred, target, ignore_index=spec.ignore_index)
    return confusion_counts(pred, target, spec.num_classes, spec.ignore_index)


def compute_metrics(
    tp: ArrayLike,
    fp: ArrayLike,
    fn: ArrayLike,
    tn: ArrayLike | None = None,
    reduction: Reduction = "macro",
    empty_policy: EmptyPolicy = "nan",
    multilabel: bool = False,
) -> dict[str, Any]:
    """IoU, Dice (= F1), precision, recall and pixel accuracy from counts.

    Counts are shape ``K`` or ``N, K`` (per image).  Reductions:

    - ``micro``: add counts over classes (and images), then score once.
    - ``macro``: add counts over images, score each class, mean over classes (the usual mIoU).
    - ``per_image``: score each image and class, mean over classes, then over images
      (needs ``N, K`` counts).

    ``pixel_accuracy`` is ``sum(tp) / sum(tp + fn)`` (share of kept pixels labelled right) for
    multi-class counts; with ``multilabel=True`` it is ``sum(tp + tn) / sum(tp + tn + fp + fn)``
    over every pixel-channel and needs ``tn``.  The returned dict states ``reduction`` and
    ``empty_policy``, and lists per-class scores, ``support`` (``tp + fn``) and
    ``empty_classes`` (absent from both prediction and target).
    """
    counts = _validated_counts(tp, fp, fn, tn, reduction, empty_policy, multilabel)
    tp_, fp_, fn_, tn_ = counts
    fill = _POLICY_VALUE[empty_policy]
    image_axis = (0,) if tp_.ndim == 2 else ()
    tp_k, fp_k, fn_k = (x.sum(axis=image_axis) for x in (tp_, fp_, fn_))  # each K
    per_class = _scores(tp_k, fp_k, fn_k, fill)
    result: dict[str, Any] = {"reduction": reduction, "empty_policy": empty_policy}
    if reduction == "micro":
        overall = _scores(tp_k.sum(), fp_k.sum(), fn_k.sum(), fill)
        result.update({k: float(v) for k, v in overall.items()})
    elif reduction == "macro":
        result.update({k: float(_nanmean(v, axis=0)) for k, v in per_class.items()})
    else:
        by_image = _scores(tp_, fp_, fn_, fill)  # each N,K
        image_means = {k: _nanmean(v, axis=1) for k, v in by_image.items()}  # each N
        result.update({k: float(_nanmean(v, axis=0)) for k, v in image_means.items()})
        per_class = {k: _nanmean(v, axis=0) for k, v in by_image.items()}
        result["per_image"] = {k: v.tolist() for k, v in image_means.items()}
    result["pixel_accuracy"] = _pixel_accuracy(tp_, fp_, fn_, tn_, multilabel, reduction, fill)
    result["per_class"] = {k: v.tolist() for k, v in per_class.items()}
    result["per_class"]["support"] = (tp_k + fn_k).tolist()
    result["empty_classes"] = np.flatnonzero(tp_k + fp_k + fn_k == 0).tolist()
    return result


def _validated_counts(
    tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, tn: ArrayLike | None,
    reduction: str, empty_policy: str, multilabel: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Check :func:`compute_metrics` arguments; counts come back as int64 NumPy."""
    if reduction not in ("micro", "macro", "per_image"):
        raise ValueError(
            f"compute_metrics: reduction must be micro, macro or per_image, got {reduction!r}"
        )
    if empty_policy not in _POLICY_VALUE:
        raise ValueError(
            f"compute_metrics: empty_policy must be nan, one or zero, got {empty_policy!r}"
        )
    arrays = [_count_array(x, name) for x, name in ((tp, "tp"), (fp, "fp"), (fn, "fn"))]
    tn_ = None if tn is None else _count_array(tn, "tn")
    shapes = [a.shape for a in arrays] + ([] if tn_ is None else [tn_.shape])
    if len(set(shapes)) != 1:
        raise ValueError(f"compute_metrics: tp, fp, fn (, tn) must share one shape, got {shapes}")
    if reduction == "per_image" and arrays[0].ndim != 2:
        raise ValueError(f"compute_metrics: per_image needs N,K counts, got shape {shapes[0]}")
    if multilabel and tn_ is None:
        raise ValueError("compute_metrics: multilabel pixel accuracy needs tn counts, got None")
    return arrays[0], arrays[1], arrays[2], tn_


def _scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, fill: float) -> dict[str, np.ndarray]:
    """Element-wise scores; ``fill`` where the class is absent from both, 0 for one-sided 0/0."""
    empty = (tp + fp + fn) == 0
    out = {
        "iou": _divide(tp, tp + fp + fn),
        "dice": _divide(2 * tp, 2 * tp + fp + fn),
        "precision": _divide(tp, tp + fp),
        "recall": _divide(tp, tp + fn),
    }
    return {k: np.where(empty, fill, v) for k, v in out.items()}


def _pixel_accuracy(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray | None,
    multilabel: bool, reduction: str, fill: float,
) -> float:
    """Share of correct pixels (or pixel-channels for multi-label), per image when asked."""
    if multilabel:
        tn = np.zeros_like(tp) if tn is None else tn  # the caller insists on tn
        correct, total = tp + tn, tp + tn + fp + fn
    else:
        correct, total = tp, tp + fn  # every kept pixel is a tp or an fn of its true class
    if reduction == "per_image":
        correct, total = correct.sum(axis=1), total.sum(axis=1)  # each N
        return float(_nanmean(np.where(total == 0, fill, _divide(correct, total)), axis=0))
    correct_sum, total_sum = int(correct.sum()), int(total.sum())
    return float(fill) if total_sum == 0 else correct_sum / total_sum


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` as float64, 0 where ``den == 0``."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean ignoring nan; nan (without a warning) where every entry is nan."""
    kept = ~np.isnan(values)
    total = np.where(kept, values, 0.0).sum(axis=axis)
    count = kept.sum(axis=axis)
    return np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)


def _count_array(value: ArrayLike, name: str) -> np.ndarray:
    """Counts as int64 NumPy (shape ``K`` or ``N,K``); rejects negative or fractional counts."""
    arr = _numpy(value)
    if arr.ndim not in (1, 2):
        raise ValueError(f"compute_metrics: {name} must have shape K or N,K, got {arr.shape}")
    if arr.size and (np.any(arr < 0) or np.any(arr != np.round(arr))):
        raise ValueError(
            f"compute_metrics: {name} must be non-negative integers, got {arr.tolist()}"
        )
    return arr.astype(np.int64)


def _check_pair(
    pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int
) -> tuple[ArrayLike, ArrayLike]:
    """Validate equal shapes, integer dtypes and label ranges."""
    if num_classes < 1:
        raise ValueError(f"metrics: num_classes must be >= 1, got {num_classes}")
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"metrics: pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    for name, arr in (("pred", pred), ("target", target)):
        if _is_float(arr):
            raise ValueError(f"metrics: {name} must hold integer class ids, got dtype {arr.dtype}")
    labels = f"0..{num_classes - 1}"
    _raise_if_bad(pred, (pred < 0) | (pred >= num_classes), "pred", labels)
    bad_target = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    _raise_if_bad(target, bad_target, "target", f"{labels} or ignore_index={ignore_index}")
    return pred, target


def _check_binary(arr: ArrayLike, valid: ArrayLike | None, name: str, allowed: str) -> None:
    """Raise unless every (``valid``) entry of ``arr`` is 0 or 1."""
    bad = (arr != 0) & (arr != 1)
    _raise_if_bad(arr, bad if valid is None else bad & valid, name, allowed)


def _raise_if_bad(arr: ArrayLike, bad: ArrayLike, name: str, allowed: str) -> None:
    """ValueError naming up to five offending values when any ``bad`` entry is set."""
    if bool(bad.any()):
        found = np.unique(_numpy(arr[bad]))[:5].tolist()
        raise ValueError(f"metrics: {name} values must be {allowed}, got {found}")


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _is_float(x: ArrayLike) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point()
    return np.issubdtype(np.asarray(x).dtype, np.floating)


def _long(x: ArrayLike) -> ArrayLike:
    return x.long() if isinstance(x, torch.Tensor) else np.asarray(x).astype(np.int64)


def _arange_like(n: int, like: ArrayLike) -> ArrayLike:
    return torch.arange(n, device=like.device) if isinstance(like, torch.Tensor) else np.arange(n)


def _bincount(index: ArrayLike, length: int) -> np.ndarray:
    """``bincount`` with a fixed length, computed on the input's device, returned as int64 NumPy."""
    if isinstance(index, torch.Tensor):
        return torch.bincount(index.flatten(), minlength=length).cpu().numpy().astype(np.int64)
    return np.bincount(np.asarray(index).ravel(), minlength=length).astype(np.int64)
