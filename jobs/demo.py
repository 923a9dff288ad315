"""``rayseg demo``: flags -> DemoConfig -> pipelines.demo.run_demo -> where everything went."""
from __future__ import annotations

import argparse

from jobs.options import add_config_options, job_config, shipped_config

DESCRIPTION = """\
Run the whole platform end to end on generated data, in a few minutes on 2 CPUs:

  1. data      generate a multi-class sample dataset (PNG, JPEG, BMP, GIF and TIFF images)
  2. validate  label QA as a Ray Data job (report, class frequencies, quarantine)
  3. train     Ray Train with 2 data-parallel workers -> model artifact + learning curve
  4. evaluate  predict the val split and score it (report.md/.html, overlays, bootstrap CIs)
  5. predict   bulk inference over every image -> Parquet, exactly once
  6. serve     start the Ray Serve endpoint, send one request, stop it

Each stage prints a status line with its elapsed time.  The dataset goes to <work-dir>/sample/
(where jobs/configs/train_sample.yaml finds it), the outputs to <work-dir>/demo/, which each run
clears first; the closing table says where everything went.  With --s3 the same flow
runs against a local S3 server (moto on 127.0.0.1, a free port) that the demo starts and stops.
"""

EPILOG = """\
examples:
  rayseg demo                       # what `make demo` runs
  rayseg demo --s3                  # same flow, every URI on a local S3 server
  rayseg demo --epochs 3 --images 24 --work-dir /tmp/rayseg
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from pipelines.config import DemoConfig

    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo", help="the whole flow end to end on generated data (make demo)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", help=f"data to <work-dir>/sample/, outputs to "
                                           f"<work-dir>/demo/ (default: {defaults.work_dir})")
    parser.add_argument("--s3", action="store_true", default=None,
                        help="run against a local S3 server (moto) started for the demo")
    parser.add_argument("--images", type=int,
                        help=f"generated image/mask pairs (default: {defaults.images})")
    parser.add_argument("--size", type=int,
                        help=f"image side in pixels (default: {defaults.size})")
    parser.add_argument("--epochs", type=int,
                        help=f"training epochs (default: {defaults.epochs})")
    parser.add_argument("--workers", type=int,
                        help=f"Ray Train workers (default: {defaults.num_workers})")
    parser.add_argument("--seed", type=int, help=f"data and training seed (default: "
                                                 f"{defaults.seed})")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    add_config_options(parser, "DemoConfig keys (work_dir, images, size, epochs, num_workers, "
                               "seed, s3, train_config, serve_config, ...)")
    return parser


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from pipelines.config import DemoConfig
    from pipelines.demo import run_demo
    from pipelines.raycluster import check_shared, ensure_ray

    cfg = job_config(DemoConfig, args, {
        "work_dir": args.work_dir, "images": args.images, "size": args.size,
        "epochs": args.epochs, "num_workers": args.workers, "seed": args.seed, "s3": args.s3,
        "address": args.address})
    cfg = dataclasses.replace(  # the shipped configs, unless the YAML or --set named others
        cfg, train_config=cfg.train_config or str(shipped_config("train_sample")),
        serve_config=cfg.serve_config or str(shipped_config("serve")))
    def connect() -> dict[str, float]:
        resources = ensure_ray(cfg.address)
        if not cfg.s3:   # with --s3 every URI is on the demo's S3 server
            check_shared({"--work-dir": cfg.work_dir})
        return resources

    result = run_demo(cfg, connect=connect)
    print()
    print(result.summary())
    return 0
