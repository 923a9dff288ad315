"""Every row rayseg writes or reads in tables, in one place: schemas, builders and decoders.

Rows move one way (object storage -> ingest -> train | predict | serve -> Parquet)::

    PAIR_SCHEMA        pair metadata from a manifest or prefix listing (before bytes are fetched)
    ROW_SCHEMA         a pair with its fetched bytes (what ingest.read_pairs yields)
    SHARD_SCHEMA       one packed pair per row (``rayseg pack``)
    QUARANTINE_SCHEMA  one rejected input, with its stable reason code and a hint for the fix
    PREDICTION_SCHEMA  one predicted mask (batch predict and the Serve endpoint write the same rows)
    RESULT_SCHEMA      what a predictor emits: a prediction, or a quarantine row (``reason`` set)
    COUNT_SCHEMA       one scored image in ``rayseg evaluate`` (per-class counts)

:func:`quarantine_row`, :func:`prediction_row` and :func:`decode_prediction` are the only builders
and decoder of those rows, so a column changes in one place.
"""
from __future__ import annotations

import datetime as dt
import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from seg_core.config import MaskSpec
    from seg_core.errors import InputError
    from seg_core.inference import Prediction, Segmenter

PAIR_SCHEMA = pa.schema([
    ("id", pa.string()), ("image_uri", pa.string()), ("mask_uri", pa.string()),
    ("split", pa.string()), ("fold", pa.int32()),
    ("refused", pa.string()),   # why ingest will not read this pair (JSON, see refusal), or null
])
"""Pair metadata, before the bytes are fetched."""

ROW_SCHEMA = pa.schema(list(PAIR_SCHEMA) + [("image_bytes", pa.binary()),
                                            ("mask_bytes", pa.binary())])
"""Rows of :func:`pipelines.ingest.read_pairs`."""

SHARD_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("image_bytes", pa.binary()),          # original encoded image (null: file missing)
    pa.field("mask_bytes", pa.binary()),           # original lossless mask (see codecs.pack_mask_parts)
    pa.field("image_format", pa.string()),         # png | jpeg | bmp | gif | tiff | null
    pa.field("height", pa.int32()),                # null when the image does not decode
    pa.field("width", pa.int32()),
    pa.field("source_uri", pa.string()),           # where image_bytes came from
    pa.field("mask_uri", pa.string()),
    pa.field("sha256", pa.string()),               # of image_bytes
    pa.field("split", pa.string()),
    pa.field("fold", pa.int32()),
])
"""One packed image/mask pair per row (``rayseg pack``)."""

QUARANTINE_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("mask_uri", pa.string()),
    pa.field("stage", pa.string()),                # validate | pack | train | predict | serve
    pa.field("reason", pa.string()),               # seg_core.errors.Reason
    pa.field("message", pa.string()),
    pa.field("hint", pa.string()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
])
"""One rejected input per row, with the stable reason code and a hint for the fix."""

OBJECT_TYPE = pa.struct([
    pa.field("id", pa.int32()),                    # its label in instance_png
    pa.field("class", pa.int32()),
    pa.field("area", pa.int64()),                  # pixels
    pa.field("centroid", pa.list_(pa.float64())),  # [y, x]
    pa.field("bbox", pa.list_(pa.int32())),        # [y0, x0, y1, x1], half-open
    pa.field("mean_confidence", pa.float64()),
])
"""One object of a predicted mask (:func:`seg_core.instances.object_table`)."""

PREDICTION_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string()),
    pa.field("source_sha256", pa.string()),
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("weights_sha256", pa.string()),       # the artifact's weights: the model's identity
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("mask_png", pa.binary()),             # class-id mask (multi-class) as PNG
    pa.field("class_mask_pngs", pa.list_(pa.binary())),   # one binary PNG per class
    pa.field("class_pixel_counts", pa.list_(pa.int64())),
    pa.field("mean_confidence", pa.float32()),
    pa.field("class_mean_confidence", pa.list_(pa.float32())),  # per class (see encode_prediction)
    pa.field("confidence_png", pa.binary(), nullable=True),
    # instances (seg_core.instances; null when the job's `instances` is none): the object
    # labels as a 16-bit PNG (0 = background, objects 1..n) and one entry per object
    pa.field("instance_png", pa.binary(), nullable=True),
    pa.field("objects", pa.list_(OBJECT_TYPE), nullable=True),
    pa.field("request_id", pa.string(), nullable=True),   # serve only
    pa.field("latency_ms", pa.float32(), nullable=True),  # serve only
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
])
"""One predicted mask per row; written by batch predict and by the Serve endpoint."""

EXPLANATION_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string()),
    pa.field("class", pa.string()),
    pa.field("method", pa.string()),               # gradcam | occlusion | integrated_gradients
    pa.field("map_png", pa.binary()),              # seg_core.explain.map_png; null: no map
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("class_pixels", pa.int64()),          # pixels predicted as the class
    pa.field("reason", pa.string()),               # an image that could not be read: why
    pa.field("message", pa.string()),
])
"""One image's attribution map of ``rayseg explain`` (:mod:`pipelines.predict.explain`)."""

RANK_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string()),
    pa.field("rank", pa.int32()),                  # 1 = label first; null: not picked
    pa.field("score", pa.float64()),               # uncertainty, higher = less sure
    # per class (seg_core.active.class_entropy): the mean of pixel entropy x the class's
    # probability, and the class's mean probability; null for --by tta
    pa.field("class_entropy", pa.list_(pa.float64())),
    pa.field("class_share", pa.list_(pa.float64())),
    pa.field("embedding", pa.list_(pa.float32())),  # pooled bottleneck features (unit length)
    pa.field("reason", pa.string()),               # an image that could not be read: why
    pa.field("message", pa.string()),
])
"""One image of ``rayseg rank`` (:mod:`pipelines.predict.rank`)."""

_EXTRA = [f for f in QUARANTINE_SCHEMA if f.name not in PREDICTION_SCHEMA.names]
RESULT_SCHEMA = pa.schema([f.with_nullable(True) for f in list(PREDICTION_SCHEMA) + _EXTRA])
"""What the predictor emits: a prediction row has ``reason`` null, a quarantine row has it set."""

COUNT_SCHEMA = pa.schema([("id", pa.string()), ("status", pa.string()), ("message", pa.string()),
                          ("tp", pa.list_(pa.int64())), ("fp", pa.list_(pa.int64())),
                          ("fn", pa.list_(pa.int64())), ("tn", pa.list_(pa.int64())),
                          ("confusion", pa.list_(pa.int64())),
                          # pixel calibration (multi-class rows with a confidence map): per
                          # confidence bin, pixels, their confidence summed, and how many were right
                          ("calibration_pixels", pa.list_(pa.int64())),
                          ("calibration_confidence", pa.list_(pa.float64())),
                          ("calibration_correct", pa.list_(pa.int64())),
                          # objects (truth from instance label masks, predictions with their
                          # instance_png): seg_core.instances.instance_metrics of the image
                          ("instances", pa.struct([(name, pa.float64()) for name in (
                              "map", "tp", "fp", "fn", "iou_sum", "splits", "merges",
                              "truth_objects", "pred_objects")]))])
"""One scored image: status ``ok`` or a reason code, counts per class, flattened K x K matrix."""


def refusal_json(error: "InputError") -> str:
    """An :class:`InputError` as the ``refused`` cell of a pair row."""
    return json.dumps({"reason": error.reason, "detail": error.detail, "source": error.source,
                       "hint": error.hint})


def refusal(cell: str | None) -> "InputError | None":
    """The :class:`InputError` a ``refused`` cell holds (None: the pair was not refused)."""
    if not cell:
        return None
    from seg_core.errors import InputError

    data = json.loads(cell)
    return InputError(data["reason"], data["detail"], source=data["source"], hint=data["hint"])


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def quarantine_row(row: dict[str, Any], error: "InputError", stage: str, *,
                   created_at: dt.datetime | None = None) -> dict[str, Any]:
    """One :data:`QUARANTINE_SCHEMA` row for the rejected input ``row`` (``id``, ``image_uri``,
    ``mask_uri`` as far as known)."""
    return {"id": row.get("id"), "image_uri": row.get("image_uri"),
            "mask_uri": row.get("mask_uri"), "stage": stage, "reason": error.reason,
            "message": str(error), "hint": error.hint, "created_at": created_at or now_utc()}


def prediction_row(prediction: "Prediction", segmenter: "Segmenter", *, id: str,
                   source_uri: str | None, source_sha256: str, model_name: str,
                   model_version: str, with_confidence: bool, weights_sha256: str | None = None,
                   created_at: dt.datetime | None = None,
                   instances: str = "none") -> dict[str, Any]:
    """One :data:`PREDICTION_SCHEMA` row for ``prediction`` (serve-only fields null), with its
    objects when ``instances`` names a method (:func:`instance_fields`)."""
    from seg_core.inference import encode_prediction

    encoded = encode_prediction(prediction, segmenter.mask_spec, with_confidence=with_confidence)
    height, width = prediction.mask.shape[-2:]
    return {"id": id, "source_uri": source_uri, "source_sha256": source_sha256,
            "model_name": model_name, "model_version": model_version,
            "weights_sha256": weights_sha256, "height": int(height), "width": int(width), **encoded,
            **instance_fields(prediction, instances, source=source_uri or id,
                              spec=segmenter.mask_spec),
            "request_id": None, "latency_ms": None, "created_at": created_at or now_utc()}


MAX_OBJECTS = 2**16 - 1   # objects a 16-bit label PNG holds


def instance_fields(prediction: "Prediction", method: str, *, source: str,
                    spec: "MaskSpec | None" = None) -> dict[str, Any]:
    """``instance_png`` and ``objects`` of a multi-class prediction cut into objects by
    ``method`` (:func:`seg_core.instances.label_instances`), or both null for ``none``.  A
    model trained on instance labels with 3 classes (``spec.instance_labels``) predicts a
    boundary class: its interiors are labelled and grown back over it.

    More than :data:`MAX_OBJECTS` objects is refused as ``too_large`` (an :class:`InputError`
    naming ``source``: the batch job quarantines the image, the endpoint answers 413).
    """
    if method == "none":
        return {"instance_png": None, "objects": None}
    from seg_core.codecs import encode_png
    from seg_core.errors import InputError
    from seg_core.instances import label_instances, object_table

    boundary = 2 if spec is not None and spec.instance_labels and spec.num_classes == 3 \
        else None
    labels = label_instances(prediction.mask, method=method,   # type: ignore[arg-type]
                             boundary_class=boundary)
    count = int(labels.max(initial=0))
    if count > MAX_OBJECTS:
        raise InputError("too_large", f"the mask holds {count:,} objects; a 16-bit label image "
                         f"holds {MAX_OBJECTS:,}", source=source,
                         hint="remove specks with postprocess min_size, or set instances: none")
    return {"instance_png": encode_png(labels.astype(np.uint16)),
            "objects": object_table(labels, prediction.mask, prediction.confidence,
                                    boundary_class=boundary)}


def decode_prediction(row: dict[str, Any], spec: "MaskSpec") -> np.ndarray:
    """The mask stored in a prediction row: H x W class ids, or K x H x W {0, 1} multi-label."""
    from PIL import Image

    if spec.multilabel:
        planes = [np.asarray(Image.open(io.BytesIO(png))) for png in row["class_mask_pngs"]]
        return (np.stack(planes) > 0).astype(np.uint8)
    return np.asarray(Image.open(io.BytesIO(row["mask_png"])))
