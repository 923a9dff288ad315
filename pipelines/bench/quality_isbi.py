"""``quality_isbi``: ISBI 2012 membrane quality after a wall-time budget through ``rayseg train``.

Same code path as ``rayseg train --config jobs/configs/train_isbi.yaml`` (``pipelines.train.train.train``
with that YAML): 24 train / 6 val slices from the fixed manifest split, 256x256 resize, base-16
U-Net, channels_last, flip/rot90 augmentation.  The budget (600 s, or 60 s with ``quick``) caps
the training loop through ``max_runtime_secs`` (``RAYSEG_ISBI_BUDGET_S`` overrides it;
``RAYSEG_ISBI_ARCH=lite`` trains the lite U-Net instead); the number of epochs (and so the LR schedule) is
sized to the budget from a short timing of the training step first.  Validation scores
full-resolution 512x512 predictions (Segmenter, resized back) against the original masks.

Baseline: a plain PyTorch loop on this machine reached membrane Dice 0.79 and pixel accuracy
0.919 in 418 s (base 16, channels_last, flip/rot90).  The model is copied to
``rayseg_work/isbi_model/`` (``isbi_model_lite/`` for the lite U-Net; gitignored) and its path
printed; ``rayseg bench engines`` reads it from there.  The data never enters the repo.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pipelines.bench.train_overhead import plain_step_seconds
from pipelines.config import load_train_config

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("RAYSEG_ISBI_DIR", "/work/shared/data/isbi2012_em_membrane"))
MODEL_DIR = REPO / "rayseg_work" / "isbi_model"   # lite models go to isbi_model_lite
BASELINE = {"membrane_dice": 0.79, "pixel_accuracy": 0.919, "wall_s": 418}
MEMBRANE = 0  # mask value 0 -> class 0
STARTUP_ALLOWANCE_S = 45.0  # Ray worker start, data decode, artifact write (not training)


def plan_epochs(loop_budget: float, steps_per_epoch: int, step_s: float) -> int:
    """Epochs (and so the cosine's length) that fill ``loop_budget`` seconds of training.

    An epoch costs its steps at the plain step time (the Ray step measured within 0.9-1.1x of it
    by ``train_overhead``) plus about 1.5 s for validating 6 slices and writing the checkpoint.
    Planning errs long on purpose: if the loop is slower, ``max_runtime_secs`` stops it in the
    flat tail of the cosine (at 80% of the schedule the LR is already under 10% of its peak),
    while planning short leaves the budget unused - the first run here planned 14 epochs from a
    step timed on a loaded machine and finished in 261 of 600 s.
    """
    return max(1, int(loop_budget / (steps_per_epoch * step_s + 1.5)))


def model_dir_for(arch: str) -> Path:
    """Where the last model of ``arch`` is kept (``rayseg bench engines`` reads it)."""
    return MODEL_DIR if arch == "unet" else MODEL_DIR.with_name(f"{MODEL_DIR.name}_{arch}")


def run(quick: bool = False, budget_s: float | None = None) -> dict[str, Any]:
    from pipelines.raycluster import ensure_ray
    from pipelines.train.train import train

    manifest = DATA / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: ISBI 2012 data not found; set RAYSEG_ISBI_DIR")
    budget = budget_s or float(os.environ.get("RAYSEG_ISBI_BUDGET_S", 0)) or (60.0 if quick else 600.0)
    resources = ensure_ray()
    threads = max(1, int(resources.get("CPU", 1)))  # decoded data is cached: the loop gets all cores
    stamp = time.strftime("%Y%m%d-%H%M%S")
    arch = os.environ.get("RAYSEG_ISBI_ARCH", "unet")   # lite: the lite U-Net, same budget
    base = load_train_config(REPO / "jobs/configs/train_isbi.yaml", [
        f"data.manifest={manifest}", f"scaling.torch_threads={threads}", f"model.arch={arch}"])
    step_s = plain_step_seconds(base, size=base.preprocessing.resize[0], threads=threads,
                                repeats=5)
    steps_per_epoch = math.ceil(24 / base.batch_size)
    loop_budget = max(budget - STARTUP_ALLOWANCE_S, 10.0)
    epochs = plan_epochs(loop_budget, steps_per_epoch, step_s)
    cfg = load_train_config(REPO / "jobs/configs/train_isbi.yaml", [
        f"data.manifest={manifest}", f"scaling.torch_threads={threads}", f"model.arch={arch}",
        f"epochs={epochs}", f"max_runtime_secs={loop_budget}", "artifact_weights=last",
        f"version=bench-{stamp}", f"storage.storage_path={REPO}/rayseg_work/ray_results",
        f"storage.models_uri={REPO}/rayseg_work/models", "log_every_steps=0"])
    started = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - started
    model_dir = model_dir_for(arch)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(result.artifact_uri, model_dir)
    print(f"quality_isbi: model written to {model_dir}", flush=True)
    val = result.metrics
    dice = val["per_class"]["dice"][MEMBRANE]
    figures = {
        "membrane_dice": round(dice, 4), "membrane_iou": round(val["per_class"]["iou"][MEMBRANE], 4),
        "pixel_accuracy": round(val["pixel_accuracy"], 4), "miou": round(val["miou"], 4),
        "wall_s": round(wall, 1), "budget_s": budget, "epochs_planned": epochs,
        "epochs_run": len(result.history), "steps": result.history[-1]["step"],
        "stopped": result.stopped, "threads": threads, "resize": list(cfg.preprocessing.resize),
        "base_width": cfg.model.base_width, "arch": arch, "plain_step_s": round(step_s, 3),
        "baseline": BASELINE, "model_dir": str(model_dir),
    }
    return {"bench": "quality_isbi", "figures": figures,
            "ratio": round(dice / BASELINE["membrane_dice"], 3),
            "goal": ">=1.0 (membrane Dice vs the plain loop's 0.79; acc >= 0.919)"}
