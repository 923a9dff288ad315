"""``quality_isbi``: ISBI 2012 val membrane Dice, ``rayseg train`` against a plain PyTorch loop.

Both sides train the model of ``jobs/configs/train_isbi.yaml`` (base-16 U-Net, 256x256 resize,
flips and rot90, AdamW with 20 warmup steps then a cosine, dice + CE, channels_last) on the 24
train slices of the fixed split, in this invocation, one after the other:

- **rayseg**: :func:`pipelines.train.train.train` with that YAML, the planned epochs and the
  whole budget as ``max_runtime_secs`` (which counts from the call: start-up, validation and
  the artifact included; the schedule is fitted to end within it).  Its validation scores full-resolution 512x512
  predictions (the ``Segmenter``, resized back) against the original masks.
- **plain**: :mod:`benchmarks.plain` on the same slices held in memory, the same planned epochs
  (so the same schedule span), the same loop budget and torch threads; one forward per val
  slice at 256x256, probabilities resized back to 512x512, argmax.

The planned epochs fill the loop budget at the plain step time (measured first).  The budget is
600 s (``--quick``: a few seconds on a small model, a smoke run).  ``ratio`` = rayseg membrane
Dice / plain membrane Dice; pixel accuracy is reported beside it.  The rayseg model is copied to
``<work_dir>/isbi_model/`` (``isbi_model_lite/`` with ``RAYSEG_ISBI_ARCH=lite``), where
``rayseg bench engines`` finds it.  The data never enters the repository.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks import REPO, Context
from benchmarks.common import result, torch_threads
from benchmarks.plain import (confusion, load_split, plan_epochs, predict_plain, rounded,
                              scores, train_plain)

MEMBRANE = 0                   # mask value 0 -> class 0
STARTUP_ALLOWANCE_S = 45.0     # Ray worker start, data decode, artifact write (not training)
CONFIG = REPO / "jobs" / "configs" / "train_isbi.yaml"
QUICK = ["preprocessing.resize=[64,64]", "model.base_width=8", "model.depth=3"]


def model_dir_for(ctx: Context, arch: str) -> Path:
    """Where the last rayseg model of ``arch`` is kept (``rayseg bench engines`` reads it)."""
    return ctx.work_dir / ("isbi_model" if arch == "unet" else f"isbi_model_{arch}")


def isbi_config(ctx: Context, threads: int, arch: str, *extra: str) -> Any:
    """``train_isbi.yaml`` on ``ctx``'s slices, with this run's threads, arch and ``extra``."""
    from pipelines.config import load_train_config

    return load_train_config(CONFIG, [
        f"data.manifest={ctx.isbi_manifest()}", f"scaling.torch_threads={threads}",
        f"model.arch={arch}", f"storage.storage_path={ctx.work_dir}/ray_results",
        f"storage.models_uri={ctx.work_dir}/models", "log_every_steps=0",
        *(QUICK if ctx.quick else []), *extra])


def run(ctx: Context) -> dict[str, Any]:
    from pipelines.raycluster import ensure_ray
    from pipelines.train.train import train

    budget = float(os.environ.get("RAYSEG_ISBI_BUDGET_S", 0)) or (3.0 if ctx.quick else 600.0)
    threads = max(1, int(ensure_ray().get("CPU", 1)))  # the data is cached: the loop gets all
    arch = os.environ.get("RAYSEG_ISBI_ARCH", "unet")   # lite: the lite U-Net, same budget
    base = isbi_config(ctx, threads, arch)
    manifest = ctx.isbi_manifest()
    mask_values = tuple(base.mask.mask_values)
    train_split, val_split = (load_split(manifest, s, base, mask_values=mask_values)
                              for s in ("train", "val"))
    loop_budget = budget if ctx.quick else max(budget - STARTUP_ALLOWANCE_S, 10.0)
    with torch_threads(threads):
        step_s = train_plain(base, train_split, epochs=1, budget_s=math.inf, max_steps=7).step_s
        epochs = plan_epochs(loop_budget, math.ceil(len(train_split.images) / base.batch_size),
                             step_s, len(val_split.images))
        cfg = isbi_config(ctx, threads, arch, f"epochs={epochs}",
                          f"max_runtime_secs={budget}", "artifact_weights=last",
                          f"version=bench-{time.strftime('%Y%m%d-%H%M%S')}", "register=false")
        started = time.perf_counter()
        ours = train(cfg)
        rayseg_wall = time.perf_counter() - started
        plain = train_plain(base, train_split, epochs=epochs, budget_s=loop_budget)
        masks = predict_plain(plain.model, val_split)
    model_dir = model_dir_for(ctx, arch)
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(ours.artifact_uri, model_dir)
    print(f"quality_isbi: model written to {model_dir}", flush=True)
    k = base.model.num_classes
    theirs = scores(sum(confusion(m, t, k) for m, t in zip(masks, val_split.full_masks)))
    val = ours.metrics
    figures = {
        "rayseg_membrane_dice": rounded(val["per_class"]["dice"][MEMBRANE]),
        "plain_membrane_dice": rounded(theirs["dice"][MEMBRANE]),
        "rayseg_pixel_accuracy": rounded(val["pixel_accuracy"]),
        "plain_pixel_accuracy": rounded(theirs["pixel_accuracy"]),
        "rayseg_miou": rounded(val["miou"]), "plain_miou": rounded(theirs["miou"]),
        "budget_s": budget, "loop_budget_s": round(loop_budget, 1), "epochs_planned": epochs,
        "rayseg_epochs": len(ours.history), "plain_epochs": plain.epochs,
        "rayseg_steps": ours.history[-1]["step"], "plain_steps": plain.steps,
        "rayseg_stopped": ours.stopped, "rayseg_train_wall_s": round(rayseg_wall, 1),
        "plain_train_s": round(plain.seconds, 1), "plain_step_s": round(step_s, 3),
        "plain_final_lr": plain.final_lr, "threads": threads,
        "resize": list(cfg.preprocessing.resize), "base_width": cfg.model.base_width,
        "arch": arch, "model_dir": str(model_dir),
    }
    return result("quality_isbi", figures, ("rayseg_membrane_dice", "/", "plain_membrane_dice"),
                  ">=1.0 (rayseg membrane Dice / the plain loop's; pixel accuracy beside it)")
