"""``rayseg export-masks``: PREDICTIONS -> COCO RLE JSON (one pipelines.predict.coco call)."""
from __future__ import annotations

import argparse
import typing

from jobs.options import add_config_options, job_config

DESCRIPTION = """\
Convert predicted masks (PNG in the prediction Parquet of `rayseg predict`, or of an endpoint's
log) to COCO run-length encoding, the mask format of CVAT, FiftyOne, pycocotools' COCOeval and
detectron2's sem_seg_predictions.json.  No Ray: the files are read one at a time on this machine.

PREDICTIONS is a `rayseg predict` --out (or a `rayseg serve` out_uri holding one model's rows).
--out (local path or s3://) gets, each file written whole and replaced if there:
  <out>/part-<key>.json       COCO results, one per predictions file (part-<key>.parquet; a serve
                              log's date=.../serve-*.parquet keep their folders): a list of
                              {image_id, category_id, segmentation: {size: [H, W], counts}, score}
  <out>/_coco_dataset.json    images (id, file_name = source URI, height, width, rayseg_id = the
                              row id) and categories, written last; COCO(dataset).loadRes(part)
                              loads any results file

category_id = class index + 1, named by the model's class names.  Multi-class: one RLE per class
present in the image, background included (drop its category to leave it out).  Multi-label: one
RLE per class with pixels; they may overlap.  score = the class's mean confidence.  image_id comes
from the SHA-256 of the row id: the same row has the same id in every file and run.
`rayseg predict --format coco-rle` writes the same files under <out>/coco/ after its run.
"""

EPILOG = """\
examples:
  rayseg export-masks rayseg_work/preds/v1 --out rayseg_work/preds/v1-coco
  rayseg export-masks s3://bucket/preds/today --format coco-rle --out s3://bucket/coco/today
  # then, in Python: from pycocotools.coco import COCO
  #   COCO("<out>/_coco_dataset.json").loadRes("<out>/part-<key>.json")
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from seg_core.config import MaskExportFormat

    parser = subparsers.add_parser(
        "export-masks", help="predicted masks to COCO RLE JSON (CVAT, FiftyOne, COCOeval)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", metavar="PREDICTIONS", nargs="?",
                        help="output of rayseg predict (or a serve log), local path or s3://")
    parser.add_argument("--format", choices=typing.get_args(MaskExportFormat),
                        help="export format (default coco-rle, the only one so far)")
    parser.add_argument("--out", help="where the COCO files go (local path or s3://)")
    add_config_options(parser, "ExportMasksConfig keys (predictions, out, format)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.config import ExportMasksConfig
    from pipelines.predict.coco import export_coco

    cfg = job_config(ExportMasksConfig, args, {name: getattr(args, name) for name in (
        "predictions", "out", "format")})
    try:
        export = export_coco(cfg.predictions, cfg.out)
    except ValueError as refused:   # no model record, or rows that do not fit it
        raise SystemExit(f"rayseg export-masks: {refused}") from None
    print(export.summary())
    return 0
