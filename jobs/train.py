"""``rayseg train``: YAML (+ ``--set`` overrides) -> TrainConfig -> one pipelines call -> summary."""
from __future__ import annotations

import argparse

from jobs.options import add_config_options, job_config

DESCRIPTION = """\
Train a U-Net with Ray Train (data-parallel, DDP) and write a model artifact.

The YAML maps one-to-one onto pipelines.config.TrainConfig (nested sections: data, model, mask,
preprocessing, augment, optim, scaling, storage).  --set overrides any key with a dotted path;
values are parsed as YAML.  Checkpoints go to <storage.storage_path>/<run name>/ (local or
s3://); re-running with the same run name resumes from the last checkpoint, learning-rate
schedule included.  Lost workers are restarted from the last checkpoint up to
storage.max_failures times.  The final artifact, metrics.json, learning_curve.png and the resolved
config land in <storage.models_uri>/<name>/<version>/.

With nfolds >= 2 the command runs k-fold cross-validation instead (one trainer per fold,
cv_parallelism at a time) and prints per-fold metrics with mean +- std.

Progress lines show epoch, train loss, val mIoU and images/s.
"""

EPILOG = """\
examples:
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
                               "optim, scaling, storage, ...), e.g. train_sample", required=True)
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without training")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.config import TrainConfig, dump_config

    cfg = job_config(TrainConfig, args)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0

    from pipelines.raycluster import check_manifest_shared, check_shared, ensure_ray

    ensure_ray(address=args.address)
    if cfg.data.manifest:
        check_manifest_shared("data.manifest", cfg.data.manifest)
    check_shared({"data.shards": cfg.data.shards, "storage.storage_path":
                  cfg.storage.storage_path, "storage.models_uri": cfg.storage.models_uri})
    if cfg.nfolds >= 2:
        from pipelines.train.cv import cross_validate

        print(cross_validate(cfg).summary())
    else:
        from pipelines.train.train import train

        print(train(cfg).summary())
    return 0
