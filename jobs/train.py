"""``rayseg train``: YAML (+ ``--set`` overrides) -> TrainConfig -> one pipelines call -> summary."""
from __future__ import annotations

import argparse

from typing import Any

from jobs.options import ConfigError, add_config_options, job_settings, refused_as_config_error

DESCRIPTION = """\
Train a U-Net with Ray Train (data-parallel, DDP) and write a model artifact.

The YAML maps one-to-one onto pipelines.config.TrainConfig (nested sections: data, model, mask,
preprocessing, augment, optim, scaling, storage).  --set overrides any key with a dotted path;
values are parsed as YAML.  Checkpoints go to <storage.storage_path>/<run name>/ (local or
s3://); re-running with the same run name resumes from the last checkpoint, learning-rate
schedule included.  Lost workers are restarted from the last checkpoint up to
storage.max_failures times.  The final artifact, metrics.json, learning_curve.png and the resolved
config land in <storage.models_uri>/<name>/<version>/.

Training uses a plan by default: one Ray Data pass fingerprints the training rows (sizes,
channels, intensities, class shares, class positions) and derives a training size or crop,
normalisation, batch size, flips, class weights and depth (`rayseg plan` shows the same
plan without training).  Every key you set wins; the run prints each planned decision with
its reason, and the ones of yours it kept.  --set plan=false trains exactly the config given.
With --max-runtime-secs the learning-rate schedule is fitted to end within the budget.

With nfolds >= 2 the command runs k-fold cross-validation instead (one trainer per fold,
cv_parallelism at a time) and prints per-fold metrics with mean +- std.

Progress lines show epoch, train loss, val mIoU and images/s.
"""

EPILOG = """\
examples:
  rayseg train --manifest data/manifest.csv --num-classes 3 --max-runtime-secs 600
      # no config: defaults, the plan, and a schedule that ends within 10 minutes
  rayseg train --config jobs/configs/train_sample.yaml
  rayseg train --config jobs/configs/train_sample.yaml --set epochs=3 --set optim.lr=3e-3
  rayseg train --config jobs/configs/train_isbi.yaml --set scaling.num_workers=2 \\
      --set storage.storage_path=s3://bucket/ray_results --set storage.models_uri=s3://bucket/models
  rayseg train --config jobs/configs/train_sample.yaml --set nfolds=3      # cross-validation
  rayseg train --config jobs/configs/train_sample.yaml --print-config      # resolved YAML only
  rayseg train --config jobs/configs/train_isbi.yaml --set model.arch=lite  # lite U-Net
  rayseg train ... --set scaling.num_workers=2 --set 'scaling.resources_per_worker={train_node: 1}'
      # one worker per node that declares the custom resource train_node: 1 (README, cluster)
"""

def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a U-Net on Ray Train (checkpoints, resume, k-fold CV)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(parser, "TrainConfig keys (data, model, mask, preprocessing, augment, "
                               "optim, scaling, storage, ...), e.g. train_sample")
    parser.add_argument("--manifest", help="data.manifest: CSV/Parquet of image, mask, split rows")
    parser.add_argument("--shards", help="data.shards: a prefix of `rayseg pack` shards")
    parser.add_argument("--num-classes", type=int,
                        help="K classes (sets mask.num_classes and model.num_classes)")
    parser.add_argument("--max-runtime-secs", type=float,
                        help="wall-time budget from the start; the schedule is fitted to it")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config as given (before the plan; `rayseg plan` shows it) as "
                             "YAML and exit without training")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.config import config_from_dict, dump_config

    settings = train_settings(args)
    cfg = refused_as_config_error(config_from_dict, settings)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0

    from pipelines.plan.apply import plan_settings
    from pipelines.raycluster import check_manifest_shared, check_shared, ensure_ray

    ensure_ray(address=args.address)
    if cfg.data.manifest:
        check_manifest_shared("data.manifest", cfg.data.manifest)
    check_shared({"data.shards": cfg.data.shards, "storage.storage_path":
                  cfg.storage.storage_path, "storage.models_uri": cfg.storage.models_uri})
    cfg = config_from_dict(plan_settings(settings)[0])
    if cfg.nfolds >= 2:
        from pipelines.train.cv import cross_validate

        print(cross_validate(cfg).summary())
    else:
        from pipelines.train.train import train

        print(train(cfg).summary())
    return 0


def train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The user's settings (``--config``, flags, ``--set``) as plain data; the plan fills
    around them.  Without a config, ``--manifest`` or ``--shards`` and ``--num-classes`` say
    what to train on."""
    flags = {"data.manifest": args.manifest, "data.shards": args.shards,
             "mask.num_classes": args.num_classes, "model.num_classes": args.num_classes,
             "max_runtime_secs": args.max_runtime_secs}
    settings = job_settings(args, flags)
    if not args.config and not (args.manifest or args.shards):
        raise ConfigError("say what to train on: --config YAML, or --manifest "
                          "CSV (or --shards PREFIX) with --num-classes K")
    data = settings.get("data", {})
    if args.manifest and "shards" in data or args.shards and "manifest" in data:
        data.pop("shards" if args.manifest else "manifest")   # the flag replaces the config's
    if settings.get("mask", {}).get("multilabel") and "loss" not in settings:
        settings["loss"] = "bce_dice"   # the default loss (dice_ce) is multi-class
    return settings
