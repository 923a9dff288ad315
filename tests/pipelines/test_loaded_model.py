"""The loaded model (pipelines.model): one way to open an artifact, decode under its limits,
predict and build rows.  No Ray: these run in the fast tier."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.model import InputLimits, artifact_meta, open_artifact, open_model
from pipelines.records import decode_prediction, refusal_json
from seg_core.config import MaskSpec, ModelConfig, Preprocessing
from seg_core.errors import InputError
from seg_core.model import UNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _artifact(path, **pre):
    import torch

    from seg_core.artifact import save_artifact

    torch.manual_seed(0)
    model = UNet(ModelConfig(in_channels=3, num_classes=3, depth=2, base_width=4))
    return save_artifact(path, model.eval(), name="tiny", version="m1",
                         mask_spec=MaskSpec(num_classes=3, class_names=("bg", "a", "b")),
                         preprocessing=Preprocessing(tile_size=64, tile_overlap=0.25, **pre),
                         metrics={})


def _png(height: int, width: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_auto_is_resolved_once_and_provenance_names_what_ran(tmp_path):
    model = open_model(str(_artifact(tmp_path / "a")), engine="auto", device="auto")
    assert model.engine in ("torch", "openvino", "onnxruntime") and model.device == "cpu"
    provenance = model.provenance()
    assert provenance["engine"] == model.segmenter.engine != "auto"
    assert provenance["device"] == "cpu" and provenance["name"] == "tiny"
    assert provenance["weights_sha256"] == artifact_meta(str(tmp_path / "a"))["weights_sha256"]


def test_a_max_pixels_override_reaches_decode_and_the_memory_budget(tmp_path):
    uri = str(_artifact(tmp_path / "a"))
    model = open_model(uri, engine="torch", max_pixels=80 * 80)
    assert model.segmenter.preprocessing.max_pixels == 80 * 80     # the budget sees it too
    assert open_artifact(uri).preprocessing.max_pixels > 80 * 80  # the artifact is untouched
    with pytest.raises(InputError) as refused:
        model.decode(_png(90, 90), "big.png")
    assert refused.value.reason == "too_many_pixels" and "big.png" in str(refused.value)
    assert model.decode(_png(60, 70), "ok.png").shape == (60, 70, 3)


def test_predict_rows_quarantines_bad_inputs_in_place_and_keeps_the_rest(tmp_path):
    model = open_model(str(_artifact(tmp_path / "a")), engine="torch")
    good = _png(70, 90, seed=1)
    rows = [{"id": "good", "image_uri": "s3://b/good.png", "image_bytes": good},
            {"id": "missing", "image_uri": "s3://b/missing.png", "image_bytes": None},
            {"id": "corrupt", "image_uri": "s3://b/corrupt.png", "image_bytes": good[:60]},
            {"id": "refused", "image_uri": "/etc/passwd", "image_bytes": None,
             "refused": refusal_json(InputError("path_refused", "outside the allowed roots",
                                                source="/etc/passwd"))}]
    out = model.predict_rows(rows, with_confidence=True)
    assert [r["id"] for r in out] == ["good", "missing", "corrupt", "refused"]  # rows in = out
    assert out[0].get("reason") is None and (out[0]["height"], out[0]["width"]) == (70, 90)
    assert [r["reason"] for r in out[1:]] == ["missing_image", "truncated", "path_refused"]
    assert all(r["stage"] == "predict" and r["source_uri"] for r in out[1:])
    # the row holds the segmenter's own mask for the decoded image (wiring, not quality)
    image = np.asarray(Image.open(io.BytesIO(good)))
    expected = model.segmenter.predict(image).mask
    assert np.array_equal(decode_prediction(out[0], model.mask_spec), expected)
    assert out[0]["weights_sha256"] == model.weights_sha256 and out[0]["model_version"] == "m1"


def test_tiff_page_of_the_artifact_is_decoded(tmp_path):
    model = open_model(str(_artifact(tmp_path / "a", tiff_page=1)), engine="torch")
    pages = [Image.fromarray(np.full((40, 50, 3), value, np.uint8)) for value in (10, 200)]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    assert model.decode(buffer.getvalue(), "stack.tif").mean() == 200   # page 1, not page 0
    with pytest.raises(InputError) as refused:
        InputLimits(max_pixels=10**6).decode(buffer.getvalue(), "stack.tif")
    assert refused.value.reason == "multi_page"
