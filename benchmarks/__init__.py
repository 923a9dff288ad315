"""rayseg's benchmarks: ``rayseg bench NAME`` / ``make bench``, from a checkout of the repository.

This package is not part of the installed wheel: it measures the product, it is not the
product.  ``rayseg bench`` imports it from a checkout (``make install`` puts the checkout on the
path) and says so plainly when it is absent.

Each benchmark is a module ``benchmarks.<name>`` with ``run(ctx: Context) -> dict`` returning at
least ``bench`` (name), ``figures`` (everything measured), ``ratio`` (the headline figure the
goal is stated in), ``ratio_from`` (how ``ratio`` follows from two figures) and ``goal``.

One rule for every benchmark: the baseline runs the same work, written as well as a competent
engineer would write it, in the same invocation, interleaved where timing matters.  No baseline
figure is a constant.  The harness checks that ``ratio`` is what ``ratio_from`` says it is,
records the load average before and after, and prints one JSON line per benchmark, then a table.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]

# Order matters for `all`: cheap, Ray-free ones first; quality_isbi before engines (it trains
# the ISBI model engines times).
BENCHMARKS: dict[str, str] = {
    "cpu_ceiling": "fp32 GEMM rate of this machine (GFLOP/s), torch vs numpy",
    "unet_step": "seg_core U-Net training step vs a plain PyTorch step; GFLOP/s as a fraction "
                 "of cpu_ceiling",
    "ingest": "decoded pairs/s from S3 (moto in its own process): Ray Data vs a thread pool over "
              "loose objects, and vs pyarrow + a thread pool over the same shards",
    "lite_unet": "lite U-Net vs base U-Net: params, GFLOPs, CPU inference and training images/s",
    "instances": "touching discs: DSB mAP and PQ of watershed and a boundary class vs connected "
                 "components on a U-Net's masks, with the true masks' ceiling",
    "active_learning": "4 classes, one rare: test mIoU after labelling 10% -> 30% of a pool by "
                       "entropy + near-duplicate-aware rank vs at random, 3 seeds",
    "train_overhead": "Ray Train step time / plain PyTorch loop step time",
    "train_throughput": "rayseg train images/s (whole wall, defaults) / a plain loop on every "
                        "core, mixed-size images with random crops",
    "train_real_sizes": "rayseg train images/s (whole wall, defaults) / a plain loop, RGB "
                        "images with sides up to 1399 px that the old cache rule streamed",
    "batch_predict": "rayseg predict images/s vs the same folded network and engine in a plain "
                     "loop, and vs a user's eager fp32 loop; 256² and 128², shards and loose "
                     "objects; peak memory at 1k and 4k images",
    "serve": "Ray Serve p50 overhead over the replica's own folded forward, proxy actor and "
             "HAProxy ingress; batching; replica scale-up/down",
    "quality_isbi": "ISBI 2012 val membrane Dice: rayseg train vs a plain PyTorch loop, same "
                    "model, augmentation, schedule and budget",
    "engines": "ISBI model through torch / OpenVINO / ONNX Runtime / INT8: images/s at 256², "
               "mask agreement with torch, membrane Dice",
    "warm_start_isbi": "ISBI 2012, other half of the train slices: warm start from a half-A model "
                       "vs from scratch, same wall budget (val membrane Dice ratio)",
    "quality_multiclass": "generated street scenes: rayseg train + evaluate mIoU / a plain "
                          "PyTorch loop's, same data and budget, alternating over two rounds",
    "quality_multilabel": "generated multi-label scenes: estimator train + model_performance "
                          "mIoU / a plain sigmoid loop's, alternating over two rounds",
    "scale_rows": "a million 32² images in shards on S3: validate and predict rows/s, driver "
                  "peak RSS, resume listing time, S3 requests per 1,000 rows, output files",
    "autoconfig": "zero-config rayseg train (the plan from the data's fingerprint) / a hand-set "
                  "config, same budget: ISBI membrane Dice and street-scene mIoU",
}

REQUIRED_KEYS = ("bench", "figures", "ratio", "ratio_from", "goal")
ISBI_ENV = "RAYSEG_ISBI_DIR"


def default_isbi_dir() -> Path:
    """``$RAYSEG_ISBI_DIR``, else ``../shared/data/isbi2012_em_membrane`` beside the checkout."""
    return Path(os.environ.get(ISBI_ENV) or REPO.parent / "shared" / "data" /
                "isbi2012_em_membrane")


@dataclass(frozen=True)
class Context:
    """What every benchmark is given: how big to run, where the ISBI slices are, where to write.

    ``quick`` is a smoke run on tiny sizes (seconds per benchmark; its figures are noise, but
    every line of the figure and ratio code runs).  ``work_dir`` holds generated data and the
    models a benchmark keeps for another (``quality_isbi`` -> ``engines``).
    """

    quick: bool = False
    isbi_dir: Path = field(default_factory=default_isbi_dir)
    scale_rows: int = 1_000_000   # rows of scale_rows (ignored with quick)
    work_dir: Path = field(default_factory=lambda: REPO / "rayseg_work" / "bench")

    def isbi_manifest(self) -> Path:
        """``<isbi_dir>/manifest.csv``, or a FileNotFoundError that says how to point at it."""
        manifest = Path(self.isbi_dir) / "manifest.csv"
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{manifest}: ISBI 2012 data not found; give `rayseg bench --isbi-dir DIR` (or "
                f"set {ISBI_ENV}) to a folder with manifest.csv (image, mask, split)")
        return manifest


def available() -> list[str]:
    """Names of benchmarks whose module exists in this checkout."""
    names = []
    for name in BENCHMARKS:
        try:
            importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"benchmarks.{name}":
                raise
            continue
        names.append(name)
    return names


def ratio_of(figures: dict[str, Any], ratio_from: tuple[str, str, str] | list[str]) -> float:
    """``figures[a] op figures[b]`` for ``ratio_from = (a, op, b)``, op one of ``/`` and ``-``."""
    a, op, b = ratio_from
    if op == "/":
        return figures[a] / figures[b] if figures[b] else math.nan
    if op == "-":
        return figures[a] - figures[b]
    raise ValueError(f"ratio_from: op must be '/' or '-', got {op!r}")


def check_ratio(result: dict[str, Any]) -> None:
    """Raise when ``ratio`` is not what ``ratio_from`` computes from the figures (3 decimals)."""
    expected = ratio_of(result["figures"], result["ratio_from"])
    ratio = result["ratio"]
    if not (math.isnan(expected) and math.isnan(ratio)) and abs(expected - ratio) > 6e-4:
        raise ValueError(f"benchmark {result['bench']}: ratio {ratio} is not "
                         f"{' '.join(map(str, result['ratio_from']))} = {expected:.4f}")


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(v, 2) for v in os.getloadavg()]


def run_one(name: str, ctx: Context | None = None) -> dict[str, Any]:
    """Run one benchmark, check its keys and its ratio, stamp date and load averages."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)} or 'all'")
    ctx = ctx or Context()
    module = importlib.import_module(f"benchmarks.{name}")
    started, load_before = time.perf_counter(), load_average()
    result = module.run(ctx)
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ValueError(f"benchmark {name} returned no {missing}; it must return {REQUIRED_KEYS}")
    check_ratio(result)
    result.setdefault("wall_s", round(time.perf_counter() - started, 2))
    result["quick"] = ctx.quick
    result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["load_average_before_after"] = [load_before, load_average()]
    return result


def run_many(names: Iterable[str], ctx: Context | None = None,
             out=sys.stdout) -> list[dict[str, Any]]:
    """Run benchmarks in order, printing each JSON line as it finishes, then a table."""
    results = []
    for name in names:
        result = run_one(name, ctx)
        print(json.dumps(result, default=_jsonable), file=out, flush=True)
        results.append(result)
    print(format_table(results), file=out, flush=True)
    return results


TABLE_VALUE_CHARS = 160   # a longer figure (a per-run record) is cut in the table, whole in the JSON


def format_table(results: list[dict[str, Any]]) -> str:
    """A fixed-width table: one row per benchmark, then its figures indented below."""
    lines = [f"{'bench':<18} {'ratio':>10} {'wall_s':>8}  goal", "-" * 72]
    for r in results:
        ratio = r["ratio"]
        ratio_s = f"{ratio:.3f}" if isinstance(ratio, (int, float)) else str(ratio)
        lines.append(f"{r['bench']:<18} {ratio_s:>10} {r.get('wall_s', ''):>8}  {r['goal']}")
        for key, value in r["figures"].items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            if len(shown) > TABLE_VALUE_CHARS:
                shown = shown[:TABLE_VALUE_CHARS - 20] + " ... (in the JSON)"
            lines.append(f"    {key:<44} {shown}")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
