"""``rayseg rank``: RankConfig (flags, --config, --set) -> pipelines.predict.rank.run_rank."""
from __future__ import annotations

import argparse
import typing

from jobs.options import add_config_options, job_config

DESCRIPTION = """\
Choose what to label next.  A Ray Data job scores every unlabelled image by how unsure the model
is of it, and embeds it (pooled bottleneck features); the most uncertain images are picked, and
an image that is a near-duplicate of one already picked is skipped, so the picks differ.

  --by balanced_entropy per-pixel entropy, each class's part weighted by how rare the class
                        is in the pool's predictions (default): images unsure about a rare
                        class come before images with long, mildly unsure edges
  --by entropy          mean per-pixel entropy of the class probabilities
  --by margin           mean 1 - (top probability - second), per pixel
  --by tta              how often the flipped (and, for square images, turned) predictions
                        disagree

Writes to --out (local path or s3://):
  ranked.parquet      every image: id, source_uri, score, rank (1 = label first; null: not
                      picked), class_entropy and class_share (per class: its part of the
                      image's doubt, its predicted share), and reason + message for images
                      that could not be read
  contact_sheet.png   the picks' thumbnails with rank and score
"""

EPILOG = """\
examples:
  rayseg rank --model rayseg_work/models/unet-sample/v1 --input s3://bucket/unlabelled/ \\
      --out rayseg_work/rank/1 --top 50
  rayseg rank --model models:/unet@champion --input pool/manifest.csv --by tta --top 20 \\
      --out rayseg_work/rank/tta
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from seg_core.config import ScoreKind

    parser = subparsers.add_parser(
        "rank", help="score unlabelled images by uncertainty and pick what to label next",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="artifact (local path or s3://) or models:/name@alias")
    parser.add_argument("--input", help="unlabelled images: a prefix, a manifest or shards")
    parser.add_argument("--out", help="where ranked.parquet and contact_sheet.png go")
    parser.add_argument("--by", choices=typing.get_args(ScoreKind),
                        help="how uncertainty is scored (default balanced_entropy)")
    parser.add_argument("--top", type=int, help="images to pick (default 50)")
    parser.add_argument("--split", help="only rows of this split (manifests and shards)")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    add_config_options(parser, "RankConfig keys (model, input, out, by, top, min_distance, ...)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.config import RankConfig
    from pipelines.predict.rank import run_rank
    from pipelines.raycluster import ensure_ray

    cfg = job_config(RankConfig, args, {name: getattr(args, name) for name in (
        "model", "input", "out", "by", "top", "split", "address")})
    ensure_ray(cfg.address)
    run_rank(cfg)
    return 0
