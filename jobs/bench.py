"""``rayseg bench``: run benchmarks, print one JSON line each and a table."""
from __future__ import annotations

import argparse


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
    parser.add_argument("names", nargs="+", metavar="NAME", help="benchmark names, or 'all'")
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes, for a smoke run (figures are noisier)"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.bench import available, run_many

    names = available() if args.names == ["all"] else args.names
    run_many(names, quick=args.quick)
    return 0
