"""``warm_start_isbi``: on ISBI 2012, does a warm start beat training from scratch?

The 24 train slices of the fixed split are cut in two halves by slice number (A: 0-11, B:
12-23); the 6 val slices score every run.  Three ``rayseg train`` runs with
``jobs/configs/train_isbi.yaml`` and the same wall budget each (240 s, 60 s with ``quick``;
``RAYSEG_WARM_BUDGET_S`` overrides it):

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

from pipelines.bench.quality_isbi import DATA, MEMBRANE, STARTUP_ALLOWANCE_S, plan_epochs
from pipelines.bench.train_overhead import plain_step_seconds
from pipelines.config import load_train_config

REPO = Path(__file__).resolve().parents[2]


def half_manifests(out: Path) -> dict[str, Path]:
    """``{"A": ..., "B": ...}``: train halves by slice number, each with the 6 val slices."""
    with open(DATA / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = sorted((r for r in rows if r["split"] == "train"),
                   key=lambda r: int(Path(r["image"]).stem))
    val = [r for r in rows if r["split"] == "val"]
    halves = {"A": train[:len(train) // 2], "B": train[len(train) // 2:]}
    paths = {}
    for name, part in halves.items():
        path = out / f"isbi_half_{name}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "mask", "split"])
            writer.writeheader()
            for row in part + val:
                writer.writerow({"image": str(DATA / row["image"]), "mask": str(DATA / row["mask"]),
                                 "split": row["split"]})
        paths[name] = path
    return paths


def run(quick: bool = False) -> dict[str, Any]:
    from pipelines.raycluster import ensure_ray
    from pipelines.train.train import train

    if not (DATA / "manifest.csv").is_file():
        raise FileNotFoundError(f"{DATA}/manifest.csv: ISBI 2012 data not found; set "
                                f"RAYSEG_ISBI_DIR")
    budget = float(os.environ.get("RAYSEG_WARM_BUDGET_S", 0)) or (60.0 if quick else 240.0)
    resources = ensure_ray()
    threads = max(1, int(resources.get("CPU", 1)))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = [f"scaling.torch_threads={threads}", "artifact_weights=last", "log_every_steps=0",
              f"storage.storage_path={REPO}/rayseg_work/ray_results",
              f"storage.models_uri={REPO}/rayseg_work/models", "register=false"]
    probe = load_train_config(REPO / "jobs/configs/train_isbi.yaml", common)
    step_s = plain_step_seconds(probe, size=probe.preprocessing.resize[0], threads=threads,
                                repeats=5)
    loop_budget = max(budget - STARTUP_ALLOWANCE_S, 10.0)
    epochs = plan_epochs(loop_budget, math.ceil(12 / probe.batch_size), step_s)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifests = half_manifests(Path(tmp))

        def fit(label: str, half: str, *extra: str) -> Any:
            cfg = load_train_config(REPO / "jobs/configs/train_isbi.yaml", [
                *common, f"data.manifest={manifests[half]}", f"epochs={epochs}",
                f"max_runtime_secs={loop_budget}", f"name=warm-isbi-{label}",
                f"version={stamp}", *extra])
            started = time.perf_counter()
            result = train(cfg)
            results[label] = {"wall_s": round(time.perf_counter() - started, 1),
                              "membrane_dice": round(result.metrics["per_class"]["dice"][MEMBRANE],
                                                     4),
                              "miou": round(result.metrics["miou"], 4),
                              "epochs_run": len(result.history)}
            return result

        first = fit("A_scratch", "A")
        fit("B_warm", "B", f"init_from={first.artifact_uri}")
        fit("B_scratch", "B")
    warm, scratch = results["B_warm"], results["B_scratch"]
    return {
        "bench": "warm_start_isbi",
        "figures": {"budget_s": budget, "epochs_planned": epochs, "plain_step_s": round(step_s, 3),
                    **{f"{label}_{k}": v for label, r in results.items() for k, v in r.items()}},
        "ratio": round(warm["membrane_dice"] / max(scratch["membrane_dice"], 1e-9), 4),
        "goal": ">= 1: on the other half of the slices, starting from the half-A model beats "
                "starting from random weights at the same wall budget (val membrane Dice)",
        "baseline": {"B_scratch": scratch},
    }
