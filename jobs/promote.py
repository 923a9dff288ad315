"""``rayseg promote``: flags -> PromoteConfig -> pipelines.operate.promote.promote -> exit 0 / 3."""
from __future__ import annotations

import argparse

from jobs.options import add_config_options, add_engine_option, job_config

DESCRIPTION = """\
Move a registry alias (default @champion) to a candidate model only if it earns it.

The candidate (models:/name/N, or an artifact URI, which is registered first) and the alias's
current holder are both evaluated on the same fixed split of --manifest with `rayseg evaluate`.
The alias moves when every --gate condition holds on the candidate and the candidate is no
worse than the holder on the gated metrics beyond --tolerance.  comparison.md / comparison.json
(and both evaluation reports) are written to --out either way.  With --serve-app, a running
endpoint on the connected Ray cluster switches to the new holder without failing a request.

Gate metrics: miou, mdice (macro IoU / Dice) or <macro|micro|per_image>_<iou|dice|precision|
recall>; conditions like "miou>=0.80,mdice>=0.85".

Exit status: 0 promoted, 3 kept out (gate failed or worse than the holder), 1 error.
"""

EPILOG = """\
examples:
  rayseg promote --model models:/unet/7 --gate "miou>=0.80" --manifest data/manifest.csv
  rayseg promote --model rayseg_work/models/unet/nightly-20261130 --alias champion \\
      --gate "miou>=0.80" --against champion --tolerance 0.005 --manifest s3://b/eval.csv \\
      --serve-app rayseg --address auto
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "promote", help="evaluate a candidate against the alias holder; move the alias if "
                        "the gate holds",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="candidate: models:/name/N or an artifact URI")
    parser.add_argument("--alias", help="alias to move (default champion)")
    parser.add_argument("--gate", help='conditions on the candidate, e.g. "miou>=0.80"')
    parser.add_argument("--against", help="alias whose holder the candidate must not be worse "
                                          "than (default: --alias)")
    parser.add_argument("--tolerance", type=float,
                        help="allowed shortfall against the holder (default 0)")
    parser.add_argument("--manifest", help="the fixed evaluation set: manifest or prefix")
    parser.add_argument("--split", help="split of --manifest to score (default val); 'all'")
    parser.add_argument("--out", help="report directory (default rayseg_work/promote)")
    parser.add_argument("--serve-app", help="running Serve application to switch to the new "
                                            "holder (e.g. rayseg)")
    add_engine_option(parser, "evaluation: ")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    add_config_options(parser, "PromoteConfig keys (model, gate, manifest, alias, ...)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.config import PromoteConfig
    from pipelines.operate.promote import REJECTED_EXIT, promote
    from pipelines.raycluster import ensure_ray

    flags = {name: getattr(args, name) for name in (
        "model", "alias", "gate", "against", "tolerance", "manifest", "out", "serve_app",
        "engine", "address")}
    if args.split is not None:
        flags["split"] = None if args.split == "all" else args.split
    cfg = job_config(PromoteConfig, args, flags)
    ensure_ray(cfg.address)
    decision = promote(cfg.model, alias=cfg.alias, gate=cfg.gate, manifest=cfg.manifest,
                       out=cfg.out, against=cfg.against, split=cfg.split,
                       tolerance=cfg.tolerance, serve_app=cfg.serve_app, engine=cfg.engine)
    return 0 if decision.promoted else REJECTED_EXIT
