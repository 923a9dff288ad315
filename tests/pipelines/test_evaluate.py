"""``rayseg evaluate``: hand-computed metrics, empty-mask policy, bootstrap, reports and overlays."""
from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines.evaluate.evaluate import (
    EvaluateConfig,
    bootstrap_ci,
    run_evaluate,
    score_mask,
    summarize,
)
from pipelines.predict import store
from pipelines import predictions
from pipelines.records import PREDICTION_SCHEMA
from seg_core.codecs import decode_mask, encode_png
from seg_core.config import MaskSpec, to_dict
from tests.ray_util import every_cpu_held, wait_for_line

SPEC2 = MaskSpec(num_classes=2, class_names=("bg", "fg"))
# Two 2x2 images.  A: one fg pixel missed.  B: all bg, one pixel wrongly called fg.
TRUTH_A, PRED_A = np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 1]], np.uint8)
TRUTH_B, PRED_B = np.zeros((2, 2), np.int64), np.array([[0, 0], [0, 1]], np.uint8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_artifact(path: Path, *, seed: int) -> Path:
    """A tiny untrained 3-class U-Net artifact (as in test_predict)."""
    import torch

    from seg_core.artifact import save_artifact
    from seg_core.config import ModelConfig, Preprocessing
    from seg_core.model import UNet

    torch.manual_seed(seed)
    model = UNet(ModelConfig(in_channels=3, num_classes=3, depth=2, base_width=4))
    return save_artifact(path, model, name="tiny", version="t1", mask_spec=MaskSpec(num_classes=3),
                         preprocessing=Preprocessing(tile_size=64, tile_overlap=0.25),
                         metrics={"miou": 0.25, "mdice": 0.5})  # as if training reported them


def stacked(pairs: list[tuple[np.ndarray, np.ndarray]], spec: MaskSpec) -> dict[str, np.ndarray]:
    counts = [score_mask(pred, truth, spec) for pred, truth in pairs]
    return {k: np.stack([c[k] for c in counts]) for k in ("tp", "fp", "fn", "tn")}


def test_hand_computed_counts_and_reductions():
    counts = stacked([(PRED_A, TRUTH_A), (PRED_B, TRUTH_B)], SPEC2)
    # per image, per class (bg, fg):  A: tp (1, 2) fp (1, 0) fn (0, 1);  B: tp (3, 0) fp (0, 1) fn (1, 0)
    np.testing.assert_array_equal(counts["tp"], [[1, 2], [3, 0]])
    np.testing.assert_array_equal(counts["fp"], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(counts["fn"], [[0, 1], [1, 0]])
    metrics = summarize(counts, SPEC2, "nan")
    # micro: tp 6, fp 2, fn 2 -> IoU 6/10, Dice 12/16, precision = recall = 6/8
    assert metrics["micro"]["iou"] == pytest.approx(0.6)
    assert metrics["micro"]["dice"] == pytest.approx(0.75)
    assert metrics["micro"]["precision"] == metrics["micro"]["recall"] == pytest.approx(0.75)
    # macro: bg (tp 4, fp 1, fn 1) IoU 4/6 Dice 8/10; fg (2, 1, 1) IoU 2/4 Dice 4/6
    assert metrics["macro"]["iou"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert metrics["macro"]["dice"] == pytest.approx((8 / 10 + 4 / 6) / 2)
    assert metrics["macro"]["per_class"]["iou"] == pytest.approx([4 / 6, 2 / 4])
    # per image: A (1/2 + 2/3) / 2, B (3/4 + 0) / 2, then the mean of the two
    assert metrics["per_image"]["iou"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 3 / 8) / 2)
    assert metrics["per_image"]["empty_policy"] == "nan"


@pytest.mark.parametrize("policy, expected", [("nan", 1.0), ("one", 1.0), ("zero", 0.5)])
def test_empty_mask_policy(policy, expected):
    """An all-background image predicted perfectly: fg is absent from truth and prediction."""
    blank = np.zeros((3, 3), np.int64)
    counts = stacked([(blank.astype(np.uint8), blank)], SPEC2)
    metrics = summarize(counts, SPEC2, policy)
    assert metrics["per_image"]["iou"] == pytest.approx(expected)
    assert metrics["macro"]["iou"] == pytest.approx(expected)


def test_multilabel_counts_per_class():
    spec = MaskSpec(num_classes=2, multilabel=True, ignore_index=255)
    truth = np.array([[[1, 1], [0, 0]], [[0, 1], [255, 0]]], np.uint8)  # K x H x W
    pred = np.array([[[1, 0], [0, 0]], [[1, 1], [1, 0]]], np.uint8)
    counts = score_mask(pred, truth, spec)
    np.testing.assert_array_equal(counts["tp"], [1, 1])
    np.testing.assert_array_equal(counts["fp"], [0, 1])  # class 1: the ignored pixel is not an fp
    np.testing.assert_array_equal(counts["fn"], [1, 0])
    np.testing.assert_array_equal(counts["tn"], [2, 1])


def test_size_mismatch_is_refused():
    from seg_core.errors import InputError

    with pytest.raises(InputError, match="size_mismatch"):
        score_mask(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.int64), SPEC2)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    pairs = []
    for _ in range(12):
        truth = rng.integers(0, 2, (8, 8))
        pred = np.where(rng.random((8, 8)) < 0.8, truth, 1 - truth).astype(np.uint8)
        pairs.append((pred, truth))
    counts = stacked(pairs, SPEC2)
    first = bootstrap_ci(counts, SPEC2, "nan", resamples=200, seed=3)
    assert first == bootstrap_ci(counts, SPEC2, "nan", resamples=200, seed=3)
    assert first != bootstrap_ci(counts, SPEC2, "nan", resamples=200, seed=4)
    point = summarize(counts, SPEC2, "nan")
    for reduction in ("micro", "macro", "per_image"):
        low, high = first[reduction]["iou"]
        assert low < point[reduction]["iou"] < high
    perfect = stacked([(t.astype(np.uint8), t) for _, t in pairs], SPEC2)
    assert bootstrap_ci(perfect, SPEC2, "nan", resamples=50, seed=0)["macro"]["dice"] == [1.0, 1.0]


# ---------------------------------------------------------------------------- end to end (Ray)


def write_predictions(out: Path, rows: list[tuple[str, np.ndarray]], spec: MaskSpec,
                      sources: dict[str, tuple[str, str]] | None = None,
                      objects: dict[str, np.ndarray] | None = None) -> str:
    """A hand-made prediction output: one committed file plus the model record.  ``sources``:
    id -> (source URI, SHA-256) recorded in the rows (default: none recorded); ``objects``:
    id -> predicted instance labels (``instance_png``)."""
    objects = objects or {}
    now = dt.datetime.now(dt.timezone.utc)
    sources = sources or {}
    table = pa.Table.from_pylist([{
        "id": image_id, "source_uri": sources.get(image_id, (None, ""))[0],
        "source_sha256": sources.get(image_id, (None, ""))[1], "model_name": "hand",
        "model_version": "0", "height": mask.shape[0], "width": mask.shape[1],
        "mask_png": encode_png(mask.astype(np.uint8)),
        "class_mask_pngs": [encode_png((mask == k).astype(np.uint8) * 255)
                            for k in range(spec.num_classes)],
        "class_pixel_counts": [int((mask == k).sum()) for k in range(spec.num_classes)],
        "mean_confidence": 1.0, "confidence_png": None, "request_id": None, "latency_ms": None,
        "instance_png": (encode_png(objects[image_id].astype(np.uint16))
                         if image_id in objects else None),
        "created_at": now} for image_id, mask in rows], schema=PREDICTION_SCHEMA)
    predictions.write_table(table, str(out / "part-hand.parquet"))
    store.claim_output(str(out), {"name": "hand", "version": "0", "mask_spec": to_dict(spec),
                                  "tta": False, "confidence_maps": False})
    return str(out)


def write_case(root: Path, cases: dict[str, np.ndarray]) -> Path:
    """Images (grey noise) and 2-class truth masks behind a manifest; every row is val."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "mask", "split"])
        for index, (image_id, truth) in enumerate(cases.items()):
            # a different image per row: a serve log is matched to its truth by the bytes
            image = ((np.arange(truth.size).reshape(truth.shape) * 40 + 7 * index) % 256
                     ).astype(np.uint8)
            (root / "images" / f"{image_id}.png").write_bytes(encode_png(image))
            (root / "masks" / f"{image_id}.png").write_bytes(encode_png(truth.astype(np.uint8)))
            writer.writerow([image_id, f"images/{image_id}.png", f"masks/{image_id}.png", "val"])
    return root / "manifest.csv"


def test_evaluate_hand_built_end_to_end(ray_session, tmp_path):
    manifest = write_case(tmp_path / "data", {"a": TRUTH_A, "b": TRUTH_B, "c": TRUTH_A,
                                              "d": TRUTH_B})
    # c's prediction has the wrong size; d has no prediction at all.
    preds = write_predictions(tmp_path / "preds", [("a", PRED_A), ("b", PRED_B),
                                                   ("c", np.zeros((3, 3)))], SPEC2)
    cfg = EvaluateConfig(manifest=str(manifest), predictions=preds, out=str(tmp_path / "eval"),
                         bootstrap=100, overlays=1, progress=False)
    report = run_evaluate(cfg, log=lambda _: None)
    assert report["images_scored"] == 2 and report["images_in_split"] == 4
    assert report["missing_predictions"] == ["d"]
    assert [(u["id"], u["reason"]) for u in report["unscored"]] == [("c", "size_mismatch")]
    assert report["metrics"]["micro"]["iou"] == pytest.approx(0.6)
    assert report["metrics"]["macro"]["iou"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert report["confusion_matrix"] == [[4, 1], [1, 2]]  # rows truth, columns prediction
    assert (report["best"], report["worst"]) == (["a"], ["b"])
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["metrics"]["micro"]["dice"] == pytest.approx(0.75)
    assert saved["empty_policy"] == "nan" and "left out" in saved["empty_policy_meaning"]
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "| micro | 0.6000 [" in markdown and "| fg | 1 | 2 |" in markdown
    from PIL import Image

    overlay = Image.open(tmp_path / "eval" / saved["overlays"]["best"][0])
    assert overlay.width == 4 * 2 and overlay.height == 2 + 16  # 4 panels of 2 px + caption


def test_scoring_whose_cpus_are_held_says_what_it_waits_for_then_runs(ray_session, tmp_path):
    import threading

    manifest = write_case(tmp_path / "data", {"a": TRUTH_A, "b": TRUTH_B})
    preds = write_predictions(tmp_path / "preds", [("a", PRED_A), ("b", PRED_B)], SPEC2)
    cfg = EvaluateConfig(manifest=str(manifest), predictions=preds, out=str(tmp_path / "eval"),
                         bootstrap=10, overlays=0, progress=False)
    lines: list[str] = []
    done: dict = {}
    run = threading.Thread(target=lambda: done.update(report=run_evaluate(cfg, log=lines.append)))
    try:
        with every_cpu_held():
            run.start()
            waiting = wait_for_line(lines, "waiting for")
            assert len(waiting) == 1 and waiting[0].startswith("evaluate: waiting for 1 CPU (0 of ")
            assert "report" not in done
    finally:   # it goes on once the CPUs are back
        run.join(timeout=300)
    assert done["report"]["images_scored"] == 2


def test_instance_labelled_truth_scores_the_objects(ray_session, tmp_path):
    """Truth masks are 16-bit instance label images (ids past 255); the classes come from them
    (background, object) and the predicted objects are scored against the true ones."""
    from seg_core.instances import aggregate_instance_metrics, instance_metrics

    truth_a = np.zeros((12, 16), np.uint16)
    truth_a[1:6, 1:6], truth_a[1:6, 6:11], truth_a[8:11, 12:15] = 300, 301, 7   # two touch
    truth_b = np.zeros((12, 16), np.uint16)
    truth_b[2:10, 2:10] = 1000
    merged = (truth_a > 0).astype(np.int32)
    merged[8:11, 12:15] = 2                      # the touching pair predicted as one object
    exact = (truth_b > 0).astype(np.int32)
    spec = MaskSpec(num_classes=2, class_names=("bg", "obj"), instance_labels=True)
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    lines = ["id,image,mask,split"]
    for image_id, labels in (("a", truth_a), ("b", truth_b)):
        image = np.full(labels.shape, 9 if image_id == "a" else 99, np.uint8)
        (tmp_path / "data" / "images" / f"{image_id}.png").write_bytes(encode_png(image))
        (tmp_path / "data" / "masks" / f"{image_id}.png").write_bytes(encode_png(labels))
        lines.append(f"{image_id},images/{image_id}.png,masks/{image_id}.png,val")
    (tmp_path / "data" / "manifest.csv").write_text("\n".join(lines) + "\n")
    preds = write_predictions(tmp_path / "preds", [("a", merged > 0), ("b", exact > 0)], spec,
                              objects={"a": merged, "b": exact})
    report = run_evaluate(EvaluateConfig(manifest=str(tmp_path / "data" / "manifest.csv"),
                                         predictions=preds, out=str(tmp_path / "eval"),
                                         bootstrap=10, overlays=1, progress=False),
                          log=lambda _: None)
    assert report["metrics"]["micro"]["iou"] == pytest.approx(1.0)   # the pixels are right
    expected = aggregate_instance_metrics([instance_metrics(truth_a.astype(np.int32), merged),
                                           instance_metrics(truth_b.astype(np.int32), exact)])
    found = report["instances"]
    assert found["images"] == 2 and found["truth_objects"] == 4 and found["pred_objects"] == 3
    assert found["merges"] == 1 and found["tp"] == 2
    for key in ("map", "pq", "sq", "rq", "precision", "recall"):
        assert found[key] == pytest.approx(expected[key]), key
    assert found["map"] < 1.0
    assert "## Objects (instance-labelled truth)" in (tmp_path / "eval" / "report.md").read_text()


def test_predictions_of_another_image_are_reported_not_scored(ray_session, tmp_path):
    import hashlib

    data = tmp_path / "data"
    manifest = write_case(data, {"a": TRUTH_A, "b": TRUTH_B, "c": TRUTH_A})
    digest = {k: hashlib.sha256((data / "images" / f"{k}.png").read_bytes()).hexdigest()
              for k in "abc"}
    sources = {"a": (str(data / "images/a.png"), digest["a"]),          # the very image
               "b": ("s3://elsewhere/images/b.png", digest["b"]),     # same id, other source
               "c": (str(data / "images/c.png"), "0" * 64)}           # the file changed since
    preds = write_predictions(tmp_path / "preds", [("a", PRED_A), ("b", PRED_B), ("c", PRED_A)],
                              SPEC2, sources)
    report = run_evaluate(EvaluateConfig(manifest=str(manifest), predictions=preds,
                                         out=str(tmp_path / "eval"), bootstrap=10, overlays=0,
                                         progress=False), log=lambda _: None)
    assert report["images_scored"] == 1
    unscored = {u["id"]: u for u in report["unscored"]}
    assert {k: u["reason"] for k, u in unscored.items()} == {"b": "source_mismatch",
                                                            "c": "source_mismatch"}
    assert "s3://elsewhere/images/b.png" in unscored["b"]["message"]
    assert "SHA-256" in unscored["c"]["message"]


def test_evaluate_prediction_equal_to_truth_scores_one(ray_session, sample_dataset, tmp_path):
    spec = MaskSpec(num_classes=3)
    rows = []
    with open(sample_dataset, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "val":
                mask = decode_mask((sample_dataset.parent / row["mask"]).read_bytes(), spec)
                rows.append((row["image"], mask))   # the default id: the path in the manifest
    preds = write_predictions(tmp_path / "preds", rows, spec)
    report = run_evaluate(EvaluateConfig(manifest=str(sample_dataset), predictions=preds,
                                         out=str(tmp_path / "eval"), bootstrap=50,
                                         progress=False), log=lambda _: None)
    assert report["images_scored"] == len(rows) == 6
    for reduction in ("micro", "macro", "per_image"):
        for score in ("iou", "dice", "precision", "recall", "pixel_accuracy"):
            assert report["metrics"][reduction][score] == 1.0, (reduction, score)
        assert report["bootstrap_ci95"][reduction]["iou"] == [1.0, 1.0]
    confusion = np.asarray(report["confusion_matrix"])
    assert (confusion == np.diag(np.diag(confusion))).all() and confusion.trace() > 0
    assert len(list((tmp_path / "eval" / "overlays").glob("*.png"))) == 6  # 3 best + 3 worst


def test_evaluate_with_model_matches_direct_segmenter_scores(ray_session, sample_dataset,
                                                             tmp_path):
    """--model predicts then scores; the result equals scoring Segmenter masks directly."""
    from seg_core.artifact import load_artifact
    from seg_core.codecs import decode_image
    from seg_core.inference import Segmenter
    from seg_core.metrics import compute_metrics, confusion_counts
    artifact = make_artifact(tmp_path / "model", seed=1)
    report = run_evaluate(EvaluateConfig(manifest=str(sample_dataset), model=str(artifact),
                                         out=str(tmp_path / "eval"), bootstrap=20, overlays=1,
                                         progress=False), log=lambda _: None)
    segmenter = Segmenter(load_artifact(artifact), engine="auto")   # predict's default engine
    spec = segmenter.mask_spec
    total = {k: np.zeros(3, np.int64) for k in ("tp", "fp", "fn")}
    confidence, right = [], []
    with open(sample_dataset, newline="") as handle:
        for row in (r for r in csv.DictReader(handle) if r["split"] == "val"):
            image = decode_image((sample_dataset.parent / row["image"]).read_bytes())
            truth = decode_mask((sample_dataset.parent / row["mask"]).read_bytes(), spec)
            prediction = segmenter.predict(image)
            counts = confusion_counts(prediction.mask, truth, 3)
            for k in total:
                total[k] += counts[k]
            confidence.append(np.rint(prediction.confidence * 255).ravel() / 255)  # 8-bit map
            right.append((prediction.mask == truth).ravel())
    # pixel ECE over 15 equal bins, computed here with plain NumPy
    confidence, right = np.concatenate(confidence), np.concatenate(right)
    bins = np.minimum((confidence * 15).astype(int), 14)
    ece = sum((bins == b).mean() * abs(right[bins == b].mean() - confidence[bins == b].mean())
              for b in range(15) if (bins == b).any())
    calibration = report["calibration"]
    assert calibration["ece"] == pytest.approx(ece, abs=1e-3) and calibration["images"] == 6
    assert calibration["temperature"] == 1.0    # this artifact was never calibrated
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 1000
    assert f"**{calibration['ece']:.4f}**" in (tmp_path / "eval" / "report.md").read_text()
    # the worst image's "why" panel: Grad-CAM of the class it got most wrong, in report.html
    [worst] = report["worst"]
    assert report["worst_classes"][worst] in (1, 2)
    [panel] = report["why"]
    assert panel and (tmp_path / "eval" / panel).stat().st_size > 1000
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count('<figure class="why">') == 1 and f"<code>{worst}</code>" in html
    assert f"<strong>{calibration['ece']:.4f}</strong>" in html and 'id="reliability"' in html
    expected = compute_metrics(total["tp"], total["fp"], total["fn"], reduction="macro")
    assert report["images_scored"] == 6
    assert report["metrics"]["macro"]["iou"] == pytest.approx(expected["iou"], abs=1e-12)
    assert report["metrics"]["macro"]["dice"] == pytest.approx(expected["dice"], abs=1e-12)
    assert (tmp_path / "eval" / "predictions" / store.SUCCESS_FILE).exists()
    compared = report["training_reported"]
    assert compared["reported"] == {"miou": 0.25, "mdice": 0.5}
    assert compared["difference"]["miou"] == pytest.approx(expected["iou"] - 0.25)
    assert "Training reported" in (tmp_path / "eval" / "report.md").read_text()


def write_serve_log(out: Path, wal: Path, requests: list[tuple[str, np.ndarray, str]],
                    spec: MaskSpec, *, max_pixels: int) -> str:
    """An endpoint's log written as a replica writes it: rows through the write-ahead-log sink
    (``date=*/serve-*.parquet``) and the served model's record.  ``requests``: (request id, mask,
    SHA-256 of the uploaded bytes)."""
    from pipelines.serve.sink import PredictionSink

    now = dt.datetime.now(dt.timezone.utc)
    sink = PredictionSink(str(out), flush_rows=2, writer_id="replica1", wal_dir=str(wal))
    for request_id, mask, digest in requests:
        sink.add({"id": request_id, "source_uri": "upload:image.png", "source_sha256": digest,
                  "model_name": "hand", "model_version": "0", "weights_sha256": "f" * 64,
                  "height": mask.shape[0], "width": mask.shape[1],
                  "mask_png": encode_png(mask.astype(np.uint8)),
                  "class_mask_pngs": [encode_png((mask == k).astype(np.uint8) * 255)
                                      for k in range(spec.num_classes)],
                  "class_pixel_counts": [int((mask == k).sum()) for k in range(spec.num_classes)],
                  "mean_confidence": 1.0, "confidence_png": None, "request_id": request_id,
                  "latency_ms": 5.0, "created_at": now})
    sink.close()
    predictions.record_served_model(str(out), {
        "name": "hand", "version": "0", "weights_sha256": "f" * 64, "engine": "torch",
        "mask_spec": to_dict(spec), "max_pixels": max_pixels, "tiff_page": None})
    return str(out)


def test_evaluate_scores_a_serve_log_matched_by_content(ray_session, tmp_path):
    """The endpoint's log scores as a batch output of the same masks does (the hand-computed
    figures of the test above): requests are matched to truth rows by the bytes they carried,
    a retried request counts once, and a request for an image outside the truth is left out.
    Overlays follow the served model's limits: over its max_pixels, an image gets no overlay
    and the report says why."""
    import hashlib

    data = tmp_path / "data"
    manifest = write_case(data, {"a": TRUTH_A, "b": TRUTH_B})
    digest = {k: hashlib.sha256((data / "images" / f"{k}.png").read_bytes()).hexdigest()
              for k in "ab"}
    log = write_serve_log(tmp_path / "log", tmp_path / "wal", [
        ("req-1", PRED_A, digest["a"]), ("req-2", PRED_B, digest["b"]),
        ("req-2", PRED_B, digest["b"]),                   # a retry with the same request id
        ("req-3", TRUTH_A, "0" * 64)], SPEC2, max_pixels=3)   # an image the truth does not have
    assert {p.split("/")[-2][:5] for p in predictions.prediction_files(log)} == {"date="}
    assert predictions.scan(log, ["id"]).num_rows == 3         # one row per request id
    report = run_evaluate(EvaluateConfig(manifest=str(manifest), predictions=log,
                                         out=str(tmp_path / "eval"), bootstrap=20, overlays=1,
                                         progress=False), log=lambda _: None)
    assert report["images_scored"] == 2 and not report["missing_predictions"]
    assert report["metrics"]["micro"]["iou"] == pytest.approx(0.6)
    assert report["metrics"]["macro"]["iou"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert report["confusion_matrix"] == [[4, 1], [1, 2]]
    # the 2x2 images are over the served model's max_pixels of 3: refused, with the reason
    assert report["overlays"] == {"best": [None], "worst": [None]}
    assert {(r["id"], r["reason"]) for r in report["overlays_refused"]} == \
        {("a", "too_many_pixels"), ("b", "too_many_pixels")}
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "no overlay: too_many_pixels" in markdown
    assert "too_many_pixels" in (tmp_path / "eval" / "report.html").read_text()
