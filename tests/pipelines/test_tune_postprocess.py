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
