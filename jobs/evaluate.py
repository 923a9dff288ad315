"""``rayseg evaluate``: flags -> EvaluateConfig -> pipelines.evaluate.evaluate.run_evaluate -> summary."""
from __future__ import annotations

import argparse
import dataclasses

from jobs.options import add_config_options, add_engine_option, job_config

DESCRIPTION = """\
Score predictions from `rayseg predict` against the ground-truth masks of a manifest (or an
images/ + masks/ prefix).  Truth masks are decoded from the original files with the model's own
mask spec (recorded next to the predictions), and compared pixel for pixel with the predicted
masks, both at full resolution.

Reports per-class IoU, Dice (= F1), precision and recall in micro, macro and per-image
reductions with the empty-mask policy stated, the confusion matrix, and 95% bootstrap intervals
over images (seeded).  Writes report.json, report.md and overlay PNGs (image | truth |
prediction | errors) of the best and worst images to --out.  With --model it predicts the split
first (into --predictions, or <out>/predictions) and scores it in one go.
"""

EPILOG = """\
examples:
  rayseg evaluate --predictions rayseg_work/preds/v1 --manifest data/manifest.csv --split val
  rayseg evaluate --model rayseg_work/models/unet/v1 --manifest data/manifest.csv --out rayseg_work/eval/v1
  rayseg evaluate --predictions s3://bucket/preds/v1 --manifest s3://bucket/data/manifest.csv \\
      --split val --empty-policy zero --bootstrap 2000 --out rayseg_work/eval/v1
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="metrics, confusion matrix, bootstrap CIs and overlays for predictions",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", help="output URI of `rayseg predict`")
    parser.add_argument("--manifest", help="ground truth: manifest or prefix")
    parser.add_argument("--model", help="predict with this model first, then score: an "
                                            "artifact URI or models:/name@alias, models:/name/N")
    add_engine_option(parser, "with --model: ")
    parser.add_argument("--split", help="split to score (default val); 'all' for every row")
    parser.add_argument("--out", help="report directory (default rayseg_work/eval)")
    parser.add_argument("--empty-policy", choices=("nan", "one", "zero"),
                        help="score of a class absent from both truth and prediction "
                             "(default nan: left out of the means)")
    parser.add_argument("--bootstrap", type=int, help="resamples for the 95%% CIs (default 1000)")
    parser.add_argument("--seed", type=int, help="bootstrap seed (default 0)")
    parser.add_argument("--overlays", type=int, help="best and worst images to draw (default 3)")
    parser.add_argument("--mask-values", help="override the model's mask values, e.g. 0,255")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    add_config_options(parser, "EvaluateConfig keys (manifest, predictions, model, split, ...)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.config import EvaluateConfig
    from pipelines.evaluate.evaluate import run_evaluate
    from pipelines.raycluster import check_manifest_shared, check_shared, ensure_ray

    flags = {name: getattr(args, name) for name in (
        "manifest", "out", "predictions", "model", "empty_policy", "bootstrap", "seed",
        "overlays", "engine", "address")}
    flags["mask_values"] = [int(v) for v in args.mask_values.split(",")] \
        if args.mask_values else None
    cfg = job_config(EvaluateConfig, args, flags)
    if args.split is not None:   # 'all' scores every row
        cfg = dataclasses.replace(cfg, split=None if args.split == "all" else args.split)
    ensure_ray(cfg.address)
    check_manifest_shared("manifest", cfg.manifest)
    # tasks read predictions (and write them first with --model); the report stays on this
    # machine, so --out may be local unless predictions go under it
    check_shared({"predictions": cfg.predictions, "model": cfg.model,
                  "out": cfg.out if cfg.model and not cfg.predictions else None})
    report = run_evaluate(cfg)
    return 0 if report["images_scored"] else 1
