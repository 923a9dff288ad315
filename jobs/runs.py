"""``rayseg runs``: list, compare and plot the tracked training runs."""
from __future__ import annotations

import argparse

from jobs.options import add_config_options, job_config

DESCRIPTION = """\
Every `rayseg train` (and every finished trial of `rayseg tune` or GridSearch) is a run in the
tracking store (RAYSEG_TRACKING_URI, default rayseg_work/mlflow.db).  Without arguments this
lists the newest runs: name, start, wall time, key settings, val mIoU / mDice of the saved
weights, artifact.  --compare puts runs side by side (settings that differ, final metrics);
--plot draws their val mIoU and train loss per epoch on one figure.
"""

EPILOG = """\
examples:
  rayseg runs
  rayseg runs --limit 10
  rayseg runs --compare unet-sample-v1 unet-sample-v2
  rayseg runs --plot curves.png unet-sample-v1 unet-sample-v2
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "runs", help="list, compare and plot tracked training runs",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="run names (or ids) for --compare / --plot")
    parser.add_argument("--compare", action="store_true", help="side by side: the named runs")
    parser.add_argument("--plot", metavar="PNG", help="learning curves of the named runs")
    parser.add_argument("--limit", type=int, help="runs to list (default 20)")
    parser.add_argument("--tracking-uri", help="tracking store (default: RAYSEG_TRACKING_URI, "
                                               "else rayseg_work/mlflow.db)")
    add_config_options(parser, "RunsConfig keys (limit, tracking_uri)")
    return parser


def run(args: argparse.Namespace) -> int:
    import os

    import pandas

    from pipelines import registry
    from pipelines.config import RunsConfig
    from pipelines.operate import runs

    cfg = job_config(RunsConfig, args, {"limit": args.limit, "tracking_uri": args.tracking_uri})
    if cfg.tracking_uri:
        os.environ[registry.TRACKING_ENV] = cfg.tracking_uri
    pandas.set_option("display.width", 200)
    if (args.compare or args.plot) and not args.names:
        raise SystemExit("rayseg runs: --compare and --plot need run names (see `rayseg runs`)")
    if args.plot:
        print(f"runs: learning curves in {runs.plot_curves(args.names, args.plot)}")
    if args.compare:
        print(runs.compare(args.names).to_string())
    if not (args.compare or args.plot):
        table = runs.runs_table(cfg.limit)
        print(table.drop(columns=["run_id"]).to_string(index=False) if not table.empty
              else "runs: none tracked yet (rayseg train logs every run)")
    return 0
