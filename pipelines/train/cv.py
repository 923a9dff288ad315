"""``cross_validate(cfg) -> CVResult``: k-fold cross-validation, one Ray Train run per fold.

Folds come from the manifest's fold column (``fold_assignment: column``, or ``auto`` when every
training row has one) or from a seeded shuffle of the training rows (``random``, or ``auto``
without a column).  Rows of ``data.val_split`` take no part: like H2O, CV partitions the
training rows only.  The assignment is written once to ``<storage_path>/<name>-<version>-cv/
folds.parquet`` (absolute URIs + fold column), so every fold run reads the same split and the
record of it survives.

Concurrency: each fold is a full ``train()`` (its own TorchTrainer, checkpoints, resume and
artifact at ``<models_uri>/<name>/<version>-fold<k>/``).  ``cv_parallelism`` folds run at once,
each as a Ray task that holds no CPU itself (its trainer's workers reserve the CPUs).  The
default of 1 runs folds one after another in this process: on a 2-core box two trainers mostly
time-slice the same cores; on a cluster set ``cv_parallelism = nfolds``.  When folds run
concurrently and ``scaling.cpus_per_worker`` is unset, each worker gets
``(cluster CPUs - 1) / (workers * parallelism)`` CPUs (0.25 .. 1), which keeps one CPU free for
Ray Data, the same rule as a single run (notes §3.2).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.config import TrainConfig
from pipelines.train.train import (
    TrainResult,
    default_cpus_per_worker,
    train,
)

SUMMARY_METRICS = ("miou", "mdice", "pixel_accuracy")


@dataclass(frozen=True)
class CVResult:
    """Per-fold results and the mean and (sample) standard deviation of each metric."""

    folds: list[TrainResult]
    fold_sizes: list[int]  # validation rows per fold
    summary_metrics: dict[str, dict[str, float]]  # metric -> {"mean": .., "std": ..}
    assignment: str  # "column" or "random"
    folds_uri: str  # the fold assignment file
    summary_uri: str  # cv_summary.json

    def summary(self) -> str:
        """A table: one line per fold, then mean +- std."""
        widths = {m: max(14, len(m)) for m in self.summary_metrics}
        lines = [f"{self.assignment} folds from {self.folds_uri}",
                 f"{'fold':>4} {'val rows':>8} " + " ".join(f"{m:>{w}}" for m, w in widths.items())]
        for k, (fold, size) in enumerate(zip(self.folds, self.fold_sizes)):
            values = " ".join(f"{fold_metric(fold, m):>{w}.4f}" for m, w in widths.items())
            lines.append(f"{k:>4} {size:>8} {values}")
        stats = " ".join(f"{s['mean']:.4f}+-{s['std']:.4f}".rjust(widths[m])
                         for m, s in self.summary_metrics.items())
        lines.append(f"{'mean':>4} {'':>8} {stats}")
        return "\n".join(lines)


def cross_validate(cfg: TrainConfig, *, parallelism: int | None = None) -> CVResult:
    """Train ``cfg.nfolds`` models, fold ``k`` validated on the rows of fold ``k``."""
    import ray

    if cfg.nfolds < 2:
        raise ValueError(f"cross_validate: nfolds must be >= 2, got {cfg.nfolds}")
    if cfg.data.manifest is None and cfg.fold_assignment == "random":
        raise ValueError("cross_validate: random folds need a manifest; shards carry their own "
                         "fold column (rayseg pack), so use fold_assignment: column")
    resources = ray.cluster_resources()
    parallelism = max(1, min(parallelism or cfg.cv_parallelism, cfg.nfolds))
    folds_uri, assignment, sizes = write_fold_assignment(cfg)
    fold_cfgs = [fold_config(cfg, k, folds_uri, parallelism, resources) for k in range(cfg.nfolds)]
    results = _run_folds(fold_cfgs, parallelism)
    stats = summarize(results)
    summary_uri = storage.join_uri(cfg.storage.models_uri, cfg.name, f"{cfg.version}-cv",
                                   "cv_summary.json")
    record = {"assignment": assignment, "folds_uri": folds_uri, "fold_sizes": sizes,
              "summary": stats, "folds": [{"artifact": r.artifact_uri, "val": r.metrics}
                                          for r in results]}
    storage.write_bytes(summary_uri, json.dumps(record, indent=2, default=_json_default).encode())
    return CVResult(folds=results, fold_sizes=sizes, summary_metrics=stats,
                    assignment=assignment, folds_uri=folds_uri, summary_uri=summary_uri)


def assign_folds(table: pa.Table, cfg: TrainConfig) -> tuple[pa.Table, str]:
    """``table`` (records.PAIR_SCHEMA) with its ``fold`` column set for the training rows."""
    is_train = np.array([s == cfg.data.train_split for s in table["split"].to_pylist()])
    existing = table["fold"].to_pylist()
    has_column = all(existing[i] is not None for i in np.flatnonzero(is_train))
    if cfg.fold_assignment == "column" or (cfg.fold_assignment == "auto" and has_column):
        bad = sorted({f for f, t in zip(existing, is_train) if t and not (
            f is not None and 0 <= f < cfg.nfolds)}, key=str)
        if bad:
            raise ValueError(f"fold column: training rows need folds 0..{cfg.nfolds - 1}, found "
                             f"{bad[:5]}; fix the column or use fold_assignment: random")
        return table, "column"
    rows = np.flatnonzero(is_train)
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    folds: list[int | None] = [None] * table.num_rows
    for position, row in enumerate(rows[order]):
        folds[row] = position % cfg.nfolds  # round-robin over a seeded shuffle: sizes differ by <= 1
    column = table.schema.get_field_index("fold")
    return table.set_column(column, "fold", pa.array(folds, pa.int32())), "random"


def write_fold_assignment(cfg: TrainConfig) -> tuple[str, str, list[int]]:
    """Persist the fold assignment; returns (uri, how, validation rows per fold)."""
    from pipelines import ingest

    if cfg.data.manifest is None:  # shards: their own fold column, read as is
        rows = ingest.read_pairs(cfg.data.shards, kind="shards", split=cfg.data.train_split)
        folds = [r["fold"] for r in rows.select_columns(["fold"]).take_all()]
        if any(f is None or not 0 <= f < cfg.nfolds for f in folds):
            raise ValueError(f"{cfg.data.shards}: every training row needs a fold in "
                             f"0..{cfg.nfolds - 1}; pack with folds, or train from a manifest")
        return cfg.data.shards, "column", [folds.count(k) for k in range(cfg.nfolds)]
    table, how = assign_folds(ingest.read_manifest(cfg.data.manifest), cfg)
    uri = storage.join_uri(cfg.storage.storage_path, f"{cfg.name}-{cfg.version}-cv",
                           "folds.parquet")
    storage.write_table(table, uri)
    folds = [f for f, s in zip(table["fold"].to_pylist(), table["split"].to_pylist())
             if s == cfg.data.train_split]
    return uri, how, [folds.count(k) for k in range(cfg.nfolds)]


def fold_config(cfg: TrainConfig, fold: int, folds_uri: str, parallelism: int,
                resources: dict[str, float]) -> TrainConfig:
    """The TrainConfig of one fold: reads the fold file, shares the cluster with its siblings."""
    data = cfg.data if cfg.data.shards else dataclasses.replace(cfg.data, manifest=folds_uri)
    scaling = cfg.scaling
    if parallelism > 1 and scaling.cpus_per_worker is None:
        cpus = default_cpus_per_worker(resources.get("CPU", 1.0), scaling.num_workers, parallelism)
        scaling = dataclasses.replace(scaling, cpus_per_worker=cpus)
    return dataclasses.replace(cfg, data=data, scaling=scaling).with_fold(fold)


def summarize(results: list[TrainResult]) -> dict[str, dict[str, float]]:
    """Mean and sample std (ddof=1) over folds of each headline and per-class metric."""
    names = list(SUMMARY_METRICS)
    class_names = results[0].metrics["class_names"]
    names += [f"iou_{c}" for c in class_names] + [f"dice_{c}" for c in class_names]
    out = {}
    for name in names:
        values = np.array([fold_metric(r, name) for r in results], dtype=np.float64)
        out[name] = {"mean": float(np.nanmean(values)),
                     "std": float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0}
    return out


def fold_metric(result: TrainResult, name: str) -> float:
    """A headline metric (``miou``) or a per-class one (``iou_<class>``, ``dice_<class>``)."""
    metrics = result.metrics
    if name in metrics:
        return float(metrics[name])
    kind, _, cls = name.partition("_")
    value = metrics["per_class"][kind][metrics["class_names"].index(cls)]
    return math.nan if value is None else float(value)


def _run_folds(fold_cfgs: list[TrainConfig], parallelism: int) -> list[TrainResult]:
    if parallelism == 1:
        return [train(c) for c in fold_cfgs]
    import ray

    remote_train = ray.remote(num_cpus=0, max_retries=0)(train)
    pending = {}
    results: dict[int, TrainResult] = {}
    queue = list(enumerate(fold_cfgs))
    while queue or pending:
        while queue and len(pending) < parallelism:
            k, fold_cfg = queue.pop(0)
            pending[remote_train.remote(fold_cfg)] = k
        done, _ = ray.wait(list(pending), num_returns=1)
        results[pending.pop(done[0])] = ray.get(done[0])
    return [results[k] for k in range(len(fold_cfgs))]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    return str(value)
