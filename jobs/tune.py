"""``rayseg tune``: a training YAML + a grid YAML -> one trial per combination on Ray Tune."""
from __future__ import annotations

import argparse

from jobs.options import add_config_options

DESCRIPTION = """\
Grid search (H2O's GridSearch) on Ray Tune: one `rayseg train` per combination of the grid's
hyperparameters, each a Ray Train run, with ASHA stopping the trials whose val mIoU trails at
each rung (every epoch is validated).  Finished trials write and register their artifact like
any `rayseg train`; the table of trials (parameters, val mIoU / mDice, epochs, stopped early,
registry URI) is printed best first and written to <storage.storage_path>/<grid id>/grid.json.

The grid YAML holds `hyper_params` (dotted TrainConfig keys -> lists of values) and optional
`search_criteria`: strategy (Cartesian | RandomDiscrete), max_models, seed, max_runtime_secs,
parallelism (trials at once, default 2), grace_period and reduction_factor (ASHA).
"""

EPILOG = """\
examples:
  rayseg tune --config jobs/configs/train_sample.yaml --grid jobs/configs/grid_sample.yaml
  rayseg tune --config jobs/configs/train_isbi.yaml --grid my_grid.yaml --set epochs=40
  rayseg runs --compare <run> <run>       # then compare what the grid tracked
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tune", help="grid search over training settings on Ray Tune (ASHA early stopping)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser, "TrainConfig keys of the base run, e.g. train_sample",
                       required=True)
    parser.add_argument("--grid", required=True,
                        help="grid YAML: hyper_params (dotted keys -> values) and "
                             "search_criteria; a path or a shipped name (grid_sample)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    return parser


def run(args: argparse.Namespace) -> int:
    from jobs.options import resolve_config_path
    from pipelines.raycluster import ensure_ray
    from pipelines.train.tune import run_grid_yaml

    ensure_ray(address=args.address)
    table = run_grid_yaml(resolve_config_path(args.config), resolve_config_path(args.grid),
                          getattr(args, "overrides", ()))
    print(table)
    return 0
