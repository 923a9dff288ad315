"""``rayseg bench``: run benchmarks from a checkout, print one JSON line each and a table."""
from __future__ import annotations

import argparse

from jobs.options import add_config_options, job_config

MISSING = ("rayseg bench runs the benchmarks/ package of a checkout of the rayseg repository; it "
           "is not part of the installed wheel.  Clone the repository, run `make install` there "
           "(it puts the checkout on this environment's path), then `rayseg bench` or "
           "`make bench`.")


def _benchmarks() -> dict[str, str] | None:
    """The benchmark names and descriptions, or None when ``benchmarks`` is not importable."""
    try:
        from benchmarks import BENCHMARKS
    except ModuleNotFoundError as error:
        if error.name != "benchmarks":
            raise
        return None
    return BENCHMARKS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    found = _benchmarks()
    listing = "\n".join(f"  {name:<18} {text}" for name, text in found.items()) if found \
        else "  (none here: " + MISSING + ")"
    parser = subparsers.add_parser(
        "bench",
        help="run benchmarks against a plain-PyTorch baseline (from a checkout)",
        description=(
            "Run one benchmark, several, or 'all'.  Each prints one JSON line with the keys "
            "bench, figures, ratio, ratio_from and goal, measured side by side with a baseline "
            "that does the same work (plain PyTorch, or plain Python) in the same invocation; "
            "a table follows.  Run them on a quiet machine: each line records the load average "
            "before and after.\n\nbenchmarks:\n" + listing
        ),
        epilog="examples:\n  rayseg bench cpu_ceiling unet_step\n  rayseg bench all --quick\n"
               "  rayseg bench quality_isbi --isbi-dir /data/isbi2012_em_membrane",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmark names, or 'all' (default: all)")
    parser.add_argument("--quick", action="store_true", default=None,
                        help="a smoke run on tiny sizes: every figure is computed, in seconds, "
                             "and the figures are noise")
    parser.add_argument("--isbi-dir", default=None, metavar="DIR",
                        help="the ISBI 2012 folder (manifest.csv with image, mask, split) that "
                             "quality_isbi, engines and warm_start_isbi read (default: "
                             "$RAYSEG_ISBI_DIR, else ../shared/data/isbi2012_em_membrane beside "
                             "the checkout)")
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="generated data and the models benchmarks keep (default "
                             "rayseg_work/bench)")
    parser.add_argument("--scale-rows", type=int, default=None, metavar="N",
                        help="images scale_rows builds, validates and predicts (default "
                             "1,000,000: about an hour on a 2-core box)")
    add_config_options(parser, "BenchConfig keys (names, quick, isbi_dir, work_dir, "
                               "scale_rows)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipelines.config import BenchConfig

    found = _benchmarks()
    if found is None:
        raise SystemExit(MISSING)
    from benchmarks import Context, available, default_isbi_dir, run_many

    cfg = job_config(BenchConfig, args, {"names": args.names or None, "quick": args.quick,
                                         "isbi_dir": args.isbi_dir, "work_dir": args.work_dir,
                                         "scale_rows": args.scale_rows})
    unknown = sorted(set(cfg.names) - set(found) - {"all"})
    if unknown:   # before any benchmark runs, not after the first ones finished
        raise SystemExit(f"rayseg bench: unknown benchmark(s) {unknown}; choose from "
                         f"{sorted(found)} or all")
    ctx = Context(quick=cfg.quick, work_dir=Path(cfg.work_dir).resolve(),
                  scale_rows=cfg.scale_rows,
                  isbi_dir=Path(cfg.isbi_dir) if cfg.isbi_dir else default_isbi_dir())
    run_many(available() if "all" in cfg.names else list(cfg.names), ctx)
    return 0
