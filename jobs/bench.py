"""``rayseg bench``: run benchmarks, print one JSON line each and a table."""
from __future__ import annotations

import argparse

from jobs.options import add_config_options, job_config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from pipelines.bench import BENCHMARKS

    listing = "\n".join(f"  {name:<16} {text}" for name, text in BENCHMARKS.items())
    parser = subparsers.add_parser(
        "bench",
        help="run benchmarks against a plain-PyTorch baseline",
        description=(
            "Run one benchmark, several, or 'all'.  Each prints one JSON line with the keys "
            "bench, figures, ratio and goal, measured side by side with a plain-PyTorch baseline "
            "in the same process; a table follows.\n\nbenchmarks:\n" + listing
        ),
        epilog="example:\n  rayseg bench cpu_ceiling unet_step\n  rayseg bench all --quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmark names, or 'all' (default: all)")
    parser.add_argument("--quick", action="store_true", default=None,
                        help="smaller sizes, for a smoke run (figures are noisier)")
    add_config_options(parser, "BenchConfig keys (names, quick)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.bench import BENCHMARKS, available, run_many
    from pipelines.config import BenchConfig

    cfg = job_config(BenchConfig, args, {"names": args.names or None, "quick": args.quick})
    unknown = sorted(set(cfg.names) - set(BENCHMARKS) - {"all"})
    if unknown:   # before any benchmark runs, not after the first ones finished
        raise SystemExit(f"rayseg bench: unknown benchmark(s) {unknown}; choose from "
                         f"{sorted(BENCHMARKS)} or all")
    run_many(available() if "all" in cfg.names else list(cfg.names), quick=cfg.quick)
    return 0
