"""``rayseg plan``: a dataset fingerprint and the training plan derived from it."""
from __future__ import annotations

import argparse

from jobs.validate import _default_out, add_source_and_mask_options, validate_config

DESCRIPTION = """\
Look at the data before choosing settings, as nnU-Net does: one Ray Data pass (the same as
`rayseg validate`, whose report and quarantine it also writes) measures every pair's size,
channels, intensities, class pixels and where each class sits in the image, and writes
fingerprint.json.  A documented rule set (pipelines/plan/rules.py) turns it into plan.yaml, a
training config fragment, and prints each decision with its reason:

  - crop or resize, and the inference tile, from the image sizes;
  - normalisation from the data's per-channel mean and std;
  - the batch size from the training size;
  - flips and rot90 only when no class depends on its position (sky above road);
  - class weights and a Dice term when a class is rare;
  - the U-Net depth and width.

Train with it: rayseg train --config OUT/plan.yaml --set data.manifest=SOURCE (any key you set
wins).
"""

EPILOG = """\
examples:
  rayseg plan data/streets/manifest.csv --num-classes 11 --ignore-index 255
  rayseg plan s3://bucket/nuclei/manifest.csv --num-classes 2 --mask-values 0,255 --out s3://bucket/plans/nuclei
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="fingerprint a dataset and derive a training plan (plan.yaml) from it",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_and_mask_options(parser)
    parser.add_argument("--out", help="output URI (default rayseg_work/plan/<name>-<time>)")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    parser.set_defaults(max_bad=None)
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.plan.plan import plan_source
    from pipelines.raycluster import check_manifest_shared, ensure_ray

    cfg = validate_config(args)
    out = cfg.out or _default_out(cfg.source, "plan")
    ensure_ray(address=cfg.address)
    check_manifest_shared("SOURCE", cfg.source)
    report, plan = plan_source(cfg.source, cfg.mask, out, max_pixels=cfg.max_pixels,
                               log=lambda line: print(line, flush=True))
    print(f"{report.ok} of {report.total} pairs usable ({report.quarantined} quarantined: see "
          f"{out}/quarantine.parquet)")
    print("plan:")
    for reason in plan.reasons:
        print(f"  - {reason}")
    print(f"outputs: {out}  (fingerprint.json, plan.yaml, report.json, quarantine.parquet)")
    print(f"train with it: rayseg train --config {out}/plan.yaml --set data.manifest={cfg.source}")
    return 0
