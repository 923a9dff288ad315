"""The ``rayseg`` console script: one subcommand per job.

Each subcommand is a thin module ``jobs/<name>.py`` (``-`` in a command's name is ``_`` in its
module's) exposing ``add_parser(subparsers)`` and ``run(args) -> int``.  Modules import cheaply;
heavy imports (ray, torch) happen inside ``run``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

VERBOSE_ENV = "RAYSEG_VERBOSE"   # read by pipelines.raycluster.ensure_ray
SUBCOMMANDS = ("demo", "validate", "plan", "pack", "train", "tune", "auto", "runs", "predict",
               "export-masks", "tune-postprocess", "rank", "explain", "evaluate", "promote", "serve", "monitor", "bench")

DESCRIPTION = """\
rayseg: U-Net image segmentation on Ray, from a laptop to a cluster.

Data flows one way: object storage -> ingest -> train | batch predict | serve -> Parquet.
Every URI may be a local path, file://, or s3:// (endpoint and keys come from the standard
AWS_* variables, e.g. AWS_ENDPOINT_URL for MinIO).  Run `rayseg <command> --help` for details.

Output is rayseg's own status lines plus Ray's real warnings and errors.  Ray's INFO logs, its
worker output and a few Ray lines known to be harmless (the token-authentication notice, Ray
Data's "no available CPUs" when CPUs free up a moment later, Serve's shutdown retry notice, the
actor-argument notice of Ray Data's actor pools) are held back; `rayseg --verbose <command>`
(or RAYSEG_VERBOSE=1) shows all of them.  Ray keeps its full logs in /tmp/ray/session_latest/logs.
"""

EPILOG = """\
typical flow:
  rayseg demo                                    # everything, end to end, on generated data
  rayseg validate data/manifest.csv --num-classes 3
  rayseg plan data/manifest.csv --num-classes 3  # fingerprint -> plan.yaml (crop, flips, weights)
  rayseg pack data/manifest.csv --out s3://bucket/shards/
  rayseg train --config jobs/configs/train_sample.yaml --set max_iterations=200
  rayseg tune --config jobs/configs/train_sample.yaml --grid jobs/configs/grid_sample.yaml
  rayseg auto --manifest data/manifest.csv --num-classes 3 --max-runtime-secs 600  # AutoML
  rayseg runs --compare unet-sample-v1 unet-sample-v2
  rayseg predict --model runs/models/unet/v1 --input s3://bucket/shards/ --out s3://bucket/preds/
  rayseg export-masks s3://bucket/preds/ --out s3://bucket/preds-coco/  # COCO RLE for CVAT & co.
  rayseg evaluate --predictions s3://bucket/preds/ --manifest data/manifest.csv
  rayseg promote --model models:/unet/2 --gate "miou>=0.80" --manifest data/manifest.csv
  rayseg serve --model models:/unet@champion
  rayseg monitor --predictions s3://bucket/serve-log/ --model models:/unet@champion
  rayseg bench all
  rayseg --verbose demo                          # the same, with Ray's own logs in full
"""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="rayseg",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's own logs in full: INFO lines, worker output and the "
                             "known-harmless notices rayseg otherwise holds back (sets "
                             f"{VERBOSE_ENV}=1); give it before the command")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"jobs.{name.replace('-', '_')}")
        sp = module.add_parser(sub)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rayseg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"   # every ensure_ray in this process (and its workers)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from jobs.options import ConfigError
    from pipelines.raycluster import StorageContractError

    try:
        return int(args._run(args) or 0)
    except (StorageContractError, ConfigError) as refused:   # before any work: what to change
        print(f"rayseg {args.command}: {refused}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
