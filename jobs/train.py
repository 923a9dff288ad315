"""``rayseg train``: YAML (+ ``--set`` overrides) -> TrainConfig -> one pipelines call -> summary."""
from __future__ import annotations

import argparse
from pathlib import Path

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
"""

_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a U-Net on Ray Train (checkpoints, resume, k-fold CV)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="YAML",
                        help="training config, e.g. jobs/configs/train_sample.yaml (a bare "
                             "jobs/configs/<name>.yaml also resolves to the installed copy)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override one config key, dotted for nested sections "
                             "(repeatable), e.g. --set optim.lr=3e-3 --set scaling.num_workers=2")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without training")
    return parser


def resolve_config_path(path: str) -> Path:
    """``path`` as given, else the packaged ``jobs/configs/<file>`` (for installed images)."""
    given = Path(path)
    if given.is_file():
        return given
    packaged = _PACKAGED_CONFIGS / given.name
    if given.parent.as_posix().endswith("jobs/configs") and packaged.is_file():
        return packaged
    raise FileNotFoundError(f"--config {path}: no such file; expected a YAML such as "
                            f"jobs/configs/train_sample.yaml")


def run(args: argparse.Namespace) -> int:
    from pipelines.config import dump_config, load_train_config

    cfg = load_train_config(resolve_config_path(args.config), args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0

    from pipelines.raycluster import ensure_ray

    ensure_ray(address=args.address)
    if cfg.nfolds >= 2:
        from pipelines.cv import cross_validate

        print(cross_validate(cfg).summary())
    else:
        from pipelines.train import train

        print(train(cfg).summary())
    return 0
