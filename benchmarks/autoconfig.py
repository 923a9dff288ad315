"""``autoconfig``: training with no settings but the data's (the plan) against a hand-set config,
in one invocation, with the same wall budget.

Two datasets, each trained twice by :func:`pipelines.train.train.train` with ``max_runtime_secs``
= the budget (counted from the call: start-up, validation and the artifact included) and the
schedule fitted to it:

- **ISBI 2012** (``../shared/data``): the zero-config side gives only what a user must say
  (the manifest, 2 classes, ``mask_values: [0, 255]``) and the budget; the plan
  (:mod:`pipelines.plan.apply`) decides the rest.  The hand-set side is
  ``jobs/configs/train_isbi.yaml`` (``plan: false``) with the same budget and epochs left to it.
  Score: val membrane Dice of the saved weights at full resolution (the training's own
  validation, as ``quality_isbi`` reads it).  Budget 600 s.
- **Street scenes** (:mod:`benchmarks.scene_data`, ``quality_multiclass``'s data: six classes,
  two under 2%, colour twins told apart by height): zero-config gives the manifest, the class
  names, the void label and the budget; the hand-set side is ``quality_multiclass``'s user config
  (base 16, depth 4, ``dice_ce``, no up-down flips).  Score: val mIoU.  Budget 240 s.

``ratio`` = zero-config / hand-set score on the dataset where that ratio is smaller (``worst``;
goals: ISBI >= 0.99, street scenes >= 0.98).  The sides alternate (zero first on ISBI, hand first on the scenes).
``--quick`` runs the street-scene pair only, on 24 small scenes with a 2 s budget: a smoke run.
Each side's plan, steps, epochs and wall are in the figures.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks import REPO, Context
from benchmarks.common import result
from benchmarks.plain import rounded
from benchmarks.scene_data import CLASS_NAMES, IGNORE_INDEX, generate_scene_dataset

ISBI_CONFIG = REPO / "jobs" / "configs" / "train_isbi.yaml"


def run(ctx: Context) -> dict[str, Any]:
    from pipelines.raycluster import ensure_ray

    ensure_ray()
    work = ctx.work_dir / "autoconfig"
    shutil.rmtree(work, ignore_errors=True)
    figures: dict[str, Any] = {}
    street_budget = float(os.environ.get("RAYSEG_MC_BUDGET_S", 0)) or (2.0 if ctx.quick else 240.0)
    n, size = (24, (48, 72)) if ctx.quick else (200, (120, 184))
    manifest = generate_scene_dataset(work / "scenes", n=n, size=size, seed=0, val_fraction=0.2)
    street = {
        "zero": {"data": {"manifest": str(manifest)},
                 "mask": {"num_classes": len(CLASS_NAMES), "class_names": list(CLASS_NAMES),
                          "ignore_index": IGNORE_INDEX},
                 "model": {"num_classes": len(CLASS_NAMES)}},
        "hand": _street_hand(manifest, ctx.quick)}
    if not ctx.quick:
        budget = float(os.environ.get("RAYSEG_ISBI_BUDGET_S", 0)) or 600.0
        isbi = {"zero": {"data": {"manifest": str(ctx.isbi_manifest())},
                         "mask": {"num_classes": 2, "mask_values": [0, 255],
                                  "class_names": ["membrane", "cell"]},
                         "model": {"num_classes": 2}},
                "hand": {**_yaml(ISBI_CONFIG),
                         "data": {**_yaml(ISBI_CONFIG)["data"],
                                  "manifest": str(ctx.isbi_manifest())},
                         "epochs": 10_000}}
        runs = {side: _side(isbi[side], work / "isbi", side, budget) for side in ("zero", "hand")}
        figures["isbi"] = _pair(runs, "membrane_dice", budget)
    runs = {side: _side(street[side], work / "street", side, street_budget)
            for side in ("hand", "zero")}
    figures["street"] = _pair(runs, "miou", street_budget)
    pairs = {k: figures.pop(k) for k in ("isbi", "street") if k in figures}
    for name, pair in pairs.items():
        figures.update({f"{name}_{pair['score']}_zero": pair["zero"],
                        f"{name}_{pair['score']}_hand": pair["hand"],
                        f"{name}_ratio": pair["ratio"], f"{name}_budget_s": pair["budget_s"]})
    worst = min(pairs, key=lambda k: pairs[k]["zero"] / pairs[k]["hand"] if pairs[k]["hand"]
                else 0.0)
    figures.update(worst=worst, zero_score=pairs[worst]["zero"],
                   hand_score=pairs[worst]["hand"])
    for name, pair in pairs.items():
        for side, record in pair["runs"].items():
            figures[f"{name}_{side}"] = record
    return result("autoconfig", figures, ("zero_score", "/", "hand_score"),
                  ">=0.99 on ISBI membrane Dice and >=0.98 on street-scene mIoU (zero-config / "
                  "hand-set, same budget)")


def _street_hand(manifest: Path, quick: bool) -> dict[str, Any]:
    """``quality_multiclass``'s user config as settings (its epochs left to the budget)."""
    from benchmarks.quality_multiclass import user_config
    from pipelines.config import config_to_dict

    return {**config_to_dict(user_config(manifest, ["epochs=10000"], quick)), "plan": False}


def _yaml(path: Path) -> dict[str, Any]:
    from pipelines.config import read_yaml

    return read_yaml(path)


def _side(settings: dict[str, Any], work: Path, side: str, budget: float) -> dict[str, Any]:
    """Plan (the zero side) and train with ``budget``; the val scores of the saved weights."""
    from pipelines import storage
    from pipelines.config import config_from_dict
    from pipelines.plan.apply import plan_settings
    from pipelines.train.train import train

    settings = {**settings, "name": f"auto-{side}", "register": False, "log_every_steps": 0,
                "version": f"bench-{time.strftime('%Y%m%d-%H%M%S')}",
                "max_runtime_secs": budget,
                "storage": {"storage_path": str(work / "ray_results"),
                            "models_uri": str(work / "models")}}
    started = time.perf_counter()
    settings, outcome = plan_settings(settings)
    cfg = config_from_dict(settings)
    trained = train(cfg)
    wall = time.perf_counter() - started
    m = trained.metrics
    schedule = json.loads(storage.read_bytes(storage.join_uri(trained.artifact_uri,
                                                              "metrics.json")))["schedule"]
    return {"miou": rounded(m["miou"]), "per_class_iou": [rounded(v) for v in m["per_class"]["iou"]],
            "per_class_dice": [rounded(v) for v in m["per_class"]["dice"]],
            "steps": trained.history[-1]["step"], "epochs": len(trained.history),
            "stopped": trained.stopped, "wall_s": round(wall, 1), "schedule": schedule,
            "planned": outcome.planned if outcome else None,
            "config": {"size": cfg.augment.crop or cfg.preprocessing.resize or "full",
                       "batch": cfg.batch_size, "depth": cfg.model.depth,
                       "base_width": cfg.model.base_width, "vflip": cfg.augment.vflip,
                       "class_weights": cfg.class_weights, "loss": cfg.loss}}


def _pair(runs: dict[str, dict[str, Any]], score: str, budget: float) -> dict[str, Any]:
    """The two sides' ``score``: ``miou``, or ``membrane_dice`` (class 0's Dice, ISBI)."""
    zero, hand = (runs[side]["miou"] if score == "miou" else runs[side]["per_class_dice"][0]
                  for side in ("zero", "hand"))
    return {"score": score, "zero": zero, "hand": hand, "budget_s": budget,
            "ratio": round(zero / hand, 3) if hand else None, "runs": runs}
