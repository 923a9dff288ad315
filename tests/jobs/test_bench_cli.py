"""`rayseg bench` prints one machine-readable JSON line per benchmark, then a table."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipelines.bench import BENCHMARKS, format_table, run_one


def test_bench_prints_json_line_with_required_keys_then_table():
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "bench", "cpu_ceiling", "--quick"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    first = json.loads(out.splitlines()[0])
    assert first["bench"] == "cpu_ceiling"
    assert {"figures", "ratio", "goal"} <= set(first)
    assert first["figures"]["torch_gemm_gflops"] > 0
    assert "bench" in out.splitlines()[1] and "ratio" in out.splitlines()[1], "table header follows"


def test_unknown_benchmark_lists_the_valid_names():
    with pytest.raises(ValueError, match="cpu_ceiling"):
        run_one("cpu_cieling")


def test_every_registered_benchmark_has_a_module():
    import importlib

    for name in BENCHMARKS:
        module = importlib.import_module(f"pipelines.bench.{name}")
        assert callable(module.run), name


def test_table_shows_each_figure():
    table = format_table([{"bench": "x", "figures": {"alpha": 1.5}, "ratio": 0.5, "goal": ">=1"}])
    assert "alpha" in table and "0.500" in table
