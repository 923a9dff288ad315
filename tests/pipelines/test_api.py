"""The H2O-style API: Frame basics without Ray, then one cross-validated estimator on real local
Ray that every estimator test shares (train, predict, model_performance, CV summary, save/load,
TorchScript export).

The data is tiny (16 pairs of 48x48, 3 classes) and the U-Net is depth 2, width 4: the cost is
Ray Train's start-up, so the module trains exactly once (2 CV folds + the main model).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.api import (
    Frame,
    ModelPerformance,
    UNetSegmentationEstimator,
    hyperparameter_names,
    import_file,
    load_model,
)
from pipelines.api.frame import write_manifest

TINY = {"base_width": 4, "depth": 2, "batch_size": 4, "epochs": 2, "tile_size": 48,
        "log_every_steps": 0}


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory) -> Path:
    """16 pairs of 48x48, 3 classes, all five image formats (12 train / 4 val)."""
    from seg_core.sample_data import generate_sample_dataset

    root = tmp_path_factory.mktemp("api_data")
    return Path(generate_sample_dataset(root, n=16, size=(48, 48), num_classes=3, seed=3))


# ------------------------------------------------------------------------------ Frame, no Ray


def test_frame_metadata_without_pixels(tiny_manifest):
    frame = import_file(str(tiny_manifest))
    assert frame.nrow == 16 and frame.shape == (16, 4) and len(frame) == 16
    assert frame.columns == ["id", "image", "mask", "split"]      # id added as ingest derives it
    head = frame.head(3)
    assert list(head["id"]) == ["images/sample_0000.png", "images/sample_0001.jpg",
                                "images/sample_0002.bmp"]
    assert head["image"][1] == "images/sample_0001.jpg"           # as written in the manifest
    assert frame.resolved("image")[1] == str(tiny_manifest.parent / "images/sample_0001.jpg")
    assert frame.levels("split") == ["train", "val"]
    assert frame.filter(split="val").nrow == 4
    # a dataset directory resolves to its manifest.csv
    assert import_file(str(tiny_manifest.parent)).nrow == 16


def test_split_frame_is_disjoint_exact_and_seeded(tiny_manifest):
    frame = import_file(str(tiny_manifest))
    a, b = frame.split_frame(ratios=[0.75], seed=7)
    assert (a.nrow, b.nrow) == (12, 4)
    ids_a, ids_b = set(a.head(99)["id"]), set(b.head(99)["id"])
    assert not ids_a & ids_b and len(ids_a | ids_b) == 16
    again = frame.split_frame(ratios=[0.75], seed=7)[1]
    assert list(again.head(99)["id"]) == list(b.head(99)["id"])
    other = frame.split_frame(ratios=[0.75], seed=8)[1]
    assert list(other.head(99)["id"]) != list(b.head(99)["id"])
    parts = frame.split_frame(ratios=[0.5, 0.25], seed=1)
    assert [p.nrow for p in parts] == [8, 4, 4]
    with pytest.raises(ValueError, match="sum to < 1"):
        frame.split_frame(ratios=[0.6, 0.5])


def test_kfold_column_is_balanced_and_seeded(tiny_manifest):
    frame = import_file(str(tiny_manifest))
    frame["fold"] = frame.kfold_column(n_folds=3, seed=5)
    folds = frame.head(99)["fold"].tolist()
    assert sorted(np.bincount(folds).tolist()) == [5, 5, 6]
    assert frame.kfold_column(n_folds=3, seed=5).head(99)["fold"].tolist() == folds
    assert frame.columns[-1] == "fold" and frame.levels("fold") == [0, 1, 2]
    with pytest.raises(ValueError, match="has 3 values, the frame 16 rows"):
        frame["bad"] = [1, 2, 3]


def test_wrong_column_lists_the_columns(tiny_manifest):
    frame = import_file(str(tiny_manifest))
    with pytest.raises(ValueError, match=r"'imgae' is not a column.*\['id', 'image', 'mask', "
                                         r"'split'\]"):
        frame["imgae"]
    model = UNetSegmentationEstimator(x="img", y="mask", training_frame=frame, num_classes=3)
    with pytest.raises(ValueError, match=r"x \(image column\) 'img' is not a column.*'image'"):
        model.train(max_iterations=1)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['learning_rate'\].*'lr'"):
        UNetSegmentationEstimator(training_frame=frame, learning_rate=0.1)


def test_hyperparameters_mirror_train_config(tiny_manifest, tmp_path):
    names = hyperparameter_names()
    assert names["num_classes"] == ("model.num_classes", "mask.num_classes")
    assert names["lr"] == ("optim.lr",) and names["base_width"] == ("model.base_width",)
    assert "data" not in names and "manifest" not in names
    model = UNetSegmentationEstimator(num_classes=2, mask_values=[0, 255], channels=1, lr=3e-3,
                                      seed=9, multilabel=False, **{"optim.weight_decay": 0.0})
    cfg = model.build_config(str(tiny_manifest), max_iterations=7)
    assert (cfg.model.in_channels, cfg.preprocessing.channels, cfg.preprocessing.mean) == \
        (1, 1, (0.5,))
    assert cfg.mask.mask_values == (0, 255) and cfg.model.num_classes == 2
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.max_iterations, cfg.seed) == \
        (3e-3, 0.0, 7, 9)
    multilabel = UNetSegmentationEstimator(num_classes=3, multilabel=True)
    assert multilabel.build_config("m.csv").loss == "bce_dice"


def test_write_manifest_resolves_uris_and_refuses_overlap(tiny_manifest, tmp_path):
    frame = import_file(str(tiny_manifest))
    train, valid = frame.split_frame([0.75], seed=1)
    uri = write_manifest([(train, "train"), (valid, "val")], str(tmp_path / "m.csv"), x="image",
                         y="mask")
    written = import_file(uri)
    assert written.nrow == 16 and written.filter(split="val").nrow == 4
    assert written.head(1)["image"][0].startswith(str(tiny_manifest.parent))
    with pytest.raises(ValueError, match="repeated ids"):
        write_manifest([(train, "train"), (train, "val")], str(tmp_path / "x.csv"), x="image",
                       y="mask")


def test_import_prefix_and_s3(tiny_manifest, s3_bucket):
    from pipelines.storage import copy_dir_from_local

    prefix = import_file(str(tiny_manifest.parent))          # has manifest.csv: the manifest
    assert prefix.kind == "files"
    uri = copy_dir_from_local(tiny_manifest.parent, f"s3://{s3_bucket}/api_frame")
    remote = import_file(f"{uri}/manifest.csv")
    assert remote.nrow == 16
    assert remote.resolved("mask")[0] == f"{uri}/masks/sample_0000.png"
    (tiny_manifest.parent / "manifest.csv").rename(tiny_manifest.parent / "m.csv")
    try:                                                     # now a bare images/ + masks/ prefix
        listed = import_file(str(tiny_manifest.parent))
    finally:
        (tiny_manifest.parent / "m.csv").rename(tiny_manifest.parent / "manifest.csv")
    assert listed.nrow == 16 and listed.columns == ["id", "image", "mask", "split", "fold"]


@pytest.mark.slow
def test_import_shards_reads_metadata_only(ray_session, tiny_manifest, tmp_path):
    from pipelines.pack import pack

    pack(str(tiny_manifest), str(tmp_path / "shards"), partition_by_split=True)
    shards = import_file(str(tmp_path / "shards"))
    assert shards.kind == "shards" and shards.nrow == 16
    assert {"id", "image", "mask", "split", "height", "width"} <= set(shards.columns)
    assert not {"image_bytes", "mask_bytes"} & set(shards.columns)       # bytes stay in Parquet
    assert shards.filter(split="val").nrow == 4 and set(shards.head(99)["height"]) == {48}
    with pytest.raises(ValueError, match="data.shards="):
        write_manifest([(shards, "train")], str(tmp_path / "m.csv"), x="image", y="mask")


# ----------------------------------------------------------------- estimator on real local Ray


@pytest.fixture(scope="module")
def trained(ray_session, tiny_manifest, tmp_path_factory):
    """One estimator: 2-fold CV on a fold column, both folds at once, then the main model (3
    short fits).  The suite's only cross-validation run."""
    from pipelines.api import session

    work = tmp_path_factory.mktemp("api_work")
    session._SESSION["work_dir"] = str(work)
    data = import_file(str(tiny_manifest))
    train, valid = data.split_frame(ratios=[0.75], seed=2)
    train["fold"] = train.kfold_column(n_folds=2, seed=2)
    model = UNetSegmentationEstimator(x="image", y="mask", training_frame=train,
                                      validation_frame=valid, nfolds=2, fold_column="fold",
                                      cv_parallelism=2, num_classes=3, seed=11,
                                      model_id="api_test", **TINY)
    model.train(max_iterations=4)
    yield model, train, valid, work
    session._SESSION["work_dir"] = None


@pytest.mark.slow
def test_train_writes_an_artifact_and_records_validation(trained):
    model, _, valid, _ = trained
    assert model.artifact_uri.endswith("models/api_test/v1")
    assert (Path(model.artifact_uri) / "artifact.json").exists()
    perf = model.model_performance()
    assert perf.source == "training" and perf.class_names == ("class_0", "class_1", "class_2")
    assert 0.0 <= perf.mean_iou() <= 1.0
    assert len(model.scoring_history()) >= 1


@pytest.fixture(scope="module")
def predictions(trained) -> Frame:
    model, _, valid, _ = trained
    return model.predict(valid)


@pytest.mark.slow
def test_predict_returns_a_frame_of_mask_rows(trained, predictions):
    _, _, valid, _ = trained
    assert isinstance(predictions, Frame) and predictions.kind == "predictions"
    assert predictions.nrow == valid.nrow
    assert sorted(predictions.head(99)["id"]) == sorted(valid.head(99)["id"])
    assert "mask_png" not in predictions.columns                       # bytes stay in Parquet
    assert {"class_pixel_counts", "mean_confidence", "model_version"} <= set(predictions.columns)
    mask = predictions.mask(0)
    assert mask.shape == (48, 48) and mask.max() < 3
    counts = predictions.head(1)["class_pixel_counts"][0]
    assert list(counts) == np.bincount(mask.ravel(), minlength=3).tolist()


@pytest.mark.slow
def test_suggest_labels_and_explain(trained):
    """suggest_labels: rayseg rank's picks as a frame of the input's rows, most uncertain
    (balanced_entropy over the frame) first; explain: seg_core's map for one row and class."""
    from pipelines.model import open_model
    from seg_core.active import balanced_scores, class_entropy, embedding, rank
    from seg_core.codecs import decode_image
    from seg_core.explain import explain

    model, train, _, _ = trained
    picks = model.suggest_labels(train, 3)
    assert isinstance(picks, Frame) and 1 <= picks.nrow <= 3 and picks.kind == train.kind
    loaded = open_model(model.artifact_uri, engine="torch")
    uris = dict(zip(train.to_arrow()["id"].to_pylist(), train.resolved("image")))
    images = [decode_image(Path(u).read_bytes()) for u in uris.values()]
    parts = [class_entropy(loaded.segmenter.predict(image, fields=frozenset({"mask", "probs"})))
             for image in images]
    scores = dict(zip(uris, balanced_scores(parts)))   # the default, balanced_entropy
    chosen = picks.to_arrow()["id"].to_pylist()
    assert [scores[i] for i in chosen] == sorted([scores[i] for i in chosen], reverse=True)
    assert chosen[0] == max(scores, key=scores.get)     # the first pick is never skipped
    # fewer than 3 only where the rest are near-duplicates of a pick (a briefly trained model's
    # bottleneck can map different scenes close together): the same greedy walk over the same
    # scores and embeddings, computed here image by image, picks the same rows
    vectors = np.stack([embedding(loaded.segmenter, image) for image in images])
    ids = list(uris)
    assert chosen == [ids[i] for i in rank([scores[i] for i in ids], vectors, 3)]
    image = decode_image(Path(train.resolved("image")[0]).read_bytes())
    names = loaded.mask_spec.names
    present = int(np.bincount(loaded.segmenter.predict(image).mask.ravel(),
                              minlength=3)[1:].argmax()) + 1   # a class the model predicts
    found = model.explain(train, names[present], row=0)
    assert found.shape == image.shape[:2] and found.max() == pytest.approx(1.0)
    np.testing.assert_allclose(found, explain(loaded.segmenter, image, present), atol=1e-5)
    with pytest.raises(ValueError, match="not one of"):
        model.explain(train, "zebra")


@pytest.mark.slow
def test_model_performance_matches_training_record(trained):
    model, _, valid, _ = trained
    perf = model.model_performance(valid)
    assert isinstance(perf, ModelPerformance) and perf.images == valid.nrow
    matrix = perf.confusion_matrix()
    assert list(matrix.index) == ["class_0", "class_1", "class_2"]
    # per-class IoU from the confusion matrix by hand: tp / (tp + fp + fn)
    m = matrix.to_numpy()
    tp = np.diag(m)
    by_hand = tp / (m.sum(0) + m.sum(1) - tp)
    got = np.array([np.nan if v is None else v for v in perf.iou().values()])
    np.testing.assert_allclose(got, by_hand, equal_nan=True)
    assert perf.f1() == perf.dice() and set(perf.precision()) == set(perf.recall())
    # the bulk path scores what training's validation scored: same images, same weights
    recorded = model.model_performance()
    assert perf.mean_iou() == pytest.approx(recorded.mean_iou(), abs=1e-6)
    assert perf.pixel_accuracy() == pytest.approx(recorded.pixel_accuracy(), abs=1e-6)
    for kind in ("per_class", "confusion_matrix", "learning_curve"):
        png = Path(perf.plot(kind))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (Path(perf.report_dir) / "report.md").exists()


@pytest.mark.slow
def test_cross_validation_metrics_summary(trained):
    model, *_ = trained
    summary = model.cross_validation_metrics_summary()
    assert list(summary.columns) == ["mean", "sd", "cv_1_valid", "cv_2_valid"]
    row = summary.loc["miou"]
    assert row["mean"] == pytest.approx((row["cv_1_valid"] + row["cv_2_valid"]) / 2)
    assert row["sd"] == pytest.approx(abs(row["cv_1_valid"] - row["cv_2_valid"]) / np.sqrt(2))
    result = model.cv_result
    assert result.assignment == "column" and len(result.folds) == 2
    # the estimator trains its folds as version "<version>-cv" beside the final model
    assert [r.artifact_uri.rsplit("/", 1)[1] for r in result.folds] == ["v1-cv-fold0", "v1-cv-fold1"]
    mious = [r.metrics["miou"] for r in result.folds]
    assert result.summary_metrics["miou"]["mean"] == pytest.approx(np.mean(mious))
    assert result.summary_metrics["miou"]["std"] == pytest.approx(np.std(mious, ddof=1))
    assert sorted(result.fold_sizes) == sorted(np.bincount(
        model.training_frame.head(99)["fold"]).tolist())   # every training row validated once
    for fold, size in zip(result.folds, result.fold_sizes):   # each on its own 48x48 images
        assert sum(np.add(fold.metrics["counts"]["tp"], fold.metrics["counts"]["fn"])) == \
            size * 48 * 48
    assert "mean" in result.summary() and Path(result.summary_uri).is_file()


@pytest.mark.slow
def test_save_load_round_trip_and_torchscript_export(trained, predictions, tmp_path):
    import torch

    from seg_core.artifact import load_artifact

    model, _, valid, _ = trained
    saved = model.save_model(str(tmp_path / "saved"))
    with pytest.raises(FileExistsError):
        model.save_model(str(tmp_path / "saved"))
    state = json.loads((Path(saved) / "estimator.json").read_text())
    assert state["params"]["num_classes"] == 3 and state["cv_summary"] is not None
    loaded = load_model(saved)
    assert (loaded.model_id, loaded.x, loaded.y) == ("api_test", "image", "mask")
    one = valid.take([0])
    again = loaded.predict(one)                      # the loaded model through the bulk path
    ident = one.head(1)["id"][0]
    np.testing.assert_array_equal(again.mask(ident), predictions.mask(ident))

    path = loaded.export("torchscript", path=str(tmp_path / "unet.pt"))
    scripted = torch.jit.load(path)
    net = load_artifact(saved).model.eval()
    for side in (48, 32):                       # the trace size, and another multiple of 2**depth
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), net(x))
    extra = {"artifact.json": ""}
    torch.jit.load(path, _extra_files=extra)
    assert json.loads(extra["artifact.json"])["name"] == "api_test"
    import onnxruntime

    graph = onnxruntime.InferenceSession(loaded.export("onnx", path=str(tmp_path / "unet.onnx")),
                                         providers=["CPUExecutionProvider"])
    for side in (48, 32):                       # dynamic height and width, batch of two
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        with torch.no_grad():
            np.testing.assert_allclose(graph.run(None, {"image": x.numpy()})[0], net(x).numpy(),
                                       atol=1e-4)
