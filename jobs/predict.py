"""``rayseg predict``: YAML/flags -> PredictConfig -> pipelines.predict.predict.run_predict -> summary."""
from __future__ import annotations

import argparse
import typing

from jobs.options import add_config_options, add_engine_option, job_config

DESCRIPTION = """\
Bulk offline inference.  Reads images through the ingest sources (a manifest CSV/Parquet, a
prefix with images/ [and masks/], a bare prefix of images, or shards from `rayseg pack`; masks
are never needed), runs the model artifact in a Ray Data actor pool (the artifact is loaded once
per actor; one actor per GPU when the cluster has GPUs), and writes one Parquet row per image:
id, source URI and SHA-256, model name and version, height, width, the mask as PNG (plus one PNG
per class), per-class pixel counts, mean confidence overall and per class, an optional
confidence-map PNG, created_at.  Multi-label models: mask_png is a bit field (bit k = class k)
and the per-class PNGs are the masks to use.

Exactly once and resumable: every Parquet file under --out is committed atomically, so after a
crash simply run the same command again; it skips (and counts) the inputs already done and
writes no duplicates.  Unreadable images go to <out>/_quarantine/ with their reason and a hint,
so inputs = predicted + quarantined.  Large images are predicted tile by tile.

--format coco-rle also writes the masks as COCO run-length encoding (for CVAT, FiftyOne,
COCOeval) under <out>/coco/ once the run has committed: one part-<key>.json of COCO results per
part-<key>.parquet, and _coco_dataset.json (images, categories); a rerun writes them again, new
rows included.  `rayseg export-masks --help` describes the files (it makes the same ones from
any predictions).  The Parquet store is written all the same: it is what a rerun resumes from,
and it holds the provenance.

--instances components|watershed cuts each mask into objects (connected components per class,
or a watershed from the distance transform's maxima, which separates touching objects): each
row gains instance_png (a 16-bit label PNG, 0 = background) and objects (id, class, area,
centroid, bbox, mean confidence).  The artifact's per-class post-processing (chosen on val by
training; `rayseg tune-postprocess`) is applied first; --set postprocess={} turns it off.
"""

EPILOG = """\
examples:
  rayseg predict --model rayseg_work/models/unet/v1 --input data/manifest.csv --out rayseg_work/preds/v1
  rayseg predict --config jobs/configs/predict.yaml --input s3://bucket/new_images/ --tta
  rayseg predict --model s3://bucket/models/unet/v1 --input s3://bucket/shards/ \\
      --out s3://bucket/preds/2026-11-24 --confidence-maps --actors 4 --batch-size 16
  rayseg predict ... --actors 2 --set 'resources_per_actor={predict_node: 1}'
      # one actor per node that declares the custom resource predict_node: 1 (README, cluster)
  rayseg predict --model rayseg_work/models/unet/v1 --input data/manifest.csv \\
      --out rayseg_work/preds/v1 --format coco-rle     # + rayseg_work/preds/v1/coco/*.json
"""

_FLAGS = ("model", "input", "out", "split", "tta", "engine", "confidence_maps", "batch_size",
          "actors",
          "cpus_per_actor", "rows_per_file", "address", "progress", "verify_done", "format",
          "instances")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from seg_core.config import InstanceMethod, PredictFormat

    parser = subparsers.add_parser(
        "predict", help="bulk inference over a dataset to Parquet (exactly once, resumable)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser, "PredictConfig keys, e.g. predict (jobs/configs/predict.yaml)")
    parser.add_argument("--model", help="model artifact directory (local path or s3://), or a "
                                            "registry URI: models:/name@alias, models:/name/N")
    parser.add_argument("--input", help="manifest, images/ prefix, bare image prefix or shards")
    parser.add_argument("--out", help="output prefix for the Parquet files (local path or s3://)")
    parser.add_argument("--split", help="only rows of this split (manifests and shards)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="flip test-time augmentation, averaged in probability space")
    add_engine_option(parser)
    parser.add_argument("--confidence-maps", action=argparse.BooleanOptionalAction, default=None,
                        help="store an 8-bit confidence-map PNG per image")
    parser.add_argument("--batch-size", type=int, help="images per predictor call, i.e. per Ray task (default 16)")
    parser.add_argument("--actors", type=int,
                        help="predictor actors (default: one per GPU, else one per CPU)")
    parser.add_argument("--cpus-per-actor", type=float, help="CPUs reserved per actor")
    parser.add_argument("--rows-per-file", type=int,
                        help="rows per committed Parquet file, the unit of resume (default: "
                             "the input's rows per shard for shards from rayseg pack, so one "
                             "output file per input shard; else 256)")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="Ray Data progress bars (default on)")
    parser.add_argument("--verify-done", action=argparse.BooleanOptionalAction, default=None,
                        help="on a rerun, read the inputs already done again and report any "
                             "whose bytes changed since (default off: ids and paths are "
                             "checked, bytes are not re-read)")
    parser.add_argument("--format", choices=typing.get_args(PredictFormat),
                        help="parquet (default): the Parquet store only; coco-rle: also the "
                             "masks as COCO RLE JSON under <out>/coco/ after the run commits")
    parser.add_argument("--instances", choices=typing.get_args(InstanceMethod),
                        help="cut masks into objects: none (default), components, watershed")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.config import PredictConfig
    from pipelines.predict.predict import run_predict
    from pipelines.raycluster import check_manifest_shared, check_shared, ensure_ray

    cfg = job_config(PredictConfig, args, {k: getattr(args, k) for k in _FLAGS})
    from pipelines.predict.store import LeaseHeld

    ensure_ray(cfg.address)
    check_manifest_shared("input", cfg.input)
    check_shared({"model": cfg.model, "out": cfg.out})
    try:
        summary = run_predict(cfg)
    except LeaseHeld as held:   # another run writes to this --out: say who, change nothing
        raise SystemExit(f"rayseg predict: {held}") from None
    return 0 if summary["duplicates"] == summary["missing"] == len(summary["conflicts"]) == 0 \
        else 1
