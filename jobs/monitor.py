"""``rayseg monitor``: flags -> MonitorConfig -> pipelines.operate.monitor.run_monitor -> exit 0 / 3."""
from __future__ import annotations

import argparse

from jobs.options import add_config_options, job_config

DESCRIPTION = """\
Compare what a live model produces with what it produced on its own val split at training time
(baseline.json in the artifact), and say whether the inputs have drifted.

Reads prediction Parquet (the endpoint's out_uri, or a `rayseg predict` --out), optionally only
rows since a time.  Per class, the share of each image's pixels is tested against the baseline
with a two-sample Kolmogorov-Smirnov test and the population stability index (PSI): a class is
flagged when KS p < alpha and PSI > min_psi.  The empty-mask rate and the share of images with
low mean confidence (under the baseline's 10th percentile) are flagged when they move by more
than their limits.  Writes report.md (tables, drift.png) and report.json to --out.

Exit status: 0 no drift (or too few rows to judge), 3 drift flagged, 1 error.
"""

EPILOG = """\
examples:
  rayseg monitor --predictions s3://bucket/serve-log/ --model models:/unet@champion \\
      --since 2026-11-29T00:00:00 --out rayseg_work/monitor/today
  rayseg monitor --predictions s3://bucket/preds/nightly --model models:/unet@champion \\
      --set thresholds.min_psi=0.2
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "monitor", help="drift of live predictions against the model's val baseline",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", help="prediction Parquet: serve out_uri or predict --out")
    parser.add_argument("--model", help="the model (models:/name@alias or artifact URI)")
    parser.add_argument("--since", help="ISO time; only rows created at or after it")
    parser.add_argument("--same-weights", action="store_true", default=None,
                        help="only rows made by this model's weights (weights_sha256)")
    parser.add_argument("--out", help="report directory (default rayseg_work/monitor)")
    parser.add_argument("--alpha", type=float, help="KS significance level (default 0.01)")
    parser.add_argument("--min-psi", type=float, help="PSI a shifted class must exceed "
                                                      "(default 0.1)")
    add_config_options(parser, "MonitorConfig keys (predictions, model, thresholds.*, ...)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.config import MonitorConfig
    from pipelines.operate.monitor import DRIFT_EXIT, run_monitor

    flags = {"predictions": args.predictions, "model": args.model, "since": args.since,
             "same_weights": args.same_weights, "out": args.out,
             "thresholds.alpha": args.alpha, "thresholds.min_psi": args.min_psi}
    cfg = job_config(MonitorConfig, args, flags)
    result = run_monitor(cfg.predictions, cfg.model, cfg.out, since=cfg.since,
                         thresholds=cfg.thresholds, same_weights=cfg.same_weights)
    return DRIFT_EXIT if result["drift"] else 0
