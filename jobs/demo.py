"""``rayseg demo``: flags -> DemoConfig -> pipelines.demo.run_demo -> where everything went."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Run the whole platform end to end on generated data, in a few minutes on 2 CPUs:

  1. data      generate a multi-class sample dataset (PNG, JPEG, BMP, GIF and TIFF images)
  2. validate  label QA as a Ray Data job (report, class frequencies, quarantine)
  3. train     Ray Train with 2 data-parallel workers -> model artifact + learning curve
  4. evaluate  predict the val split and score it (report.md, overlays, bootstrap CIs)
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
    from pipelines.demo import DemoConfig

    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo", help="the whole flow end to end on generated data (make demo)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=defaults.work_dir,
                        help="data to <work-dir>/sample/, outputs to <work-dir>/demo/ (default: %(default)s)")
    parser.add_argument("--s3", action="store_true",
                        help="run against a local S3 server (moto) started for the demo")
    parser.add_argument("--images", type=int, default=defaults.images,
                        help="generated image/mask pairs (default: %(default)s)")
    parser.add_argument("--size", type=int, default=defaults.size,
                        help="image side in pixels (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help="training epochs (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=defaults.num_workers,
                        help="Ray Train workers (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="data and training seed")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.demo import DemoConfig, run_demo

    cfg = DemoConfig(work_dir=args.work_dir, images=args.images, size=args.size,
                     epochs=args.epochs, num_workers=args.workers, seed=args.seed, s3=args.s3,
                     address=args.address)
    result = run_demo(cfg)
    print()
    print(result.summary())
    return 0
