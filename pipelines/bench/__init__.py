"""Benchmark harness: ``rayseg bench NAME`` / ``make bench``.

Each benchmark is a module ``pipelines.bench.<name>`` with ``run(quick: bool = False) -> dict``
returning at least ``bench`` (name), ``figures`` (everything measured), ``ratio`` (the headline
figure that the goal is stated in) and ``goal``.  Every benchmark measures rayseg side by side with
a plain-PyTorch (or plain-Python) baseline in the same process and run.  The harness prints one
JSON line per benchmark, then a table.
"""
from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any, Iterable

# Order matters for `all`: cheap, Ray-free ones first.
BENCHMARKS: dict[str, str] = {
    "cpu_ceiling": "fp32 GEMM rate of this machine (GFLOP/s), torch vs numpy",
    "unet_step": "seg_core U-Net training step, images/s and GFLOP/s as a fraction of cpu_ceiling",
    "ingest": "decoded pairs/s from local S3: loose files and shards via Ray Data vs a plain PIL loop",
    "lite_unet": "lite U-Net vs base U-Net: params, GFLOPs, CPU inference and training images/s",
    "engines": "ISBI model through torch / OpenVINO / ONNX Runtime / INT8: images/s at 256², "
               "mask agreement with torch, membrane Dice",
    "train_overhead": "Ray Train step time / plain PyTorch loop step time",
    "train_throughput": "rayseg train images/s (whole wall, defaults) / a plain loop on every "
                        "core, mixed-size images with random crops",
    "batch_predict": "rayseg predict images/s vs a plain model(x) loop; peak RSS at 1k and 4k images",
    "serve": "Ray Serve latency/throughput sweep vs bare forward; replica scale-up/down",
    "quality_isbi": "ISBI 2012 membrane quality after a fixed wall-time budget through rayseg train",
    "warm_start_isbi": "ISBI 2012, other half of the train slices: warm start from a half-A model "
                       "vs from scratch, same wall budget (val membrane Dice ratio)",
    "quality_multiclass": "generated multi-class scenes: rayseg train + evaluate mIoU / a plain "
                          "PyTorch loop's mIoU, same data and wall budget",
    "quality_multilabel": "generated multi-label scenes: estimator train + model_performance "
                          "mIoU / a plain PyTorch sigmoid loop's mIoU, same data and budget",
}

REQUIRED_KEYS = ("bench", "figures", "ratio", "goal")


def available() -> list[str]:
    """Names of benchmarks whose module exists in this checkout."""
    names = []
    for name in BENCHMARKS:
        try:
            importlib.import_module(f"pipelines.bench.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"pipelines.bench.{name}":
                raise
            continue
        names.append(name)
    return names


def run_one(name: str, *, quick: bool = False) -> dict[str, Any]:
    """Run one benchmark and check that its result has the required keys."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)} or 'all'")
    module = importlib.import_module(f"pipelines.bench.{name}")
    started = time.perf_counter()
    result = module.run(quick=quick)
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ValueError(f"benchmark {name} returned no {missing}; it must return {REQUIRED_KEYS}")
    result.setdefault("wall_s", round(time.perf_counter() - started, 2))
    return result


def run_many(names: Iterable[str], *, quick: bool = False, out=sys.stdout) -> list[dict[str, Any]]:
    """Run benchmarks in order, printing each JSON line as it finishes, then a table."""
    results = []
    for name in names:
        result = run_one(name, quick=quick)
        print(json.dumps(result, default=_jsonable), file=out, flush=True)
        results.append(result)
    print(format_table(results), file=out, flush=True)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """A fixed-width table: one row per benchmark, then its figures indented below."""
    lines = [f"{'bench':<16} {'ratio':>10} {'goal':>12} {'wall_s':>8}", "-" * 50]
    for r in results:
        ratio = r["ratio"]
        ratio_s = f"{ratio:.3f}" if isinstance(ratio, (int, float)) else str(ratio)
        lines.append(f"{r['bench']:<16} {ratio_s:>10} {str(r['goal']):>12} {r.get('wall_s', ''):>8}")
        for key, value in r["figures"].items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            lines.append(f"    {key:<40} {shown}")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
