"""Issue 20: the README's multi-label flow, run as written, then its model on moto S3: predict ->
model_performance -> serve, with the per-class metrics checked against counts computed here for
two validation images (one of which carries an ``ignore=`` mask), and ``pathlib.Path`` accepted
as a URI.  (The README example trains the suite's one multi-label model.)
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


def _with_ignore(manifest: Path, ids: list[str], out: Path) -> Path:
    """A manifest of the rows ``ids`` of ``manifest`` (images and masks copied beside it), the
    first of them with an ``ignore=`` mask over :data:`VOID`."""
    import shutil

    with open(manifest, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["image"] in ids]
    for row in rows:
        for name in [row["image"], *row["mask"].split(";")]:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(manifest.parent / name, out / name)
    height, width = np.asarray(Image.open(out / rows[0]["image"])).shape[:2]
    void = np.zeros((height, width), np.uint8)
    void[VOID] = 255
    (out / "masks" / "void.png").write_bytes(encode_png(void))
    rows[0]["mask"] += ";ignore=masks/void.png"
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out / "manifest.csv"


@pytest.mark.slow
def test_the_readme_multilabel_flow_runs_as_written_and_matches_hand_counts_on_s3(
        ray_session, s3_prefix, tmp_path, one_torch_thread, monkeypatch, capsys):
    """The README's multi-label example, executed as written (its one training), then its model
    on an S3 copy of the val rows with an ignore mask: predict, model_performance against the
    counts computed here, and the endpoint's planes against the bulk masks."""
    from pipelines.api import ModelPerformance, api, session
    from pipelines.serve.app import start_endpoint, stop_endpoint
    from tests.serve_util import endpoint_config
    from tests.test_readme_snippet import MULTILABEL_MARKER, README, readme_snippet

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(session._SESSION, "work_dir", None)
    namespace: dict = {"__name__": "readme_snippet_multilabel"}
    exec(compile(readme_snippet(MULTILABEL_MARKER), str(README), "exec"), namespace)
    model, masks, perf = namespace["model"], namespace["masks"], namespace["perf"]
    assert isinstance(namespace["manifest"], Path)   # a pathlib.Path is a URI too
    assert masks.shape == (K, 96, 96) and set(np.unique(masks)) <= {0, 1}
    assert isinstance(perf, ModelPerformance) and perf.images == 6
    assert len(perf.iou()) == K and perf.confusion is None     # no confusion matrix: overlaps
    assert "mIoU" in capsys.readouterr().out
    assert perf.mean_iou() > 0.5                                # it learned the three shapes

    ids = [str(i) for i in namespace["valid"].head(2)["image"]]
    local = _with_ignore(Path(namespace["manifest"]), ids, tmp_path / "val_ignore")
    root = local.parent
    data_uri = storage.copy_dir_from_local(root, f"{s3_prefix}/data")
    valid = api.import_file(f"{data_uri}/manifest.csv")
    assert valid.nrow == 2
    predictions = model.predict(valid)
    perf = model.model_performance(valid)
    assert perf.images == 2
    pairs, predicted = [], {}
    for row in valid.as_data_frame().to_dict("records"):
        masks = predictions.mask(row["id"])                # K x H x W {0, 1}
        assert masks.shape == (K, 96, 96) and set(np.unique(masks)) <= {0, 1}
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
