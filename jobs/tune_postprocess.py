"""``rayseg tune-postprocess``: choose an artifact's per-class post-processing on labelled pairs."""
from __future__ import annotations

import argparse

from jobs.options import add_config_options, job_config

DESCRIPTION = """\
Choose, per class, the clean-up that every engine applies to this model's masks, on labelled
pairs (training does this on its val split at the end, unless tune_postprocess is false; run
this for an older artifact, or on other data).  No Ray: up to 64 pairs of --split are read and
predicted on this machine with no post-processing, then per class, in this order:

  fill_holes     regions of other classes wholly inside the class become the class
  min_size N     the class's regions under N pixels are removed (N from 10, 30, 100, 300, 1000)
  keep_largest   only the class's largest region is kept

Each is kept only where it raises that class's Dice by more than 0.002 and lowers no other
class's Dice, so val Dice never goes down.  Removed pixels become the background (class 0).
The rules and the evidence (every rule tried, Dice before and after) are written into the
artifact's artifact.json, in place (an s3:// artifact's artifact.json is replaced whole).
`rayseg predict`, `rayseg serve` and `rayseg evaluate --model` then apply them; their
`postprocess` key overrides them ({} turns them off).
"""

EPILOG = """\
examples:
  rayseg tune-postprocess --model rayseg_work/models/unet-sample/v1 --manifest data/manifest.csv
  rayseg tune-postprocess --model s3://bucket/models/unet/v3 --manifest s3://bucket/shards/ \\
      --split test
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tune-postprocess", help="choose per-class mask clean-up on labelled pairs",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="artifact (local path or s3://) or models:/name/N")
    parser.add_argument("--manifest", help="labelled pairs: manifest, images/+masks/ prefix, "
                                           "or shards")
    parser.add_argument("--split", help="the split to choose on (default val)")
    add_config_options(parser, "TunePostprocessConfig keys (model, manifest, split)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.config import TunePostprocessConfig
    from pipelines.train.postprocess import tune_artifact

    cfg = job_config(TunePostprocessConfig, args, {name: getattr(args, name) for name in (
        "model", "manifest", "split")})
    try:
        tune_artifact(cfg)
    except ValueError as refused:   # a source without that split, an artifact that is not one
        raise SystemExit(f"rayseg tune-postprocess: {refused}") from None
    return 0
