"""``quality_multiclass``: multi-class mIoU, ``rayseg train`` + ``rayseg evaluate`` vs a plain loop.

The data is :mod:`benchmarks.scene_data`: 200 street scenes of 120x184 (160 train / 40 val) with
six classes, two of them under 2% of the pixels, colour twins told apart by vertical position
(sky/water, wall/road) and void (255) boundaries and blobs, generated under the work dir.

- **rayseg**: :func:`pipelines.train.train.train` with the config a user would write (six named
  classes, ``ignore_index`` 255, base width 16, depth 4, ``dice_ce``, native size, no up-down
  flips, everything else default), ``max_runtime_secs`` = the budget (240 s) and the planned
  epochs; scored by :func:`pipelines.evaluate.evaluate.run_evaluate` (``rayseg evaluate --model
  URI --manifest M --split val``) at full resolution.  ``RAYSEG_MC_CLASS_WEIGHTS`` (``auto`` or
  ``w0,w1,...``) sets ``class_weights`` on this side only.
- **plain**: :mod:`benchmarks.plain`: the same model, loss, optimizer settings, schedule span,
  flips, wall budget and torch threads, channels_last, on the same train split held in memory;
  one forward per whole val image, argmax, scored by :func:`benchmarks.plain.scores`.

Both sides score alike: ignored pixels skipped, counts summed over all val pixels, a class absent
from truth and prediction left out of the mean.  The two sides run in alternating order over two
rounds (rayseg, plain, then plain, rayseg; round r uses seed r), so drifting load on a shared
machine hits both.  ``ratio`` = mean rayseg mIoU / mean plain mIoU over the rounds.  ``--quick``
is one round of a few seconds each on small scenes: a smoke run whose ratio is noise.
"""
from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import Context
from benchmarks.common import result, torch_threads
from benchmarks.plain import (class_table, confusion, load_split, plan_epochs, predict_plain,
                              rounded, scores, train_plain)
from benchmarks.scene_data import CLASS_NAMES, IGNORE_INDEX, generate_scene_dataset


def class_weights_override() -> list[str]:
    """``class_weights=...`` from ``RAYSEG_MC_CLASS_WEIGHTS`` (``auto`` or a comma list), if set."""
    raw = os.environ.get("RAYSEG_MC_CLASS_WEIGHTS", "").strip()
    if not raw:
        return []
    if raw == "auto":
        return ["class_weights=auto"]
    try:
        weights = [float(v) for v in raw.split(",")]
    except ValueError:
        raise ValueError(f"RAYSEG_MC_CLASS_WEIGHTS: expected 'auto' or {len(CLASS_NAMES)} "
                         f"comma-separated numbers, got {raw!r}") from None
    return [f"class_weights={weights}"]


def user_config(manifest: Path, extra: list[str], quick: bool = False) -> Any:
    """The settings a user would write for this data, plus ``extra`` overrides."""
    from pipelines.config import load_train_config

    k = len(CLASS_NAMES)
    size = ["model.base_width=8", "model.depth=3"] if quick else \
        ["model.base_width=16", "model.depth=4"]
    return load_train_config(None, [
        f"data.manifest={manifest}", f"model.num_classes={k}", f"mask.num_classes={k}",
        f"mask.class_names=[{', '.join(CLASS_NAMES)}]", f"mask.ignore_index={IGNORE_INDEX}",
        *size, "model.in_channels=3", "preprocessing.channels=3", "loss=dice_ce",
        # sky/water and wall/road differ only by height in the image: no up-down flips
        "augment.vflip=false", *extra])


def run(ctx: Context) -> dict[str, Any]:
    from pipelines.raycluster import ensure_ray

    budget = float(os.environ.get("RAYSEG_MC_BUDGET_S", 0)) or (2.0 if ctx.quick else 240.0)
    n, size, rounds = (24, (48, 72), 1) if ctx.quick else (200, (120, 184), 2)
    work = ctx.work_dir / "multiclass"
    shutil.rmtree(work, ignore_errors=True)
    manifest = generate_scene_dataset(work / "data", n=n, size=size, seed=0, val_fraction=0.2)
    threads = max(1, int(ensure_ray().get("CPU", 1)))
    k = len(CLASS_NAMES)
    with torch_threads(threads):   # the plain side gets what the Ray worker gets
        base = user_config(manifest, [], ctx.quick)
        train_split, val_split = (load_split(manifest, s, base) for s in ("train", "val"))
        step_s = train_plain(base, train_split, epochs=1, budget_s=math.inf,
                             max_steps=7).step_s
        epochs = plan_epochs(budget, math.ceil(len(train_split.images) / base.batch_size),
                             step_s, len(val_split.images))
        runs: dict[str, list[dict[str, Any]]] = {"rayseg": [], "plain": []}
        order = [("rayseg", "plain"), ("plain", "rayseg")][:rounds]
        for seed, sides in enumerate(order):
            for side in sides:
                if side == "rayseg":
                    runs[side].append(rayseg_side(manifest, work, epochs=epochs, budget_s=budget,
                                                  threads=threads, seed=seed, quick=ctx.quick))
                else:
                    runs[side].append(plain_side(base, train_split, val_split, epochs=epochs,
                                                 budget_s=budget, seed=seed))
    share = np.bincount(val_split.masks.ravel(), minlength=256) / val_split.masks.size
    mean_iou = {side: [statistics.mean(v for v in values if v is not None) if
                       any(v is not None for v in values) else None
                       for values in zip(*(r["iou"] for r in rs))] for side, rs in runs.items()}
    print(class_table(CLASS_NAMES, share[:k] * 100, {f"{s} IoU": v for s, v in
                                                     mean_iou.items()}), flush=True)
    figures: dict[str, Any] = {
        "rayseg_miou": rounded(statistics.mean(r["miou"] for r in runs["rayseg"])),
        "plain_miou": rounded(statistics.mean(r["miou"] for r in runs["plain"])),
        "rounds": rounds, "order": " / ".join(", ".join(s) for s in order),
        "classes": list(CLASS_NAMES),
        "class_share_val_pct": [round(100 * float(s), 2) for s in share[:k]],
        "void_share_val_pct": round(100 * float(share[IGNORE_INDEX]), 2),
        "rayseg_iou": mean_iou["rayseg"], "plain_iou": mean_iou["plain"],
        "epochs_planned": epochs, "budget_s": budget, "plain_step_s": round(step_s, 3),
        "threads": threads, "size": list(size),
        "train_val_images": [len(train_split.images), len(val_split.images)],
        "class_weights": runs["rayseg"][0]["class_weights"],
    }
    for side, rs in runs.items():
        for key in rs[0]:
            if key not in ("iou", "class_weights"):
                figures[f"{side}_{key}_per_round"] = [r[key] for r in rs]
    return result("quality_multiclass", figures, ("rayseg_miou", "/", "plain_miou"),
                  ">=0.98 (mean rayseg mIoU / mean plain mIoU over the rounds)")


def rayseg_side(manifest: Path, work: Path, *, epochs: int, budget_s: float, threads: int,
                seed: int, quick: bool) -> dict[str, Any]:
    """``rayseg train`` with the user's settings, then ``rayseg evaluate --model --split val``."""
    from pipelines.evaluate.evaluate import EvaluateConfig, run_evaluate
    from pipelines.train.train import train

    cfg = user_config(manifest, [
        f"epochs={epochs}", f"max_runtime_secs={budget_s}", "artifact_weights=last",
        f"scaling.torch_threads={threads}", f"version=bench-{time.strftime('%Y%m%d-%H%M%S')}",
        "log_every_steps=0", f"seed={seed}", "register=false",
        f"storage.storage_path={work}/ray_results", f"storage.models_uri={work}/models",
        *class_weights_override()], quick)
    started = time.perf_counter()
    trained = train(cfg)
    train_s = time.perf_counter() - started
    # bootstrap and overlays only add intervals and pictures; the scores are the same
    report = run_evaluate(EvaluateConfig(manifest=str(manifest), out=str(work / f"eval-{seed}"),
                                         model=trained.artifact_uri, split="val", bootstrap=0,
                                         overlays=0, progress=False))
    macro = report["metrics"]["macro"]
    return {"miou": rounded(macro["iou"]), "iou": [rounded(v) for v in macro["per_class"]["iou"]],
            "pixel_accuracy": rounded(macro["pixel_accuracy"]),
            "epochs": len(trained.history), "steps": trained.history[-1]["step"],
            "stopped": trained.stopped, "train_wall_s": round(train_s, 1),
            "evaluate_s": round(time.perf_counter() - started - train_s, 1),
            "class_weights": cfg.class_weights}


def plain_side(base: Any, train_split: Any, val_split: Any, *, epochs: int, budget_s: float,
               seed: int) -> dict[str, Any]:
    """The plain loop with ``seed``, scored on the val split."""
    import dataclasses

    run = train_plain(dataclasses.replace(base, seed=seed), train_split, epochs=epochs,
                      budget_s=budget_s)
    k = len(CLASS_NAMES)
    found = scores(sum(confusion(p, t, k) for p, t in
                       zip(predict_plain(run.model, val_split), val_split.full_masks)))
    return {"miou": rounded(found["miou"]), "iou": [rounded(v) for v in found["iou"]],
            "pixel_accuracy": rounded(found["pixel_accuracy"]), "epochs": run.epochs,
            "steps": run.steps, "train_s": round(run.seconds, 1)}
