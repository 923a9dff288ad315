"""Issue 20: the README's multi-label flow on moto S3, train -> predict -> model_performance ->
serve, with the per-class metrics checked against counts computed here for the two validation
images (one of which carries an ``ignore=`` mask), and ``pathlib.Path`` accepted as a URI.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import storage
from seg_core.codecs import encode_png

K = 3
VOID = (slice(10, 30), slice(20, 44))   # the ignored block of the first val image


def _planes(root: Path, mask_value: str) -> tuple[np.ndarray, np.ndarray]:
    """Truth K x H x W {0, 1} and the H x W ignore plane of one manifest mask value."""
    classes, ignore = [], None
    for part in mask_value.split(";"):
        name = part.removeprefix("ignore=")
        plane = np.asarray(Image.open(root / name)) > 0
        if part.startswith("ignore="):
            ignore = plane
        else:
            classes.append(plane)
    truth = np.stack(classes).astype(np.uint8)
    return truth, np.zeros(truth.shape[1:], bool) if ignore is None else ignore


def _hand_scores(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-class IoU, Dice, precision, recall from counts summed over the images, each class a
    binary problem, ignored pixels left out.  The stated empty policy: a class absent from truth
    and prediction is nan; otherwise a 0/0 ratio (precision with no predicted pixel) is 0."""
    tp, fp, fn = (np.zeros(K) for _ in range(3))
    for pred, truth, ignore in pairs:
        keep = ~ignore
        for k in range(K):
            p, t = pred[k].astype(bool) & keep, truth[k].astype(bool) & keep
            tp[k] += (p & t).sum()
            fp[k] += (p & ~t).sum()
            fn[k] += (~p & t).sum()
    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        out = np.divide(num, den, out=np.zeros(K), where=den > 0)
        return np.where(tp + fp + fn == 0, np.nan, out)

    return {"iou": ratio(tp, tp + fp + fn), "dice": ratio(2 * tp, 2 * tp + fp + fn),
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn)}


@pytest.fixture
def ml_dataset(tmp_path) -> Path:
    """8 multi-label scenes of 48 x 64 (6 train / 2 val); the first val row gets an ignore mask."""
    from seg_core.sample_data import generate_sample_dataset

    manifest = generate_sample_dataset(tmp_path / "ml", n=8, size=(48, 64), seed=1,
                                       multilabel=True, num_classes=K, formats=("png",))
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    void = np.zeros((48, 64), np.uint8)
    void[VOID] = 255
    (manifest.parent / "masks" / "void.png").write_bytes(encode_png(void))
    first_val = next(r for r in rows if r["split"] == "val")
    first_val["mask"] += ";ignore=masks/void.png"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.mark.slow
def test_multilabel_flow_on_s3_matches_hand_counts(ray_session, s3_prefix, ml_dataset,
                                                    one_torch_thread, monkeypatch):
    from pipelines.api import api
    from pipelines.serve.app import start_endpoint, stop_endpoint
    from tests.serve_util import endpoint_config

    root = ml_dataset.parent
    data_uri = storage.copy_dir_from_local(root, f"{s3_prefix}/data")
    monkeypatch.setitem(api._SESSION, "work_dir", None)
    api.init(work_dir=f"{s3_prefix}/work")
    assert api.import_file(ml_dataset).nrow == 8        # a pathlib.Path is a URI too
    data = api.import_file(f"{data_uri}/manifest.csv")
    train, valid = data.filter(split="train"), data.filter(split="val")
    assert valid.nrow == 2
    model = api.UNetSegmentationEstimator(
        x="image", y="mask", training_frame=train, validation_frame=valid, seed=123,
        multilabel=True, num_classes=K, base_width=8, depth=2, batch_size=2, epochs=4,
        log_every_steps=0)
    model.train()
    assert model.artifact_uri.startswith("s3://")

    predictions = model.predict(valid)
    perf = model.model_performance(valid)
    assert perf.images == 2
    pairs, predicted = [], {}
    for row in valid.as_data_frame().to_dict("records"):
        masks = predictions.mask(row["id"])                # K x H x W {0, 1}
        assert masks.shape == (K, 48, 64) and set(np.unique(masks)) <= {0, 1}
        predicted[row["id"]] = masks
        truth, ignore = _planes(root, row["mask"])
        pairs.append((masks, truth, ignore))
    assert sum(ignore.sum() for _, _, ignore in pairs) == 20 * 24
    expected = _hand_scores(pairs)
    for name in ("iou", "dice", "precision", "recall"):
        got = np.array([np.nan if v is None else v for v in perf.per_class[name]], float)
        np.testing.assert_allclose(got, expected[name], rtol=1e-9, equal_nan=True, err_msg=name)
    assert perf.mean_iou() == pytest.approx(np.nanmean(expected["iou"]))

    url = start_endpoint(model.artifact_uri, f"{s3_prefix}/serve", config=endpoint_config())
    try:
        ident = next(iter(predicted))
        image = valid.as_data_frame().set_index("id").loc[ident, "image"]
        request = urllib.request.Request(f"{url}/v1/segment", method="POST",
                                         data=(root / image).read_bytes())
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        stop_endpoint()
    assert answer["multilabel"] is True and answer["class_names"] == list(perf.class_names)
    planes = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) > 0
                       for png in answer["class_mask_pngs"]])
    np.testing.assert_array_equal(planes, predicted[ident])
    areas = [answer["class_areas"][name]["pixels"] for name in answer["class_names"]]
    assert areas == predicted[ident].reshape(K, -1).sum(axis=1).tolist()
