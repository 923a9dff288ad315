"""Artifact round trip (identical logits), wrapped models, validation and future formats."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import numpy as np
import torch
from torch import nn

from seg_core.artifact import (FORMAT_VERSION, ArtifactError, load_artifact, read_artifact_meta,
                               reproducibility_record, save_artifact, sha256_file)
from seg_core.config import MaskSpec, ModelConfig, Preprocessing
from seg_core.model import UNet

CONFIG = ModelConfig(in_channels=3, num_classes=3, depth=2, base_width=4, norm="batch")
SPEC = MaskSpec(num_classes=3, class_names=("bg", "disc", "rect"))
PRE = Preprocessing(channels=3, resize=(32, 32), tile_size=64)


def trained_model(config: ModelConfig = CONFIG) -> UNet:
    torch.manual_seed(0)
    model = UNet(config)
    model.train()
    with torch.no_grad():  # move BatchNorm running stats away from their defaults
        model(torch.randn(2, 3, 16, 16) * 3 + 1)
    return model.eval()


def save(tmp_path: Path, model: nn.Module, **overrides) -> Path:
    kwargs = dict(name="shapes", version="1.0.0", mask_spec=SPEC, preprocessing=PRE,
                  reproducibility=reproducibility_record(seed=7, manifest_sha256="ab" * 32, fold=2),
                  metrics={"iou": torch.tensor(0.5), "dice_per_class": [1.0, float("nan")]})
    kwargs.update(overrides)
    return save_artifact(tmp_path / "artifact", model, **kwargs)


def test_round_trip_identical_logits(tmp_path: Path) -> None:
    model = trained_model()
    directory = save(tmp_path, model)
    assert sorted(p.name for p in directory.iterdir()) == ["artifact.json", "weights.pt"]
    loaded = load_artifact(directory)
    assert not loaded.model.training
    x = torch.randn(1, 3, 21, 27)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert (loaded.model_config, loaded.mask_spec, loaded.preprocessing) == (CONFIG, SPEC, PRE)
    assert (loaded.name, loaded.version) == ("shapes", "1.0.0")


def test_a_lite_model_round_trips_and_its_segmenter_predicts_the_same_masks(tmp_path: Path
                                                                            ) -> None:
    import dataclasses

    from seg_core.inference import Segmenter

    config, pre = dataclasses.replace(CONFIG, arch="lite"), dataclasses.replace(PRE, tile_size=32)
    model = trained_model(config)
    loaded = load_artifact(save(tmp_path, model, preprocessing=pre))
    assert loaded.model_config.arch == "lite"
    x = torch.randn(1, 3, 21, 27)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    # the artifact's Segmenter folds BatchNorm into the convolutions; the artifact keeps them
    image = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    folded = Segmenter(loaded, engine="torch").predict(image)
    unfolded = Segmenter.from_model(loaded.model, SPEC, pre).predict(image)
    assert any(isinstance(m, nn.BatchNorm2d) for m in loaded.model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in Segmenter(loaded).model.modules())
    assert (folded.mask == unfolded.mask).mean() >= 0.999
    np.testing.assert_allclose(folded.confidence, unfolded.confidence, atol=1e-4)


def test_json_record(tmp_path: Path) -> None:
    meta = json.loads((save(tmp_path, trained_model()) / "artifact.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 3
    assert meta["reproducibility"]["seed"] == 7 and meta["reproducibility"]["fold"] == 2
    assert set(meta["reproducibility"]["packages"]) >= {"python", "torch", "numpy", "rayseg"}
    assert meta["metrics"] == {"iou": 0.5, "dice_per_class": [1.0, None]}
    assert meta["preprocessing"]["resize"] == [32, 32] and meta["created_at"].endswith("+00:00")


def test_wrapped_model_saves_plain_keys(tmp_path: Path) -> None:
    class Wrapper(nn.Module):  # stands in for DistributedDataParallel (.module)
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = trained_model()
    loaded = load_artifact(save(tmp_path, Wrapper(model.to(memory_format=torch.channels_last))))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.model(x), atol=1e-6)
    weights = torch.load(tmp_path / "artifact" / "weights.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in weights)


def test_config_mismatch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mask_spec.num_classes=2"):
        save(tmp_path, trained_model(), mask_spec=MaskSpec(num_classes=2))
    with pytest.raises(ValueError, match="preprocessing.channels=1"):
        save(tmp_path, trained_model(),
             preprocessing=Preprocessing(channels=1, mean=(0.5,), std=(0.2,)))


def test_future_and_missing(tmp_path: Path) -> None:
    directory = save(tmp_path, trained_model())
    meta = json.loads((directory / "artifact.json").read_text())
    meta["format_version"] = 4
    (directory / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="format_version 4 is newer.*upgrade rayseg"):
        load_artifact(directory)
    with pytest.raises(ArtifactError, match="no artifact.json"):
        read_artifact_meta(tmp_path / "nowhere")
    meta["format_version"] = 1
    (directory / "artifact.json").write_text(json.dumps(meta))
    (directory / "weights.pt").unlink()
    with pytest.raises(ArtifactError, match="weights.pt is missing"):
        load_artifact(directory)


def test_sha256_file(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_bytes(b"abc")
    assert sha256_file(tmp_path / "m.csv") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
