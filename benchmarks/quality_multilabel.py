"""``quality_multilabel``: multi-label mIoU through the H2O-style estimator vs a plain PyTorch loop.

The data is :func:`seg_core.sample_data.generate_sample_dataset` with ``multilabel=True``: 160
scenes of 96x144 (non-square; 120 train / 40 val) with three classes (disc, rectangle, triangle)
that overlap and are blended where they do, one PNG per class.  Triangles are drawn with
probability 0.06 against 0.47 for each other shape, so ``triangle`` is the rare class.

- **rayseg**: the README's flow: ``import_file``, the manifest's splits as frames,
  ``UNetSegmentationEstimator(multilabel=True, num_classes=3, ...)`` (``bce_dice``, base width
  16, depth 4, defaults otherwise) ``.train()`` with ``max_runtime_secs`` = the budget (150 s)
  and the planned epochs, then ``model_performance(valid)``: the ``rayseg evaluate`` code, at
  full resolution.  ``RAYSEG_ML_POS_WEIGHT=auto`` (or ``w0,w1,w2``) sets ``pos_weight`` on this
  side only.
- **plain**: :mod:`benchmarks.plain` with this module's sigmoid BCE + soft Dice
  (:func:`bce_dice`, written here without rayseg's losses): the same model, optimizer settings,
  schedule span, flips and rot90, budget and threads, channels_last.  Predictions are one
  forward per whole val image, ``sigmoid >= 0.5``.

Both sides score each class as its own binary problem: tp / fp / fn summed over every val pixel,
IoU per class, mIoU = mean over classes (a class absent from truth and prediction is left out).
The sides alternate over two rounds (rayseg, plain, then plain, rayseg; round r uses seed r).
``ratio`` = mean rayseg mIoU / mean plain mIoU; the goal is >= 0.95.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import Context
from benchmarks.common import result, torch_threads
from benchmarks.plain import (binary_counts, class_table, iou_scores, load_split, plan_epochs,
                              predict_plain, rounded, train_plain)
from seg_core.sample_data import SHAPES, generate_sample_dataset

SHAPE_PROBS = (0.47, 0.47, 0.06)  # triangle is rare
CLASS_NAMES = SHAPES[:3]


def bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid BCE over pixels and classes + (1 - soft Dice) averaged over classes."""
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target)
    probs = logits.float().sigmoid()
    intersection = (probs * target).sum(dim=(0, 2, 3))
    dice = (2 * intersection + 1) / (probs.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3)) + 1)
    return bce + (1 - dice).mean()


def pos_weight_override() -> dict[str, Any]:
    """``pos_weight`` from ``RAYSEG_ML_POS_WEIGHT`` (``auto`` or a comma list), if set."""
    raw = os.environ.get("RAYSEG_ML_POS_WEIGHT", "").strip()
    if not raw:
        return {}
    return {"pos_weight": "auto" if raw == "auto" else [float(v) for v in raw.split(",")]}


def run(ctx: Context) -> dict[str, Any]:
    from pipelines.api import import_file, init
    from pipelines.config import load_train_config

    budget = float(os.environ.get("RAYSEG_ML_BUDGET_S", 0)) or (2.0 if ctx.quick else 150.0)
    n, size, rounds = (24, (48, 72), 1) if ctx.quick else (160, (96, 144), 2)
    model_size = {"base_width": 8, "depth": 3} if ctx.quick else {"base_width": 16, "depth": 4}
    work = ctx.work_dir / "multilabel"
    shutil.rmtree(work, ignore_errors=True)
    manifest = generate_sample_dataset(work / "data", n=n, size=size, num_classes=3, seed=0,
                                       formats=("png",), multilabel=True, val_fraction=0.25,
                                       shape_probs=SHAPE_PROBS)
    threads = max(1, int(init(work_dir=work / "work").get("CPU", 1)))
    base = load_train_config(None, [
        f"data.manifest={manifest}", "model.num_classes=3", "mask.num_classes=3",
        "mask.multilabel=true", "loss=bce_dice", *(f"model.{k}={v}" for k, v in
                                                    model_size.items())])
    train_split, val_split = (load_split(manifest, s, base) for s in ("train", "val"))
    frames = import_file(manifest)
    train_frame, valid_frame = frames.filter(split="train"), frames.filter(split="val")
    with torch_threads(threads):
        step_s = train_plain(base, train_split, epochs=1, budget_s=math.inf, max_steps=7,
                             loss_fn=bce_dice).step_s
        epochs = plan_epochs(budget, math.ceil(len(train_split.images) / base.batch_size),
                             step_s, len(val_split.images))
        runs: dict[str, list[dict[str, Any]]] = {"rayseg": [], "plain": []}
        order = [("rayseg", "plain"), ("plain", "rayseg")][:rounds]
        for seed, sides in enumerate(order):
            for side in sides:
                if side == "rayseg":
                    runs[side].append(estimator_side(train_frame, valid_frame, epochs=epochs,
                                                     budget_s=budget, threads=threads,
                                                     seed=seed, model_size=model_size))
                else:
                    runs[side].append(plain_side(base, train_split, val_split, epochs=epochs,
                                                 budget_s=budget, seed=seed))
    share = val_split.masks.mean(axis=(0, 2, 3)) * 100
    mean_iou = {side: [rounded(statistics.mean(values)) for values in
                       zip(*([v if v is not None else math.nan for v in r["iou"]] for r in rs))]
                for side, rs in runs.items()}
    print(class_table(CLASS_NAMES, share, {f"{s} IoU": v for s, v in mean_iou.items()}),
          flush=True)
    figures: dict[str, Any] = {
        "rayseg_miou": rounded(statistics.mean(r["miou"] for r in runs["rayseg"])),
        "plain_miou": rounded(statistics.mean(r["miou"] for r in runs["plain"])),
        "rounds": rounds, "order": " / ".join(", ".join(s) for s in order),
        "classes": list(CLASS_NAMES), "class_share_val_pct": [round(float(s), 2) for s in share],
        "rayseg_iou": mean_iou["rayseg"], "plain_iou": mean_iou["plain"],
        "epochs_planned": epochs, "budget_s": budget, "plain_step_s": round(step_s, 3),
        "threads": threads, "size": list(size), "shape_probs": list(SHAPE_PROBS),
        "pos_weight": pos_weight_override().get("pos_weight"),
        "train_val_images": [len(train_split.images), len(val_split.images)],
    }
    for side, rs in runs.items():
        for key in rs[0]:
            if key != "iou":
                figures[f"{side}_{key}_per_round"] = [r[key] for r in rs]
    return result("quality_multilabel", figures, ("rayseg_miou", "/", "plain_miou"),
                  ">=0.95 (mean rayseg mIoU / mean plain mIoU over the rounds)")


def estimator_side(train_frame: Any, valid_frame: Any, *, epochs: int, budget_s: float,
                   threads: int, seed: int, model_size: dict[str, int]) -> dict[str, Any]:
    """The README's estimator flow with ``seed``, scored by ``model_performance``."""
    from pipelines.api import UNetSegmentationEstimator

    model = UNetSegmentationEstimator(
        x="image", y="mask", training_frame=train_frame, validation_frame=valid_frame,
        seed=seed, multilabel=True, num_classes=3, class_names=list(CLASS_NAMES),
        epochs=epochs, max_runtime_secs=budget_s, torch_threads=threads,
        artifact_weights="last", log_every_steps=0, **model_size, **pos_weight_override())
    started = time.perf_counter()
    model.train()
    train_s = time.perf_counter() - started
    perf = model.model_performance(valid_frame)
    history = model.train_result.history
    return {"miou": rounded(perf.mean_iou()), "iou": [rounded(v) for v in perf.per_class["iou"]],
            "dice": [rounded(v) for v in perf.per_class["dice"]], "epochs": len(history),
            "steps": history[-1]["step"], "train_wall_s": round(train_s, 1)}


def plain_side(base: Any, train_split: Any, val_split: Any, *, epochs: int, budget_s: float,
               seed: int) -> dict[str, Any]:
    """The plain loop with ``seed``, scored per class on the val split."""
    run = train_plain(dataclasses.replace(base, seed=seed), train_split, epochs=epochs,
                      budget_s=budget_s, loss_fn=bce_dice)
    found = iou_scores(sum(binary_counts(p, t) for p, t in
                           zip(predict_plain(run.model, val_split, multilabel=True),
                               val_split.full_masks)))
    return {"miou": rounded(found["miou"]), "iou": [rounded(v) for v in found["iou"]],
            "epochs": run.epochs, "steps": run.steps, "train_s": round(run.seconds, 1)}
