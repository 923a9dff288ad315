"""pipelines.records: the row contracts every job writes, and their one builder/decoder each."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from pipelines import records
from seg_core.codecs import encode_png
from seg_core.config import MaskSpec
from seg_core.errors import InputError


def test_schemas_have_the_contract_columns():
    assert records.SHARD_SCHEMA.names == [
        "id", "image_bytes", "mask_bytes", "image_format", "height", "width", "source_uri",
        "mask_uri", "sha256", "split", "fold"]
    assert records.QUARANTINE_SCHEMA.names == [
        "id", "image_uri", "mask_uri", "stage", "reason", "message", "hint", "created_at"]
    p = records.PREDICTION_SCHEMA
    assert p.names == [
        "id", "source_uri", "source_sha256", "model_name", "model_version", "weights_sha256",
        "height", "width", "mask_png", "class_mask_pngs", "class_pixel_counts", "mean_confidence",
        "class_mean_confidence", "confidence_png", "instance_png", "objects", "request_id",
        "latency_ms", "created_at"]
    assert p.field("instance_png").nullable and p.field("objects").nullable
    assert p.field("objects").type.value_type.names == [
        "id", "class", "area", "centroid", "bbox", "mean_confidence"]
    assert p.field("class_mean_confidence").type == pa.list_(pa.float32())
    assert p.field("class_mask_pngs").type == pa.list_(pa.binary())
    assert p.field("class_pixel_counts").type == pa.list_(pa.int64())
    assert p.field("mean_confidence").type == pa.float32()
    assert p.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert p.field("request_id").nullable and p.field("latency_ms").nullable


def test_result_schema_is_prediction_plus_quarantine_columns_all_nullable():
    names = records.RESULT_SCHEMA.names
    assert names[:len(records.PREDICTION_SCHEMA)] == records.PREDICTION_SCHEMA.names
    assert set(names) == set(records.PREDICTION_SCHEMA.names) | set(records.QUARANTINE_SCHEMA.names)
    assert all(field.nullable for field in records.RESULT_SCHEMA)


def test_quarantine_row_names_the_input_the_reason_and_the_fix():
    error = InputError("corrupt", "cannot decode", source="s3://b/x.png",
                       hint="re-export the file")
    when = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    row = records.quarantine_row({"id": "x", "image_uri": "s3://b/x.png"}, error, "predict",
                                 created_at=when)
    assert row == {"id": "x", "image_uri": "s3://b/x.png", "mask_uri": None, "stage": "predict",
                   "reason": "corrupt", "message": str(error), "hint": "re-export the file",
                   "created_at": when}
    assert "s3://b/x.png" in row["message"]
    assert pa.Table.from_pylist([row], schema=records.QUARANTINE_SCHEMA).num_rows == 1
    fresh = records.quarantine_row({"id": "y"}, error, "train")["created_at"]
    assert fresh.tzinfo is not None and abs((records.now_utc() - fresh).total_seconds()) < 60


def test_decode_prediction_reads_back_class_ids_and_label_planes():
    ids = np.array([[0, 2, 1], [1, 0, 2]], np.uint8)              # 2 x 3, not square
    assert records.decode_prediction({"mask_png": encode_png(ids)}, MaskSpec(3)).tolist() \
        == ids.tolist()
    planes = np.array([[[1, 0, 0], [0, 0, 1]], [[0, 1, 1], [0, 0, 0]]], np.uint8)
    row = {"class_mask_pngs": [encode_png(p * 255) for p in planes]}   # stored as 0/255
    decoded = records.decode_prediction(row, MaskSpec(2, multilabel=True))
    assert decoded.dtype == np.uint8 and decoded.tolist() == planes.tolist()


def test_instance_fields_label_objects_and_refuse_too_many(monkeypatch):
    import io

    from PIL import Image

    from seg_core.errors import InputError
    from seg_core.inference.segmenter import Prediction

    mask = np.zeros((20, 30), np.uint8)
    mask[2:6, 3:9] = 1
    mask[10:18, 20:28] = 2
    prediction = Prediction(probs=None, mask=mask, confidence=np.full(mask.shape, 0.75,
                                                                        np.float32), entropy=None)
    assert records.instance_fields(prediction, "none", source="x") == {
        "instance_png": None, "objects": None}
    found = records.instance_fields(prediction, "components", source="x")
    labels = np.asarray(Image.open(io.BytesIO(found["instance_png"])))
    assert labels.dtype == np.uint16 and labels.max() == 2
    assert [(o["id"], o["class"], o["area"], o["bbox"]) for o in found["objects"]] == [
        (1, 1, 24, [2, 3, 6, 9]), (2, 2, 64, [10, 20, 18, 28])]
    assert found["objects"][0]["centroid"] == [3.5, 5.5]
    assert found["objects"][1]["mean_confidence"] == 0.75
    monkeypatch.setattr(records, "MAX_OBJECTS", 1)
    with pytest.raises(InputError, match="2 objects") as refused:
        records.instance_fields(prediction, "components", source="img.png")
    assert refused.value.reason == "too_large" and refused.value.source == "img.png"


def test_a_boundary_class_model_separates_touching_objects_in_its_rows():
    import io

    from PIL import Image

    from seg_core.inference.segmenter import Prediction
    from seg_core.instances import boundary_target

    truth = np.zeros((12, 16), np.int32)
    truth[1:7, 1:7], truth[1:7, 7:13] = 1, 2             # two touching squares
    classes = boundary_target(truth)                       # what a 3-class model predicts
    prediction = Prediction(probs=None, mask=classes, entropy=None,
                            confidence=np.ones(truth.shape, np.float32))
    spec = MaskSpec(num_classes=3, instance_labels=True)
    found = records.instance_fields(prediction, "components", source="x", spec=spec)
    labels = np.asarray(Image.open(io.BytesIO(found["instance_png"])))
    assert labels.max() == 2 and np.array_equal(labels > 0, truth > 0)   # grown over the edge
    assert [o["area"] for o in found["objects"]] == [36, 36]
    assert [o["class"] for o in found["objects"]] == [1, 1]              # interior, not edge
    # without the spec the boundary is a class like any other: its ring becomes objects too
    plain = records.instance_fields(prediction, "components", source="x")
    assert any(o["class"] == 2 for o in plain["objects"])
