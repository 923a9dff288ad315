"""``warm_start_isbi``: on ISBI 2012, does a warm start beat training from scratch?

The 24 train slices of the fixed split are cut in two halves by slice number (A: 0-11, B:
12-23); the 6 val slices score every run.  Three ``rayseg train`` runs with
``jobs/configs/train_isbi.yaml`` and the same wall budget each (240 s; ``--quick``: a few seconds on a small
model; ``RAYSEG_WARM_BUDGET_S`` overrides it):

1. A, from scratch: the model to start from;
2. B, warm-started from run 1 (``init_from``): the figure;
3. B, from scratch: the baseline.

``ratio`` is the val membrane Dice of run 2 over run 3.  The data never enters the repo: the
half manifests are written to a temp directory and name the slices by absolute path.
"""
from __future__ import annotations

import csv
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import Context
from benchmarks.common import result, torch_threads
from benchmarks.plain import load_split, plan_epochs, train_plain
from benchmarks.quality_isbi import MEMBRANE, STARTUP_ALLOWANCE_S, isbi_config


def half_manifests(manifest: Path, out: Path) -> dict[str, Path]:
    """``{"A": ..., "B": ...}``: train halves by slice number, each with the val slices."""
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = sorted((r for r in rows if r["split"] == "train"),
                   key=lambda r: (len(Path(r["image"]).stem), Path(r["image"]).stem))
    val = [r for r in rows if r["split"] == "val"]
    halves = {"A": train[:len(train) // 2], "B": train[len(train) // 2:]}
    paths = {}
    for name, part in halves.items():
        path = out / f"isbi_half_{name}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "mask", "split"])
            writer.writeheader()
            for row in part + val:
                writer.writerow({"image": str(manifest.parent / row["image"]),
                                 "mask": str(manifest.parent / row["mask"]),
                                 "split": row["split"]})
        paths[name] = path
    return paths


def run(ctx: Context) -> dict[str, Any]:
    from pipelines.raycluster import ensure_ray
    from pipelines.train.train import train

    manifest = ctx.isbi_manifest()
    budget = float(os.environ.get("RAYSEG_WARM_BUDGET_S", 0)) or (2.0 if ctx.quick else 240.0)
    threads = max(1, int(ensure_ray().get("CPU", 1)))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = ["artifact_weights=last", "register=false"]
    probe = isbi_config(ctx, threads, "unet", *common)
    train_rows = load_split(manifest, "train", probe, mask_values=tuple(probe.mask.mask_values))
    with torch_threads(threads):
        step_s = train_plain(probe, train_rows, epochs=1, budget_s=math.inf, max_steps=7).step_s
    loop_budget = budget if ctx.quick else max(budget - STARTUP_ALLOWANCE_S, 10.0)
    half = len(train_rows.images) // 2
    epochs = plan_epochs(loop_budget, math.ceil(half / probe.batch_size), step_s)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifests = half_manifests(manifest, Path(tmp))

        def fit(label: str, which: str, *extra: str) -> Any:
            cfg = isbi_config(ctx, threads, "unet", *common,
                              f"data.manifest={manifests[which]}", f"epochs={epochs}",
                              f"max_runtime_secs={budget}", f"name=warm-isbi-{label}",
                              f"version={stamp}", *extra)
            started = time.perf_counter()
            trained = train(cfg)
            results[label] = {"wall_s": round(time.perf_counter() - started, 1),
                              "membrane_dice": round(
                                  trained.metrics["per_class"]["dice"][MEMBRANE], 4),
                              "miou": round(trained.metrics["miou"], 4),
                              "epochs_run": len(trained.history)}
            return trained

        first = fit("A_scratch", "A")
        fit("B_warm", "B", f"init_from={first.artifact_uri}")
        fit("B_scratch", "B")
    figures = {"budget_s": budget, "epochs_planned": epochs, "plain_step_s": round(step_s, 3),
               **{f"{label}_{k}": v for label, r in results.items() for k, v in r.items()}}
    return result("warm_start_isbi", figures, ("B_warm_membrane_dice", "/",
                                               "B_scratch_membrane_dice"),
                  ">= 1: on the other half of the slices, starting from the half-A model beats "
                  "starting from random weights at the same wall budget (val membrane Dice)")
