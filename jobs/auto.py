"""``rayseg auto``: AutoSegmentation from the command line (:mod:`pipelines.api.auto`)."""
from __future__ import annotations

import argparse
from typing import Any

from jobs.options import ConfigError, add_config_options, job_settings, refused_as_config_error

# What --config / --set may not hold: the manifest flag names the data, and each candidate's
# share of the budget sets its schedule.
NOT_FROM_CONFIG = ("data", "epochs", "max_iterations", "max_runtime_secs", "nfolds")

DESCRIPTION = """\
Train several candidate U-Nets within one time budget and rank them, as H2O AutoML does.

The training rows are fingerprinted and planned once (rayseg plan's rules).  Candidates come
from the plan: the planned model, a wider one, the lite U-Net, and the planned model at a
second training size.  The time left after planning is split among them; each trains on Ray
Tune with its share as max_runtime_secs (its schedule fitted to it), and ASHA stops the ones
whose val mIoU trails.  Each finished model's inference pace is timed on the val images.

The leaderboard (model_id, mIoU, mDice, pixel accuracy, training seconds, images/s at
inference) is printed and written to <work-dir>/auto/<project>.json; the leader is registered
as models:/<project>@auto.  With --nfolds the candidates are cross-validated one after another
and ranked by the folds' mean mIoU.  Rows of the manifest's train split train, its val split ranks.

--config / --set give TrainConfig keys that hold for every candidate and win over the plan
(e.g. --set loss=focal --set augment.rot90=false); a dimension set there is not varied.
"""

EPILOG = """\
examples:
  rayseg auto --manifest data/manifest.csv --num-classes 3 --max-runtime-secs 600
  rayseg auto --manifest s3://bucket/streets/manifest.csv --num-classes 11 \\
      --max-runtime-secs 3600 --max-models 3 --work-dir s3://bucket/rayseg_work
  rayseg auto --manifest data/manifest.csv --max-runtime-secs 900 --set augment.vflip=false
  rayseg auto --manifest data/manifest.csv --max-runtime-secs 3600 --nfolds 3 --max-models 2
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "auto", help="AutoML: plan, train candidate models within a budget, rank them",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True,
                        help="CSV/Parquet of image, mask, split rows (train and val splits)")
    parser.add_argument("--num-classes", type=int,
                        help="K classes (default: read from the masks in one pass)")
    parser.add_argument("--mask-values", help="raw mask value of each class, e.g. 0,255")
    parser.add_argument("--max-runtime-secs", type=float, required=True,
                        help="the whole search's wall budget, planning included")
    parser.add_argument("--max-models", type=int, default=4, help="candidates, 1-4 (default 4)")
    parser.add_argument("--nfolds", type=int, default=0,
                        help="cross-validate each candidate with N >= 2 folds and rank by their "
                             "mean mIoU (default: race the candidates, ranked on the val split)")
    parser.add_argument("--seed", type=int, default=None, help="seeds every candidate")
    parser.add_argument("--project-name", help="the leader's registered name (default auto_<id>)")
    parser.add_argument("--work-dir", help="frames, runs and models (default ./rayseg_work)")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    add_config_options(parser, "TrainConfig keys every candidate keeps (loss, augment, optim, "
                       "model, ...; not data or the schedule)")
    return parser


def shared_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``--config`` and ``--set`` as the dotted TrainConfig keys every candidate keeps."""
    from pipelines.registry import flatten

    settings = job_settings(args)
    refused = sorted(k for k in settings if k in NOT_FROM_CONFIG)
    if refused:
        raise ConfigError(f"rayseg auto: {', '.join(refused)} cannot come from --config/--set: "
                          f"--manifest names the data and each candidate's share of "
                          f"--max-runtime-secs sets its schedule; drop them")
    return flatten("", settings)


def run(args: argparse.Namespace) -> int:
    from pipelines.api import import_file, init
    from pipelines.api.auto import AutoSegmentation

    mask_values = None if args.mask_values is None else [
        int(v) for v in args.mask_values.split(",")]
    # every setting is checked before Ray starts or the manifest is read
    aml = refused_as_config_error(
        AutoSegmentation, max_runtime_secs=args.max_runtime_secs, max_models=args.max_models,
        seed=args.seed, project_name=args.project_name, num_classes=args.num_classes,
        mask_values=mask_values, **({"nfolds": args.nfolds} if args.nfolds else {}),
        **shared_settings(args))
    init(args.address, work_dir=args.work_dir)
    frame = import_file(args.manifest)
    frame.require("split", role="split column (train and val rows)")
    aml.train(training_frame=frame.filter(split="train"),
              validation_frame=frame.filter(split="val"))
    return 0
