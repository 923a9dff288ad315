"""Predicted masks as COCO run-length encoding: a predictions store -> COCO results JSON.

Annotation and evaluation tools (CVAT, FiftyOne, pycocotools' ``COCOeval``, detectron2's
``sem_seg_predictions.json``) read masks as COCO RLE, not as PNG cells in Parquet.
``rayseg export-masks`` and ``rayseg predict --format coco-rle`` (into ``<out>/coco/``) write,
from a predictions store of either layout (read with :func:`pipelines.predictions.scan`)::

    <out>/part-<key>.json            COCO *results*, one per predictions file, named after it (a
    <out>/date=.../serve-*.json      serve log's files keep their folders): a list of
                                     {image_id, category_id, segmentation: {size: [H, W],
                                      counts}, score}
    <out>/_coco_dataset.json         the COCO *dataset* the results refer to: info (model,
                                     weights, mask kind), images, categories, annotations: []

so ``COCO("<out>/_coco_dataset.json").loadRes("<out>/part-<key>.json")`` loads any results file.
The dataset file is written last, after every results file (on a first export, its presence
means the export finished).

- ``category_id`` is the class index + 1: COCO's ids start at 1, and Datumaro (CVAT's COCO
  importer) reads 0 as "no label", which would lose class 0 of a multi-label model.  Names come
  from the mask spec of the model record beside the predictions
  (:func:`pipelines.predictions.model_record`, as ``rayseg evaluate`` reads it).
- Multi-class: one RLE per class present in the image, *background included* (as detectron2's
  semantic-segmentation predictions), so an image's RLEs tile it exactly and decode back to the
  stored mask; a consumer that wants no background drops that category.  Multi-label: one RLE
  per class with any pixel, and they may overlap.  A class with no pixel gets no RLE.
- ``score``: the class's mean confidence (``class_mean_confidence``), else the row's
  ``mean_confidence`` (rounded to 6 decimals).
- ``image_id``: from the SHA-256 of the row id (:func:`image_id`), so one row has one id in every
  file, shard and run; ``images[].rayseg_id`` maps it back, ``file_name`` is the source URI.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pipelines import storage
from pipelines.predictions import model_record, prediction_files, scan
from pipelines.records import decode_prediction
from seg_core.config import MaskSpec, from_dict

DATASET_FILE = "_coco_dataset.json"
COCO_DIR = "coco"            # where `rayseg predict --format coco-rle` writes, under its --out
PROGRESS_EVERY_S = 10.0      # at most one progress line this often
_COLUMNS = ["id", "source_uri", "height", "width", "mask_png", "class_mask_pngs",
            "mean_confidence", "class_mean_confidence"]


@dataclass(frozen=True)
class CocoExport:
    """What an export wrote: results files, images and annotations (RLEs), under ``out``."""

    out: str
    files: int
    images: int
    annotations: int

    def summary(self) -> str:
        """The one line ``rayseg export-masks`` (and ``predict --format coco-rle``) prints."""
        return (f"export-masks: {self.files} COCO RLE results file(s), {self.images} images, "
                f"{self.annotations} annotations -> {self.out} (images and categories in "
                f"{DATASET_FILE})")


def image_id(row_id: str) -> int:
    """The COCO image id of the row ``row_id``: the first 52 bits of its SHA-256, plus one.

    The same id in every file, shard and run; positive, and below 2**53, so JavaScript tools
    read it exactly.  :func:`export_coco` refuses a collision.
    """
    return (int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big") >> 12) + 1


def categories(spec: MaskSpec) -> list[dict[str, Any]]:
    """COCO categories of ``spec``: id = class index + 1, the class's name."""
    return [{"id": k + 1, "name": name} for k, name in enumerate(spec.names)]


def row_annotations(row: dict[str, Any], spec: MaskSpec, image: int) -> list[dict[str, Any]]:
    """The COCO results of one prediction row: one RLE per class with a pixel (module doc)."""
    from pycocotools import mask as rle

    mask = decode_prediction(row, spec)   # H x W class ids, or K x H x W {0, 1}
    if spec.multilabel:
        planes = [(k, plane) for k, plane in enumerate(mask) if plane.any()]
    else:
        present = np.unique(mask)
        if present.size and present[-1] >= spec.num_classes:
            raise ValueError(f"row {row['id']!r}: class id {int(present[-1])} in a mask of "
                             f"{spec.num_classes} classes; the row does not match the model "
                             f"record's mask_spec")
        planes = [(int(k), (mask == k).astype(np.uint8)) for k in present]
    out = []
    for k, plane in planes:
        encoded = rle.encode(np.asfortranarray(plane))   # column-major, as COCO counts run
        out.append({"image_id": image, "category_id": k + 1,
                    "segmentation": {"size": [int(n) for n in encoded["size"]],
                                     "counts": encoded["counts"].decode("ascii")},
                    "score": _score(row, k)})
    return out


def export_coco(predictions: str, out: str, *, log: Callable[[str], None] = print,
                storage_options: dict[str, Any] | None = None) -> CocoExport:
    """Write the COCO files of every row under ``predictions`` to ``out`` (module doc).

    One predictions file at a time, so memory holds one file's rows plus the image list.  A
    row id met again (a serve log is written at least once) keeps its first rows only.  Files
    already under ``out`` are replaced, each whole (:func:`pipelines.storage.write_bytes`).
    """
    record = model_record(predictions, storage_options)
    spec = from_dict(MaskSpec, record["mask_spec"])
    files = prediction_files(predictions, storage_options)
    log(f"export-masks: {len(files)} predictions file(s) under {predictions} -> {out} "
        f"(coco-rle, {'multi-label' if spec.multilabel else 'multi-class'}, "
        f"{spec.num_classes} categories)")
    images: dict[int, dict[str, Any]] = {}
    annotations, shown = 0, time.monotonic()
    for done, file in enumerate(files, 1):
        rows = scan(predictions, _COLUMNS, weights=record.get("weights_sha256"), files=[file],
                    storage_options=storage_options)
        results = []
        for row in rows.to_pylist():
            number = image_id(row["id"])
            if number in images:
                _check_same_row(images[number], row, file)
                continue
            images[number] = {"id": number, "file_name": row["source_uri"] or row["id"],
                              "height": row["height"], "width": row["width"],
                              "rayseg_id": row["id"]}
            try:
                results += row_annotations(row, spec, number)
            except ValueError as bad:
                raise ValueError(f"{file}: {bad}") from bad
        storage.write_bytes(_results_uri(predictions, file, out), _json(results),
                            storage_options)
        annotations += len(results)
        if time.monotonic() - shown >= PROGRESS_EVERY_S:
            log(f"export-masks: {done}/{len(files)} files, {len(images)} images, "
                f"{annotations} annotations")
            shown = time.monotonic()
    storage.write_bytes(storage.join_uri(out, DATASET_FILE),
                        _json(_dataset(predictions, record, spec, list(images.values()))),
                        storage_options)
    return CocoExport(out=out, files=len(files), images=len(images), annotations=annotations)


def coco_dir(predictions_out: str) -> str:
    """Where ``rayseg predict --format coco-rle`` puts the COCO files of its ``--out``."""
    return storage.join_uri(predictions_out, COCO_DIR)


def _score(row: dict[str, Any], k: int) -> float:
    per_class = row["class_mean_confidence"]
    value = per_class[k] if per_class and per_class[k] is not None else row["mean_confidence"]
    if value is None:
        raise ValueError(f"row {row['id']!r} records no confidence (class_mean_confidence and "
                         f"mean_confidence are null), which a COCO result's score needs")
    return round(float(value), 6)


def _check_same_row(known: dict[str, Any], row: dict[str, Any], file: str) -> None:
    """Two row ids on one image id would merge two images' masks: refuse it."""
    if known["rayseg_id"] != row["id"]:
        raise ValueError(f"{file}: row ids {known['rayseg_id']!r} and {row['id']!r} share the "
                         f"COCO image id {known['id']} (a SHA-256 collision of 52 bits); rename "
                         f"one of them in the input and predict it again")


def _results_uri(predictions: str, file: str, out: str) -> str:
    """``<out>/<file's path below predictions, .json>``: part-<key>.parquet -> part-<key>.json."""
    base = storage.strip_scheme(predictions).rstrip("/")   # relative and file:// made absolute
    relative = storage.strip_scheme(file)[len(base):].lstrip("/")
    return storage.join_uri(out, relative.removesuffix(".parquet") + ".json")


def _dataset(predictions: str, record: dict[str, Any], spec: MaskSpec,
             images: list[dict[str, Any]]) -> dict[str, Any]:
    """The COCO dataset the results refer to; ``annotations`` is empty (they are the results)."""
    info = {"description": f"rayseg predictions of {record.get('name')}:"
                           f"{record.get('version')} as COCO RLE results",
            "rayseg_predictions": predictions, "weights_sha256": record.get("weights_sha256"),
            "multilabel": spec.multilabel,
            "category_id": "class index + 1 (multi-class: the background class included)"}
    return {"info": info, "images": images, "categories": categories(spec), "annotations": []}


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"
