"""Inference engines (seg_core.runtimes): parity with torch, agreement with an independent
reference, INT8 accuracy, the graph cache and the errors.

The model is the position-dependent 4-class task of ``tests.geometry_reference`` (non-square,
unbalanced, its bottom-third class only separable by the border), so an engine that mishandled
shapes or padding would move many pixels.  Images come in at their stored size (resized
geometry) and at odd sizes through sliding windows, which pads windows to the U-Net's multiple.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from seg_core.artifact import load_artifact, save_artifact
from seg_core.config import MaskSpec, Preprocessing
from seg_core.inference import Segmenter
from seg_core.runtimes import (CALIBRATION_FILE, ENGINE_DIR, load_calibration, resolve_engine,
                               save_calibration, writable_cache)
from tests.geometry_reference import (CLASS_NAMES, MEAN, NUM_CLASSES, STD, STORED_SIZE,
                                      TRAIN_SIZE, reference_resized, reference_windows, render,
                                      to_input, train_position_model)

# one torch thread, as the session's position model was trained with
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPEC = MaskSpec(num_classes=NUM_CLASSES, class_names=CLASS_NAMES)
RESIZED = Preprocessing(mean=(MEAN,) * 3, std=(STD,) * 3, resize=TRAIN_SIZE, train_size=TRAIN_SIZE)
WINDOWS = Preprocessing(mean=(MEAN,) * 3, std=(STD,) * 3, train_size=TRAIN_SIZE)
FLOAT_ENGINES = ("openvino", "onnxruntime")
SEEDS = range(8)




@pytest.fixture(scope="module")
def artifact_dir(position_model, tmp_path_factory) -> Path:
    directory = save_artifact(tmp_path_factory.mktemp("engines") / "model", position_model,
                              name="position", version="1", mask_spec=SPEC,
                              preprocessing=RESIZED)
    save_calibration(directory, [to_input(render(500 + i, TRAIN_SIZE)[0], None)[0].numpy()
                                 for i in range(16)])
    return directory


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


@pytest.mark.parametrize("engine", FLOAT_ENGINES)
def test_engine_masks_match_torch_and_the_reference(artifact_dir, position_model, engine) -> None:
    artifact = load_artifact(artifact_dir)
    torch_seg, graph_seg = Segmenter(artifact), Segmenter(artifact, engine=engine)
    assert graph_seg.engine == engine
    images = [render(seed)[0] for seed in SEEDS]
    for image, ours, theirs in zip(images, graph_seg.predict_batch(images),
                                   torch_seg.predict_batch(images)):
        reference = reference_resized(position_model, image).argmax(dim=0).numpy()
        assert agreement(ours.mask, theirs.mask) >= 0.999
        assert agreement(ours.mask, reference) >= 0.999   # computed without seg_core.inference
        np.testing.assert_allclose(ours.probs, theirs.probs, atol=0.02)


@pytest.mark.parametrize("engine", FLOAT_ENGINES)
def test_engine_windows_of_odd_sizes_match_torch_and_the_reference(artifact_dir, position_model,
                                                                   engine) -> None:
    """Sliding windows of 48x80 over images whose sides are no multiple of the U-Net's 4:
    every window is padded by the runner as the module pads itself."""
    artifact = load_artifact(artifact_dir)
    artifact = type(artifact)(**{**artifact.__dict__, "preprocessing": WINDOWS})
    torch_seg, graph_seg = Segmenter(artifact), Segmenter(artifact, engine=engine)
    images = [render(seed, size)[0] for seed, size in
              enumerate([(71, 119), (45, 203), STORED_SIZE, (130, 61)])]
    pixels = agree = agree_reference = 0
    for image, ours, theirs in zip(images, graph_seg.predict_batch(images),
                                   torch_seg.predict_batch(images)):
        assert ours.mask.shape == theirs.mask.shape == image.shape[:2]
        reference = reference_windows(position_model, image, TRAIN_SIZE).argmax(dim=0).numpy()
        agree += int((ours.mask == theirs.mask).sum())
        agree_reference += int((ours.mask == reference).sum())   # without seg_core.inference
        pixels += ours.mask.size
    assert agree / pixels >= 0.999 and agree_reference / pixels >= 0.999


@pytest.mark.parametrize("preprocessing", [RESIZED, WINDOWS], ids=["resized", "windows"])
def test_multilabel_masks_match_torch_and_the_reference(position_model, tmp_path,
                                                        preprocessing) -> None:
    spec = MaskSpec(num_classes=NUM_CLASSES, class_names=CLASS_NAMES, multilabel=True)
    directory = save_artifact(tmp_path / "ml", position_model, name="ml", version="1",
                              mask_spec=spec, preprocessing=preprocessing)
    artifact = load_artifact(directory)
    sizes = [STORED_SIZE] * 4 if preprocessing is RESIZED else [(71, 119), (45, 203)]
    images = [render(seed, size)[0] for seed, size in enumerate(sizes)]
    references = [(reference_resized(position_model, image, multilabel=True)
                   if preprocessing is RESIZED else
                   reference_windows(position_model, image, TRAIN_SIZE, multilabel=True)
                   ) >= 0.5 for image in images]   # computed without seg_core.inference
    for engine in FLOAT_ENGINES:
        ours = Segmenter(artifact, engine=engine).predict_batch(images)
        theirs = Segmenter(artifact, engine="torch").predict_batch(images)
        for image, a, b, reference in zip(images, ours, theirs, references):
            assert a.mask.shape == (NUM_CLASSES, *image.shape[:2])
            assert agreement(a.mask, b.mask) >= 0.999
            assert agreement(a.mask, reference.numpy().astype(np.uint8)) >= 0.999


def test_int8_keeps_accuracy_against_the_truth(artifact_dir) -> None:
    artifact = load_artifact(artifact_dir)
    scenes = [render(100 + seed) for seed in range(12)]
    images = [image for image, _ in scenes]
    float_acc = np.mean([agreement(p.mask, truth) for p, (_, truth) in
                         zip(Segmenter(artifact, engine="torch").predict_batch(images), scenes)])
    assert float_acc > 0.97   # the task is learned: the comparison below means something
    for engine in ("openvino-int8", "onnxruntime-int8"):
        predictions = Segmenter(artifact, engine=engine).predict_batch(images)
        int8_acc = np.mean([agreement(p.mask, truth) for p, (_, truth) in
                            zip(predictions, scenes)])
        assert int8_acc >= float_acc - 0.005, (engine, int8_acc, float_acc)
    names = sorted(os.listdir(artifact_dir / ENGINE_DIR))
    assert names == [f"{artifact.weights_key}.int8.onnx", f"{artifact.weights_key}.onnx"]


def test_the_graph_is_exported_once_and_keyed_by_the_weights(artifact_dir, tmp_path) -> None:
    artifact = load_artifact(artifact_dir)
    Segmenter(artifact, engine="onnxruntime")
    graph = artifact_dir / ENGINE_DIR / f"{artifact.weights_key}.onnx"
    before = graph.stat().st_mtime_ns
    Segmenter(artifact, engine="openvino")   # both runtimes read the same graph
    assert graph.stat().st_mtime_ns == before
    # other weights in another directory: another key, another graph
    other = load_artifact(save_artifact(tmp_path / "other", train_position_model(steps=2),
                                        name="other", version="1", mask_spec=SPEC,
                                        preprocessing=RESIZED))
    assert other.weights_key != artifact.weights_key
    Segmenter(other, engine="onnxruntime")
    assert (other.path / ENGINE_DIR / f"{other.weights_key}.onnx").is_file()


def test_an_unwritable_cache_falls_back_to_the_temp_dir(tmp_path) -> None:
    """An artifact directory the process cannot write (here: its engines/ path is taken by a
    file, which stops root too) still gets its graph, cached under the system temp dir."""
    import tempfile

    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    assert writable_cache(blocked / ENGINE_DIR) == Path(tempfile.gettempdir()) / "rayseg-engines"
    assert writable_cache(tmp_path / "fine" / ENGINE_DIR) == tmp_path / "fine" / ENGINE_DIR


def test_int8_without_calibration_images_says_how_to_get_them(position_model, tmp_path) -> None:
    directory = save_artifact(tmp_path / "bare", position_model, name="bare", version="1",
                              mask_spec=SPEC, preprocessing=RESIZED)
    with pytest.raises(ValueError, match=f"no {CALIBRATION_FILE}.*retrain"):
        Segmenter(load_artifact(directory), engine="openvino-int8")


def test_calibration_images_are_cropped_and_round_trip(tmp_path) -> None:
    big = np.random.default_rng(0).normal(size=(3, 700, 90)).astype(np.float32)
    save_calibration(tmp_path, [big] * 20)
    stored = load_calibration(tmp_path)
    assert len(stored) == 16
    assert stored[0].shape == (3, 512, 90)
    np.testing.assert_allclose(stored[0], big[:, 94:606], atol=1e-2)   # centred, float16
    with np.load(tmp_path / CALIBRATION_FILE) as archive:   # numpy's own reader takes it
        assert sorted(archive.files) == [f"image_{i:03d}" for i in range(16)]
        np.testing.assert_array_equal(archive["image_000"], stored[0].astype(np.float16))


def test_engine_choice_follows_the_device() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_engine("auto", cpu) == "openvino"
    assert resolve_engine("auto", cpu, arch="lite") == "onnxruntime"   # bf16 parity (bench)
    assert resolve_engine("auto", gpu) == "torch"
    assert resolve_engine("onnxruntime-int8", cpu) == "onnxruntime-int8"
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_engine("openvino", gpu)
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine("tensorrt", cpu)
