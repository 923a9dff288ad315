"""``rayseg tune-postprocess`` on a local artifact and manifest: no Ray, the real command."""
from __future__ import annotations

import json
from pathlib import Path

from jobs.cli import main
from seg_core.artifact import load_artifact
from seg_core.codecs import decode_image, encode_png
from seg_core.sample_data import generate_sample_dataset
from tests.serve_util import make_artifact


def test_tune_postprocess_records_rules_that_never_lower_val_dice(tmp_path, capsys):
    from pipelines.model import open_model
    from seg_core.config import PostProcess
    from seg_core.postprocess import apply

    manifest = Path(generate_sample_dataset(tmp_path / "data", n=12, size=(48, 64),
                                            num_classes=3, seed=2))
    model_dir = make_artifact(tmp_path / "tiny")
    # Truth = the model's own masks without their specks under 30 pixels: min_size must help.
    raw = open_model(str(model_dir), engine="torch", postprocess=PostProcess())
    despeckle = PostProcess(min_size=(0, 30, 30))
    for line in manifest.read_text().splitlines()[1:]:
        image_rel, mask_rel = line.split(",")[:2]
        image = decode_image((manifest.parent / image_rel).read_bytes())
        mask = apply(raw.segmenter.predict(image).mask, despeckle, multilabel=False)
        (manifest.parent / mask_rel).write_bytes(encode_png(mask))
    assert main(["tune-postprocess", "--model", str(model_dir), "--manifest",
                 str(manifest)]) == 0
    out = capsys.readouterr().out
    val_rows = sum(1 for line in manifest.read_text().splitlines() if line.endswith(",val"))
    assert f"post-processing chosen on {val_rows} val image(s)" in out
    meta = json.loads((model_dir / "artifact.json").read_text())
    evidence = meta["postprocess_choice"]
    assert evidence["images"] == val_rows and set(evidence["classes"]) == {"a", "b"}
    assert evidence["mean_dice_after"] >= evidence["mean_dice_before"]
    for found in evidence["classes"].values():
        assert found["dice_after"] >= found["dice_before"]
        assert set(found["tried"]) == {"fill_holes", "keep_largest", "min_size 10", "min_size 30",
                                       "min_size 100", "min_size 300", "min_size 1000"}
    rules = load_artifact(model_dir).postprocess
    assert rules.min_size[1] > 0 and rules.min_size[2] > 0      # the specks go
    assert rules.describe(("bg", "a", "b")) in out
    # every engine opened through the one way in applies them (here torch and the default)
    image = decode_image(sorted((manifest.parent / "images").iterdir())[0].read_bytes())
    for engine in ("torch", "auto"):
        cleaned = open_model(str(model_dir), engine=engine).segmenter.predict(image).mask
        expected = apply(raw.segmenter.predict(image).mask, rules, multilabel=False)
        agree = (cleaned == expected).mean()
        assert agree == 1.0 if engine == "torch" else agree > 0.99, engine


def test_the_end_of_training_baseline_from_the_fitting_pass_is_the_one_predict_gives(
        tmp_path, monkeypatch):
    """``fit_on_val(baseline=True)`` finishes the drift baseline from the probabilities it fitted
    the rules and the temperature on; ``rayseg predict``'s path (decode, predict, rows) over the
    same val images with the tuned artifact gives the same baseline, and so does the fallback
    that predicts again when the probabilities are not kept."""
    import shutil

    import numpy as np

    from pipelines.operate import monitor
    from pipelines.train import postprocess

    manifest = Path(generate_sample_dataset(tmp_path / "data", n=16, size=(40, 72),
                                            num_classes=3, seed=5, formats=("png", "jpeg")))
    source = make_artifact(tmp_path / "source")
    dirs = {name: Path(shutil.copytree(source, tmp_path / name)) for name in
            ("merged", "again", "reference")}
    predict_again = monitor.write_baseline

    def not_again(*args, **kwargs):
        raise AssertionError("the val images were predicted a second time")

    monkeypatch.setattr(monitor, "write_baseline", not_again)
    found = postprocess.fit_on_val(dirs["merged"], str(manifest), kind="auto", split="val",
                                   baseline=True, log=lambda line: None)
    assert found["calibration"]["temperature"] != 1.0   # the finish applies a real temperature
    monkeypatch.setattr(monitor, "write_baseline", predict_again)
    monkeypatch.setattr(postprocess, "HELD_PROBS_BYTES", 0)
    again = postprocess.fit_on_val(dirs["again"], str(manifest), kind="auto", split="val",
                                   baseline=True, log=lambda line: None)["baseline"]
    postprocess.fit_on_val(dirs["reference"], str(manifest), kind="auto", split="val",
                           log=lambda line: None)
    reference = monitor.write_baseline(dirs["reference"], monitor.val_images(
        str(manifest), kind="auto", split="val"))
    val_rows = sum(1 for line in manifest.read_text().splitlines() if line.endswith(",val"))
    for baseline in (found["baseline"], again):
        assert baseline["images"] == reference["images"] == val_rows
        assert baseline["weights_sha256"] == reference["weights_sha256"]
        assert baseline["empty"] == reference["empty"]
        np.testing.assert_allclose(baseline["area"], reference["area"], atol=1e-6)
        np.testing.assert_allclose(baseline["confidence"], reference["confidence"], atol=1e-6)
    on_disk = json.loads((dirs["merged"] / monitor.BASELINE_FILE).read_text())
    assert on_disk == found["baseline"]
    # the confidences are the calibrated ones: at temperature 1 they differ
    assert not np.allclose(found["baseline"]["confidence"],
                           monitor.write_baseline(source, monitor.val_images(
                               str(manifest), kind="auto", split="val"))["confidence"])
