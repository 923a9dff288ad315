"""``quality_multilabel``: multi-label mIoU through the H2O-style estimator vs a plain PyTorch loop.

The data is :func:`seg_core.sample_data.generate_sample_dataset` with ``multilabel=True``: 160
scenes of 96x144 (non-square; 120 train / 40 val) with three classes (disc, rectangle, triangle)
that overlap and are blended where they do, one PNG per class.  Triangles are drawn with
probability 0.06 against 0.47 for each other shape, so ``triangle`` is the rare class.  Generated
into ``rayseg_work/bench_multilabel/`` (gitignored).

- **rayseg**: the README's flow: ``import_file``, the manifest's splits as frames,
  ``UNetSegmentationEstimator(multilabel=True, num_classes=3, ...)`` (``bce_dice``, base width
  16, depth 4, defaults otherwise) ``.train()`` with ``max_runtime_secs`` = the budget (150 s;
  30 s with ``quick``; ``RAYSEG_ML_BUDGET_S`` overrides it) and epochs planned from a timed plain
  step, then ``model_performance(valid)``: the ``rayseg evaluate`` code, at full resolution.
  ``RAYSEG_ML_POS_WEIGHT=auto`` (or ``w0,w1,w2``) sets ``pos_weight`` on this side only.
- **plain**: written here without rayseg's loop, losses or inference: the same
  ``seg_core.model.UNet``, AdamW, per-step cosine, sigmoid BCE + soft Dice (this module's
  :func:`bce_dice`), gradient clipping and flips, the same epochs, wall budget and threads.
  Predictions are one forward per whole val image, ``sigmoid >= 0.5``.

Both sides score each class as its own binary problem: tp / fp / fn summed over every val pixel,
IoU per class, mIoU = mean over classes (a class absent from truth and prediction is nan and left
out).  Goal: rayseg mIoU >= 0.95 x the plain loop's.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.bench.quality_multiclass import (class_table, load_split, plan_epochs, rounded,
                                                train_plain)
from pipelines.config import load_train_config
from seg_core.sample_data import SHAPES, generate_sample_dataset

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "rayseg_work" / "bench_multilabel"
SIZE = (96, 144)
N_IMAGES, VAL_FRACTION = 160, 0.25
SHAPE_PROBS = (0.47, 0.47, 0.06)  # triangle is rare
CLASS_NAMES = SHAPES[:3]
MODEL = {"base_width": 16, "depth": 4}


def bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid BCE over pixels and classes + (1 - soft Dice) averaged over classes."""
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target)
    probs = logits.float().sigmoid()
    intersection = (probs * target).sum(dim=(0, 2, 3))
    dice = (2 * intersection + 1) / (probs.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3)) + 1)
    return bce + (1 - dice).mean()


def binary_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """3 x K int64 (tp, fp, fn) of K x H x W {0, 1} prediction against truth."""
    if pred.shape != truth.shape:
        raise ValueError(f"binary_counts: prediction {pred.shape} and truth {truth.shape} differ")
    p, t = pred.astype(bool), truth.astype(bool)
    return np.stack([(p & t).sum(axis=(1, 2)), (p & ~t).sum(axis=(1, 2)),
                     (~p & t).sum(axis=(1, 2))]).astype(np.int64)


def iou_scores(counts: np.ndarray) -> dict[str, Any]:
    """Per-class IoU and their mean from summed (tp, fp, fn); 0/0 is nan and left out."""
    tp, fp, fn = counts.astype(np.float64)
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = ~np.isnan(iou)
    return {"iou": iou.tolist(), "miou": float(iou[present].mean()) if present.any() else math.nan}


@torch.no_grad()
def predict_plain(model: torch.nn.Module, images: np.ndarray) -> list[np.ndarray]:
    """K x H x W {0, 1}: one forward of each whole image, ``sigmoid >= 0.5``."""
    model.eval()
    return [(model(torch.from_numpy(image[None]))[0].sigmoid() >= 0.5).numpy().astype(np.uint8)
            for image in images]


def pos_weight_override() -> dict[str, Any]:
    """``pos_weight`` from ``RAYSEG_ML_POS_WEIGHT`` (``auto`` or a comma list), if set."""
    raw = os.environ.get("RAYSEG_ML_POS_WEIGHT", "").strip()
    if not raw:
        return {}
    return {"pos_weight": "auto" if raw == "auto" else [float(v) for v in raw.split(",")]}


def run(quick: bool = False) -> dict[str, Any]:
    from pipelines.api import UNetSegmentationEstimator, import_file, init

    load_start = os.getloadavg()
    budget = float(os.environ.get("RAYSEG_ML_BUDGET_S", 0)) or (30.0 if quick else 150.0)
    shutil.rmtree(WORK, ignore_errors=True)
    manifest = generate_sample_dataset(WORK / "data", n=N_IMAGES, size=SIZE, num_classes=3,
                                       seed=0, formats=("png",), multilabel=True,
                                       val_fraction=VAL_FRACTION, shape_probs=SHAPE_PROBS)
    threads = max(1, int(init(work_dir=WORK / "work").get("CPU", 1)))
    base = load_train_config(None, [
        f"data.manifest={manifest}", "model.num_classes=3", "mask.num_classes=3",
        "mask.multilabel=true", "loss=bce_dice", *(f"model.{k}={v}" for k, v in MODEL.items())])
    train_split, val_split = (load_split(manifest, s, base) for s in ("train", "val"))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step_s = train_plain(base, train_split, epochs=1, budget_s=math.inf, max_steps=7,
                             loss_fn=bce_dice).step_s
        epochs = plan_epochs(budget, math.ceil(len(train_split.images) / base.batch_size),
                             step_s, len(val_split.images))
        frames = import_file(manifest)  # a pathlib.Path, as generate_sample_dataset returns
        train_frame, valid_frame = frames.filter(split="train"), frames.filter(split="val")
        model = UNetSegmentationEstimator(
            x="image", y="mask", training_frame=train_frame, validation_frame=valid_frame,
            seed=0, multilabel=True, num_classes=3, class_names=list(CLASS_NAMES),
            epochs=epochs, max_runtime_secs=budget, torch_threads=threads,
            artifact_weights="last", log_every_steps=0, **MODEL, **pos_weight_override())
        started = time.perf_counter()
        model.train()
        train_s = time.perf_counter() - started
        perf = model.model_performance(valid_frame)
        plain = train_plain(base, train_split, epochs=epochs, budget_s=budget, loss_fn=bce_dice)
        predictions = predict_plain(plain.model, val_split.images)
    finally:
        torch.set_num_threads(previous)
    plain_scores = iou_scores(sum(binary_counts(p, t)
                                  for p, t in zip(predictions, val_split.masks)))
    ours = [rounded(v) for v in perf.per_class["iou"]]
    theirs = [rounded(v) for v in plain_scores["iou"]]
    share = val_split.masks.mean(axis=(0, 2, 3)) * 100
    print(class_table(share, ours, theirs, CLASS_NAMES), flush=True)
    history = model.train_result.history
    figures = {
        "classes": list(CLASS_NAMES), "class_share_val_pct": [round(float(s), 2) for s in share],
        "rayseg_miou": rounded(perf.mean_iou()), "plain_miou": rounded(plain_scores["miou"]),
        "rayseg_iou": ours, "plain_iou": theirs,
        "rayseg_dice": [rounded(v) for v in perf.per_class["dice"]],
        "rayseg_precision": [rounded(v) for v in perf.per_class["precision"]],
        "rayseg_recall": [rounded(v) for v in perf.per_class["recall"]],
        "epochs_planned": epochs, "rayseg_epochs": len(history),
        "rayseg_steps": history[-1]["step"], "plain_epochs": plain.epochs,
        "plain_steps": plain.steps, "budget_s": budget, "rayseg_train_wall_s": round(train_s, 1),
        "plain_train_s": round(plain.seconds, 1), "plain_step_s": round(step_s, 3),
        "threads": threads, "size": list(SIZE), "shape_probs": list(SHAPE_PROBS),
        "pos_weight": pos_weight_override().get("pos_weight"),
        "train_val_images": [len(train_split.images), len(val_split.images)],
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }
    ratio = perf.mean_iou() / plain_scores["miou"] if plain_scores["miou"] else math.nan
    return {"bench": "quality_multilabel", "figures": figures, "ratio": round(ratio, 3),
            "goal": ">=0.95"}
