"""``rayseg evaluate``: flags -> EvaluateConfig -> pipelines.evaluate.run_evaluate -> summary."""
from __future__ import annotations

import argparse

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
    parser.add_argument("--manifest", required=True, help="ground truth: manifest or prefix")
    parser.add_argument("--model", help="predict with this artifact first, then score")
    parser.add_argument("--split", default="val", help="split to score; 'all' for every row")
    parser.add_argument("--out", default="rayseg_work/eval", help="report directory")
    parser.add_argument("--empty-policy", choices=("nan", "one", "zero"), default="nan",
                        help="score of a class absent from both truth and prediction "
                             "(nan: left out of the means)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--overlays", type=int, default=3, help="best and worst images to draw")
    parser.add_argument("--mask-values", help="override the model's mask values, e.g. 0,255")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.evaluate import EvaluateConfig, run_evaluate

    mask_values = tuple(int(v) for v in args.mask_values.split(",")) if args.mask_values else None
    cfg = EvaluateConfig(
        manifest=args.manifest, out=args.out, predictions=args.predictions, model=args.model,
        split=None if args.split == "all" else args.split, empty_policy=args.empty_policy,
        bootstrap=args.bootstrap, seed=args.seed, overlays=args.overlays,
        mask_values=mask_values, address=args.address)
    report = run_evaluate(cfg)
    return 0 if report["images_scored"] else 1
