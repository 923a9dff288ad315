"""UNet: shapes for any H x W, configurable blocks, channels_last parity, wiring."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from seg_core.config import ModelConfig
from seg_core.model import (ConvBlock, DecoderStage, SeparableBlock, UNet, _pad_to_multiple,
                            channel_plan, conv_macs, fold_batchnorm)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(**kw: object) -> UNet:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"in_channels": 3, "num_classes": 4, "depth": 2, "base_width": 4, **kw})
    return UNet(cfg)


def test_channel_plan_doubles_from_base_width() -> None:
    assert channel_plan(ModelConfig(depth=3, base_width=8)) == (8, 16, 32, 64)


@pytest.mark.parametrize("arch", ["unet", "lite"])
@pytest.mark.parametrize("height,width", [(16, 16), (17, 31), (5, 3), (1, 1), (33, 8)])
def test_any_size_gives_same_size_logits(height: int, width: int, arch: str) -> None:
    model = _model(arch=arch).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    assert out.shape == (2, 4, height, width)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_variants_build_and_run(norm: str, upsample: str) -> None:
    model = _model(norm=norm, upsample=upsample, depth=3, in_channels=1, num_classes=2)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    expected = nn.BatchNorm2d if norm == "batch" else nn.GroupNorm
    assert norms and all(isinstance(m, expected) for m in norms)
    has_transpose = any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    assert has_transpose == (upsample == "transpose")
    out = model(torch.randn(2, 1, 20, 12))
    assert out.shape == (2, 2, 20, 12)


def test_blocks_follow_channel_plan() -> None:
    model = _model(depth=3, base_width=4)
    assert len(model.encoder) == 3 and len(model.decoder) == 3
    assert isinstance(model.stem, ConvBlock)
    first_decoder = model.decoder[0]
    assert isinstance(first_decoder, DecoderStage)
    assert first_decoder.up.in_channels == 32 and first_decoder.up.out_channels == 16
    assert model.head.in_channels == 4 and model.head.out_channels == 4
    assert model.config.depth == 3


@pytest.mark.parametrize("arch", ["unet", "lite"])
def test_every_parameter_receives_a_gradient(arch: str) -> None:
    model = _model(upsample="bilinear", norm="group", arch=arch)
    model(torch.randn(1, 3, 12, 12)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize("arch", ["unet", "lite"])
def test_channels_last_matches_nchw(arch: str) -> None:
    model = _model(depth=3, arch=arch).eval()
    x = torch.randn(2, 3, 23, 18)
    with torch.no_grad():
        expected = model(x)
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert x_cl.is_contiguous(memory_format=torch.channels_last)
        assert model_cl.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
        got = model_cl(x_cl)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_lite_uses_separable_blocks_and_an_additive_decoder() -> None:
    model = _model(arch="lite", depth=3, base_width=8)
    assert [isinstance(stage.block, SeparableBlock) for stage in model.encoder] == [True] * 3
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    # additive skips: every decoder block sees the skip's width, not twice it
    assert [stage.block[0].in_channels for stage in model.decoder] == [32, 16, 8]


def test_conv_macs_counts_each_convolution_by_hand() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2),
                          nn.Conv2d(4, 4, 3, padding=1, groups=4))
    conv = 10 * 12 * 8 * 3 * 9          # output pixels x out x in x k*k
    transpose = 10 * 12 * 8 * 4 * 4     # input pixels x in x out x k*k
    depthwise = 20 * 24 * 4 * 1 * 9     # one input channel per output channel
    assert conv_macs(model, 10, 12) == conv + transpose + depthwise


def test_lite_has_several_times_fewer_flops_and_parameters() -> None:
    base = UNet(ModelConfig(depth=4, base_width=16))
    lite = UNet(ModelConfig(depth=4, base_width=16, arch="lite"))
    assert conv_macs(base, 256, 256) >= 3 * conv_macs(lite, 256, 256)
    assert sum(p.numel() for p in base.parameters()) >= 3 * sum(
        p.numel() for p in lite.parameters())


@pytest.mark.parametrize("arch", ["unet", "lite"])
def test_folded_batchnorm_gives_the_same_logits_without_norm_layers(arch: str) -> None:
    model = _model(arch=arch, depth=3)
    model.train()
    with torch.no_grad():   # running statistics far from the initial 0 / 1
        for _ in range(5):
            model(3 * torch.randn(4, 3, 24, 24) + 1)
    model.eval()
    folded = fold_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_dropout_only_active_in_training() -> None:
    model = _model(dropout=0.5)
    assert any(isinstance(m, nn.Dropout2d) for m in model.modules())
    x = torch.randn(2, 3, 8, 8)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_no_dropout_layers_when_disabled() -> None:
    assert not any(isinstance(m, nn.Dropout2d) for m in _model().modules())


def test_pad_to_multiple_keeps_input_top_left() -> None:
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    padded = _pad_to_multiple(x, 4)
    assert padded.shape == (1, 2, 8, 8)
    assert torch.equal(padded[..., :5, :7], x)
    tiny = _pad_to_multiple(torch.ones(1, 1, 1, 2), 8)  # too small for reflect
    assert tiny.shape == (1, 1, 8, 8) and torch.equal(tiny, torch.ones(1, 1, 8, 8))


def test_bad_input_and_config_raise_value_error() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"expected input N,3,H,W, got \(1, 2, 8, 8\)"):
        model(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="dropout"):
        UNet(ModelConfig(dropout=1.5))
    with pytest.raises(ValueError, match="base_width"):
        UNet(ModelConfig(base_width=0))


def test_warm_start_loads_everything_or_all_but_a_resized_head():
    from seg_core.model import warm_start

    torch.manual_seed(0)
    trained = UNet(ModelConfig(in_channels=3, num_classes=3, depth=2, base_width=4))
    same = UNet(ModelConfig(in_channels=3, num_classes=3, depth=2, base_width=4))
    assert warm_start(same, trained.state_dict()) == "warm start: every layer loaded"
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(),
                                                 trained.state_dict().values()))
    fresh = UNet(ModelConfig(in_channels=3, num_classes=5, depth=2, base_width=4))
    head_before = fresh.head.weight.detach().clone()
    message = warm_start(fresh, trained.state_dict())
    assert "re-initialised for 5 classes" in message and "had 3" in message
    changed = {k for k, v in fresh.state_dict().items()
               if v.shape != trained.state_dict()[k].shape}
    assert changed == {"head.weight", "head.bias"}      # only the head changed shape
    assert torch.equal(fresh.head.weight, head_before)  # and kept its fresh initialisation
    for key, value in fresh.state_dict().items():
        if key not in changed:
            assert torch.equal(value, trained.state_dict()[key]), key
    wider = UNet(ModelConfig(in_channels=3, num_classes=3, depth=2, base_width=8))
    with pytest.raises(ValueError, match="base_width"):
        warm_start(wider, trained.state_dict())
