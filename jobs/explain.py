"""``rayseg explain``: ExplainConfig (flags, --config, --set) -> pipelines.predict.explain."""
from __future__ import annotations

import argparse
import typing

from jobs.options import add_config_options, job_config

DESCRIPTION = """\
Why did the model put a class where it did?  A Ray Data job computes, for every input image,
an attribution map of --class (seg_core.explain, on Captum): how much each pixel moved the sum
of the class's logits over the pixels predicted as it, through the same preprocessing and
windows as the masks.

  --method gradcam               Grad-CAM on the last decoder stage (default; cheap)
  --method occlusion             the score lost when a small patch is hidden (thousands of
                                 forwards per window: for a few images)
  --method integrated_gradients  gradients integrated from the image's mean colour

Writes <out>/explanations.parquet: per image the map as an 8-bit PNG at its size (Grad-CAM
0..1 as 0..255; the signed methods -1..1 with 0 at 128), the pixels predicted as the class (no
map when there are none), or why the image could not be read.  Maps are costly: explain the
images you want to look at, not a whole dataset.  The endpoint serves the same maps
(POST /v1/explain) and its page shows them (tick "Why?").
"""

EPILOG = """\
examples:
  rayseg explain --model rayseg_work/models/unet-sample/v1 --input data/manifest.csv \\
      --split val --class disc --out rayseg_work/explain/disc
  rayseg explain --model models:/unet@champion --input s3://bucket/worst/ --class road \\
      --method occlusion --out s3://bucket/explain/road
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from seg_core.config import ExplainMethod

    parser = subparsers.add_parser(
        "explain", help="attribution maps of a class for many images, to Parquet",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="artifact (local path or s3://) or models:/name@alias")
    parser.add_argument("--input", help="images: a prefix, a manifest or shards")
    parser.add_argument("--class", dest="target_class", help="the class to explain (name or index)")
    parser.add_argument("--method", choices=typing.get_args(ExplainMethod),
                        help="attribution method (default gradcam)")
    parser.add_argument("--out", help="where explanations.parquet goes (local path or s3://)")
    parser.add_argument("--split", help="only rows of this split (manifests and shards)")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    add_config_options(parser, "ExplainConfig keys (model, input, out, target_class, method, ...)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.config import ExplainConfig
    from pipelines.predict.explain import run_explain
    from pipelines.raycluster import ensure_ray

    cfg = job_config(ExplainConfig, args, {name: getattr(args, name) for name in (
        "model", "input", "out", "target_class", "method", "split", "address")})
    ensure_ray(cfg.address)
    try:
        run_explain(cfg)
    except ValueError as refused:   # a class the model does not have
        raise SystemExit(f"rayseg explain: {refused}") from None
    return 0
