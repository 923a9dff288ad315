"""Per-class clean-up of predicted masks, and the choice of it on validation data.

nnU-Net decides per class, on cross-validation, whether keeping the largest connected component
helps, and applies it only where it does; MONAI offers ``KeepLargestConnectedComponent``,
``RemoveSmallObjects`` and ``FillHoles``.  Here the three rules of
:class:`seg_core.config.PostProcess` are applied by :func:`apply` (every engine, through the
:class:`~seg_core.inference.Segmenter`, so batch, online and evaluate give the same mask), and
:func:`choose` picks them per class on the val split: a rule is kept only where it raises that
class's Dice by more than :data:`TOLERANCE` and lowers no other class's Dice.

Connected regions are 4-connected (``scipy.ndimage.label``'s default, and scikit-image's
``connectivity=1``).  The rules run on the host on the uint8 mask, which every prediction copies
back from the device anyway: on a GPU they add no transfer, only the host's labelling time.
Class 0 of a multi-class mask is the background and gets no rules (removed pixels become it).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from seg_core.config import MaskSpec, PostProcess

TOLERANCE = 0.002   # Dice a rule must add to its class on val to be kept
MIN_SIZE_CANDIDATES = (10, 30, 100, 300, 1000)   # pixels; the best gain among them is tried


def apply(mask: np.ndarray, rules: PostProcess, *, multilabel: bool) -> np.ndarray:
    """``mask`` (H x W class ids, or K x H x W {0, 1}) with ``rules`` applied, class by class
    in class order; ``mask`` itself is left as it is (the result is a copy when a rule ran)."""
    if not rules.active:
        return mask
    out = mask.copy()
    classes = out.shape[0] if multilabel else len(rules.min_size or rules.fill_holes
                                                   or rules.keep_largest)
    for k in range(0 if multilabel else 1, classes):
        fill = bool(rules.fill_holes and rules.fill_holes[k])
        size = int(rules.min_size[k]) if rules.min_size else 0
        largest = bool(rules.keep_largest and rules.keep_largest[k])
        if not (fill or size or largest):
            continue
        plane = out[k].astype(bool) if multilabel else out == k
        cleaned = clean_plane(plane, fill_holes=fill, min_size=size, keep_largest=largest)
        if multilabel:
            out[k] = cleaned
        else:
            out[plane & ~cleaned] = 0
            out[cleaned & ~plane] = k
    return out


def clean_plane(plane: np.ndarray, *, fill_holes: bool = False, min_size: int = 0,
                keep_largest: bool = False) -> np.ndarray:
    """One binary plane with the rules applied (fill holes, drop small regions, keep the
    largest), as a new bool array."""
    from scipy import ndimage

    out = ndimage.binary_fill_holes(plane) if fill_holes else plane.copy()
    if min_size or keep_largest:
        labels, count = ndimage.label(out)
        if count:
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            sizes[0] = 0
            keep = sizes >= max(min_size, 1)
            if keep_largest:
                keep &= np.arange(count + 1) == int(np.argmax(sizes))
            keep[0] = False
            out = keep[labels]
    return out.astype(bool)


def class_dice(pairs: Sequence[tuple[np.ndarray, np.ndarray]], spec: MaskSpec) -> np.ndarray:
    """Dice per class, micro over ``pairs`` of (predicted, true) masks; pixels whose truth is
    ``spec.ignore_index`` are left out.  A class absent from both gets Dice 1."""
    k = spec.num_classes
    tp, fp, fn = (np.zeros(k, np.int64) for _ in range(3))
    for pred, truth in pairs:
        if spec.multilabel:
            valid = truth != spec.ignore_index
            p, t = pred.astype(bool) & valid, (truth == 1) & valid
            tp += (p & t).reshape(k, -1).sum(1)
            fp += (p & ~t).reshape(k, -1).sum(1)
            fn += (~p & t).reshape(k, -1).sum(1)
            continue
        valid = truth != spec.ignore_index
        p, t = pred[valid].astype(np.int64), truth[valid].astype(np.int64)
        joint = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
        tp += np.diag(joint)
        fp += joint.sum(0) - np.diag(joint)
        fn += joint.sum(1) - np.diag(joint)
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)


def choose(pairs: Sequence[tuple[np.ndarray, np.ndarray]], spec: MaskSpec, *,
           tolerance: float = TOLERANCE) -> tuple[PostProcess, dict[str, Any]]:
    """The rules to keep, and the evidence, from val ``pairs`` of (raw predicted, true) masks.

    Greedy, one class after another: ``fill_holes``, then the best ``min_size`` of
    :data:`MIN_SIZE_CANDIDATES`, then ``keep_largest``, each kept when it raises the class's
    Dice by more than ``tolerance`` and lowers no class's Dice, with the rules kept so far
    applied.  So the chosen rules never lower any class's val Dice.
    """
    k = spec.num_classes
    rules = PostProcess(min_size=(0,) * k, fill_holes=(False,) * k, keep_largest=(False,) * k)
    first = scores = class_dice(pairs, spec)
    evidence: dict[str, Any] = {"tolerance": tolerance, "images": len(pairs),
                                "min_size_candidates": list(MIN_SIZE_CANDIDATES), "classes": {}}

    def scored(candidate: PostProcess) -> np.ndarray:
        return class_dice([(apply(p, candidate, multilabel=spec.multilabel), t)
                           for p, t in pairs], spec)

    for c in range(0 if spec.multilabel else 1, k):
        tried: dict[str, float] = {}
        kept: list[str] = []
        for name, options in (("fill_holes", [True]), ("min_size", MIN_SIZE_CANDIDATES),
                              ("keep_largest", [True])):
            best = None
            for option in options:
                candidate = _with(rules, name, c, option)
                after = scored(candidate)
                label = name if option is True else f"{name} {option}"
                tried[label] = round(float(after[c]), 6)
                gain = after[c] - scores[c]
                if gain > tolerance and (after >= scores - 1e-12).all() and (
                        best is None or after[c] > best[1][c]):
                    best = (candidate, after, label)
            if best is not None:
                rules, scores = best[0], best[1]
                kept.append(best[2])
        evidence["classes"][spec.names[c]] = {"dice_before": round(float(first[c]), 6),
                                              "dice_after": round(float(scores[c]), 6),
                                              "tried": tried, "kept": kept}
    evidence["mean_dice_before"] = round(float(np.mean(first)), 6)
    evidence["mean_dice_after"] = round(float(np.mean(scores)), 6)
    return (rules if rules.active else PostProcess()), evidence


def _with(rules: PostProcess, name: str, k: int, value: Any) -> PostProcess:
    values = list(getattr(rules, name))
    values[k] = value
    return PostProcess(**{**{f: getattr(rules, f) for f in ("min_size", "fill_holes",
                                                             "keep_largest")},
                          name: tuple(values)})
