"""The dataset fingerprint and the training plan (issue 31): the rules on fingerprints written by
hand, and `rayseg plan` on generated street-like scenes of varied sizes over 600 px, whose
fingerprint is checked against figures computed here from the arrays, not by rayseg."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.plan.rules import plan_from


def _fingerprint(sizes: dict, *, shares=(0.6, 0.4), vertical=(), horizontal=(),
                 mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), multilabel=False) -> dict:
    names = [f"c{i}" for i in range(len(shares))]
    return {"images": 10, "num_classes": len(shares), "class_names": names,
            "multilabel": multilabel, "sizes": sizes, "mean": list(mean), "std": list(std),
            "class_share": list(shares), "class_presence": [1.0] * len(shares),
            "empty_mask_rate": 0.0,
            "position": {"vertical_classes": list(vertical),
                         "horizontal_classes": list(horizontal)}}


def _sizes(low: list[int], high: list[int], median: list[int] | None = None) -> dict:
    median = median or [(a + b) // 2 for a, b in zip(low, high)]
    return {"min": low, "p10": low, "median": median, "p90": high, "max": high}


def test_varied_or_large_images_train_on_crops_and_infer_on_tiles_of_that_size():
    plan = plan_from(_fingerprint(_sizes([360, 500], [1388, 1040])))
    assert plan.config["augment"]["crop"] == 256
    assert plan.config["preprocessing"]["tile_size"] == 256
    assert "crop 256: images are 360-1388 px and vary and are large" in plan.reasons
    small = plan_from(_fingerprint(_sizes([90, 100], [200, 180])))   # vary, smaller than 256
    assert small.config["augment"]["crop"] == 80 and small.config["model"]["depth"] == 3


def test_one_size_resizes_to_about_256_squared_keeping_the_aspect_or_trains_whole():
    plan = plan_from(_fingerprint(_sizes([360, 480], [360, 480])))
    assert plan.config["preprocessing"]["resize"] == [224, 288]      # 0.62 x 360 x 480
    assert "augment" not in plan.config or "crop" not in plan.config["augment"]
    assert plan.config["batch_size"] == 4                            # CPU: ~4 x 256² pixels
    assert plan_from(_fingerprint(_sizes([360, 480], [360, 480])),
                     gpu=True).config["batch_size"] == 8             # GPU: ~8 x 256² pixels
    whole = plan_from(_fingerprint(_sizes([128, 160], [128, 160])))
    assert "resize" not in whole.config["preprocessing"]
    assert "full size: images are all about 128x160" in whole.reasons
    assert whole.config["batch_size"] == 8                           # capped on CPU
    assert plan_from(_fingerprint(_sizes([128, 160], [128, 160])),
                     gpu=True).config["batch_size"] == 16            # and on GPU
    # depth 4 while the shorter side keeps >= 6 px at the bottom of the U
    assert whole.config["model"]["depth"] == 4
    assert plan_from(_fingerprint(_sizes([95, 160], [95, 160]))).config["model"]["depth"] == 3


def test_flips_stay_on_unless_a_class_depends_on_its_position():
    free = plan_from(_fingerprint(_sizes([256, 256], [256, 256])))
    assert "augment" not in free.config
    assert "flips and rot90 on: no class depends on its position" in free.reasons
    streets = plan_from(_fingerprint(_sizes([256, 256], [256, 256]), vertical=["sky", "road"]))
    assert streets.config["augment"] == {"vflip": False, "rot90": False}
    assert ("no vertical flips: sky, road differ between the top and bottom of the images"
            in streets.reasons)
    sideways = plan_from(_fingerprint(_sizes([256, 256], [256, 256]), horizontal=["c1"]))
    assert sideways.config["augment"] == {"hflip": False, "rot90": False}


def test_rare_classes_get_weights_and_a_dice_term_and_normalisation_is_the_datas():
    plan = plan_from(_fingerprint(_sizes([256, 256], [256, 256]), shares=(0.9, 0.09, 0.01)))
    assert plan.config["class_weights"] == "auto" and plan.config["loss"] == "dice_ce"
    assert "class_weights auto: rare classes (c2 1.0% of the pixels)" in plan.reasons
    assert plan.config["preprocessing"]["mean"] == [0.5, 0.4, 0.3]
    multilabel = plan_from(_fingerprint(_sizes([256, 256], [256, 256]), shares=(0.3, 0.005),
                                        multilabel=True, mean=(0.5,), std=(0.0,)))
    assert multilabel.config["pos_weight"] == "auto" and multilabel.config["loss"] == "bce_dice"
    assert multilabel.config["preprocessing"] == {"channels": 1, "mean": [0.5], "std": [0.001]}
    assert multilabel.config["model"]["in_channels"] == 1
    with pytest.raises(ValueError, match="no usable image/mask pair"):
        plan_from({"images": 0})


def test_the_users_keys_win_and_keys_that_belong_together_are_decided_together():
    from pipelines.config import config_from_dict
    from pipelines.plan.apply import merge_plan

    plan = plan_from(_fingerprint(_sizes([360, 500], [1388, 1040]), shares=(0.99, 0.01),
                                  vertical=("c0",)))
    user = {"data": {"manifest": "m.csv"}, "preprocessing": {"resize": [192, 160], "mean": [0.4]},
            "augment": {"hflip": False}, "batch_size": 2}
    merged, outcome = merge_plan(user, plan)
    # a resize of yours keeps the planned crop and tile out; a mean keeps channels/std/in_channels
    assert "crop" not in merged.get("augment", {}) and "tile_size" not in merged["preprocessing"]
    assert merged["preprocessing"] == {"resize": [192, 160], "mean": [0.4]}
    assert "in_channels" not in merged.get("model", {}) and merged["batch_size"] == 2
    # flips are decided one by one: the planned vflip/rot90 stay beside your hflip
    assert merged["augment"] == {"hflip": False, "vflip": False, "rot90": False}
    assert merged["class_weights"] == "auto" and merged["model"]["depth"] == 4
    assert set(outcome.kept) == {"preprocessing.resize", "preprocessing.mean", "batch_size"}
    assert "augment.crop" not in outcome.planned and outcome.planned["augment.vflip"] is False
    assert "mask" not in merged   # the mask is the user's (the plan's copy never enters)
    yours = [line for line in outcome.lines if line.startswith("  yours")]
    assert yours[0].startswith("  yours  preprocessing.resize=[192, 160]  (planned: crop 256:")
    assert "; tile 256: inference tiles at the crop)" in yours[0]   # one line, both reasons
    assert len(yours) == 3, outcome.lines
    assert config_from_dict({**merged, "preprocessing": {**merged["preprocessing"],
                                                         "std": [0.2], "channels": 1},
                             "model": {**merged["model"], "in_channels": 1}}).batch_size == 2


def test_rayseg_train_without_a_config_or_data_says_what_to_give(capsys):
    from jobs.cli import main

    assert main(["train", "--set", "epochs=2"]) == 2
    assert "--manifest CSV (or --shards PREFIX) with --num-classes K" in capsys.readouterr().err


# --------------------------------------------------------------------- rayseg plan, with Ray
SIZES = [(620, 700), (800, 650), (700, 900), (960, 720), (640, 640), (1000, 760)]
SKY, ROAD, SIGN = 1, 2, 3


def _scenes(root: Path) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    """Sky above, road below, a small sign somewhere: varied sizes, the sign under 2%."""
    from PIL import Image

    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    images, masks, rows = [], [], []
    for i, (h, w) in enumerate(SIZES):
        mask = np.zeros((h, w), np.uint8)
        mask[: int(0.3 * h)] = SKY
        mask[int(0.7 * h):] = ROAD
        top, left = rng.integers(int(0.35 * h), int(0.6 * h)), rng.integers(0, w - 24)
        mask[top:top + 24, left:left + 24] = SIGN
        image = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
        image[mask == SKY] += np.array([40, 80, 130], np.uint8)
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
        images.append(image)
        masks.append(mask)
        rows.append({"id": f"s{i}", "image": f"images/s{i}.png", "mask": f"masks/s{i}.png",
                     "split": "train"})
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv", images, masks


@pytest.mark.ray
def test_rayseg_plan_crops_turns_flips_off_and_weights_the_rare_sign(ray_session, tmp_path,
                                                                     capsys, monkeypatch):
    from jobs.cli import main
    from pipelines.api import fingerprint, import_file, session

    manifest, images, masks = _scenes(tmp_path / "scenes")
    out = tmp_path / "plan"
    assert main(["plan", str(manifest), "--num-classes", "4", "--class-names",
                 "other,sky,road,sign", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    fp = json.loads((out / "fingerprint.json").read_text())
    # the fingerprint against figures computed here from the arrays
    counts = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=4)
    np.testing.assert_allclose(fp["class_share"], counts / counts.sum(), atol=1e-5)
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64) / 255
    np.testing.assert_allclose(fp["mean"], pixels.mean(axis=0), atol=1e-3)
    np.testing.assert_allclose(fp["std"], pixels.std(axis=0), atol=1e-3)
    assert fp["images"] == 6 and fp["sizes"]["min"] == [620, 640]
    assert fp["sizes"]["max"] == [1000, 900] and fp["sizes"]["distinct"] == 6
    assert fp["channels"] == {"3": 6} and fp["pixel_types"] == {"uint8": 6}
    assert fp["class_presence"] == [1.0, 1.0, 1.0, 1.0] and fp["empty_mask_rate"] == 0.0
    assert set(fp["position"]["vertical_classes"]) == {"sky", "road"}
    assert fp["position"]["horizontal_classes"] == []
    assert fp["position"]["top"][SKY] == pytest.approx(0.9, abs=0.01)   # 30% of 33% rows
    # the plan and its reasons, printed and in plan.yaml
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["augment"] == {"crop": 256, "vflip": False, "rot90": False}
    assert plan["class_weights"] == "auto" and plan["loss"] == "dice_ce"
    assert plan["mask"]["class_names"] == ["other", "sky", "road", "sign"]
    for reason in ("crop 256: images are 620-1000 px and vary and are large",
                   "no vertical flips: sky, road differ between the top and bottom",
                   "class_weights auto: rare classes (sign 0.",):
        assert reason in printed, printed
    # the plan is a valid training config fragment
    from pipelines.config import load_train_config

    cfg = load_train_config(out / "plan.yaml", [f"data.manifest={manifest}"])
    assert cfg.augment.crop == 256 and not cfg.augment.vflip and cfg.augment.hflip
    assert (out / "report.json").exists() and (out / "quarantine.parquet").exists()
    # the notebook's fingerprint(frame): the same figures and plan
    monkeypatch.setitem(session._SESSION, "work_dir", str(tmp_path / "work"))
    api = fingerprint(import_file(str(manifest)), num_classes=4,
                      class_names=["other", "sky", "road", "sign"])
    assert api["plan"]["config"] == plan and api["class_share"] == fp["class_share"]


@pytest.mark.ray
def test_rayseg_train_runs_the_plan_around_the_keys_the_user_set(ray_session, tmp_path, capsys):
    """``rayseg train --manifest --num-classes`` trains with the plan; the user's keys win
    (a group of them whole: a resize set keeps the planned crop and tile out)."""
    from jobs.cli import main

    manifest, _, _ = _scenes(tmp_path / "scenes")
    rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join(rows[:-1] + [rows[-1].replace(",train", ",val")]) + "\n")
    models = tmp_path / "models"
    assert main(["train", "--manifest", str(manifest), "--num-classes", "4",
                 "--set", "mask.class_names=[other,sky,road,sign]",
                 "--set", "preprocessing.resize=[192,160]", "--set", "augment.vflip=true",
                 "--set", "batch_size=2", "--set", "max_iterations=2", "--set", "epochs=1",
                 "--set", "register=false",
                 "--set", f"storage.storage_path={tmp_path / 'runs'}",
                 "--set", f"storage.models_uri={models}"]) == 0
    printed = capsys.readouterr().out
    assert "rayseg plan: 5 training pair(s) fingerprinted" in printed, printed   # not val's
    assert "yours  augment.vflip=True  (planned: no vertical flips: sky, road" in printed
    assert ("yours  preprocessing.resize=[192, 160]  (planned: crop 256: images are 620-960 "
            "px and vary and are large; tile 256: inference tiles at the crop)") in printed
    assert "yours  batch_size=2  (planned: batch 4:" in printed
    assert "plan   class_weights auto: rare classes (sign 0." in printed
    used = yaml.safe_load((models / "unet" / "v1" / "config.yaml").read_text())
    assert used["augment"]["vflip"] is True and used["augment"]["rot90"] is False
    assert used["augment"]["crop"] is None and used["preprocessing"]["tile_size"] is None
    assert used["preprocessing"]["resize"] == [192, 160] and used["batch_size"] == 2
    assert used["class_weights"] == "auto" or len(used["class_weights"]) == 4
    assert used["loss"] == "dice_ce" and used["model"]["depth"] == 4
    planned = yaml.safe_load((tmp_path / "runs" / "unet-v1" / "plan" / "plan.yaml").read_text())
    assert planned["augment"]["crop"] == 256   # what the plan said, beside what ran
    fp = json.loads((tmp_path / "runs" / "unet-v1" / "plan" / "fingerprint.json").read_text())
    assert fp["images"] == 5
