"""Tiled inference: trivial predictors are reproduced exactly (within float32 rounding with a float32
band), edges, odd sizes and both stitching directions included."""
from __future__ import annotations


import pytest
import torch

from seg_core.config import ModelConfig
from seg_core.model import UNet
from seg_core.tiling import (blend_weights, forward_pixels, sliding_window, sliding_window_many,
                              tile_starts, window_grid)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(channels, height, width, generator=torch.Generator().manual_seed(seed))


def test_tile_starts_by_hand() -> None:
    assert tile_starts(10, 4, 3) == [0, 3, 6]
    assert tile_starts(11, 4, 3) == [0, 3, 6, 7]  # last window shifted back to the border
    assert tile_starts(4, 4, 1) == [0]
    assert tile_starts(3, 8, 2) == [0]


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("size", [(37, 53), (16, 16), (17, 5), (1, 1)])
def test_identity_and_plus_one_are_exact(blend: str, overlap: float, size: tuple[int, int]) -> None:
    image = _image(3, *size)
    identity = sliding_window(lambda x: x, image, 16, overlap, 3, batch_size=3, blend=blend)
    assert identity.shape == (3, *size) and identity.dtype == torch.float32
    assert torch.equal(identity, image)
    plus_one = sliding_window(lambda x: x + 1, image[None], 16, overlap, 3, blend=blend)
    assert torch.equal(plus_one, image + 1)
    # a float32 band: within a few float32 steps (~1.2e-7 relative each)
    half = sliding_window(lambda x: x + 1, image, 16, overlap, 3, blend=blend,
                          accum_dtype=torch.float32)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, image + 1, rtol=2e-6, atol=1e-6)


def test_predictor_with_different_output_channels() -> None:
    image = _image(2, 21, 19)
    out = sliding_window(lambda x: x.sum(dim=1, keepdim=True) * 2, image, 8, 0.5, 1)
    assert out.shape == (1, 21, 19)
    torch.testing.assert_close(out, image.sum(dim=0, keepdim=True) * 2, rtol=0, atol=1e-6)


def _tile_constant(x: torch.Tensor) -> torch.Tensor:
    """Each tile predicts one value: the image value at its top-left pixel."""
    return x[:, :1, :1, :1].expand(-1, 1, x.shape[2], x.shape[3]).clone()


def test_constant_blend_averages_overlaps_by_hand() -> None:
    image = torch.arange(6, dtype=torch.float32).expand(1, 4, 6).clone()  # value = column
    # tile 4, stride 2: windows start at columns 0 and 2 -> predict 0 and 2
    out = sliding_window(_tile_constant, image, 4, 0.5, 1, blend="constant")
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0]))


def test_gaussian_blend_favours_tile_centres() -> None:
    image = torch.arange(6, dtype=torch.float32).expand(1, 4, 6).clone()
    out = sliding_window(_tile_constant, image, 4, 0.5, 1, blend="gaussian")[0, 0]
    # column 2 is the centre-side of window 0 (value 0) and the edge of window 1 (value 2)
    assert 0.0 < out[2].item() < 1.0 < out[3].item() < 2.0
    assert out[0].item() == 0.0 and out[5].item() == 2.0


def test_blend_weights_shape_and_peak() -> None:
    weights = blend_weights(5, "gaussian")
    assert weights.shape == (5, 5) and weights[2, 2] == 1.0
    assert (weights > 0).all() and weights[0, 0] < weights[1, 1] < weights[2, 2]
    assert torch.equal(weights, weights.T)
    assert torch.equal(blend_weights(3, "constant"), torch.ones(3, 3, dtype=torch.float64))


def test_batches_respect_batch_size_and_device() -> None:
    seen: list[tuple[int, str]] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append((x.shape[0], x.device.type))
        return x

    sliding_window(record, _image(1, 20, 20), 8, 0.0, 1, batch_size=4, device="cpu")
    # starts [0, 8, 12] on both axes -> 9 tiles -> batches 4, 4, 1
    assert [b for b, _ in seen] == [4, 4, 1]
    assert {d for _, d in seen} == {"cpu"}


def test_many_images_share_batches_and_match_one_at_a_time() -> None:
    images = [_image(2, 8, 8, seed=1), _image(2, 5, 7, seed=2), _image(2, 20, 20, seed=3)]
    seen: list[int] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x * 2 + 1

    outs = sliding_window_many(record, images, 8, 0.0, 2, batch_size=4)
    # windows by shape: 8x8 (1 + 9 of the 20x20, cut across images) -> 4, 4, 2; 5x7 -> 1
    assert seen == [4, 4, 2, 1]
    for image, out in zip(images, outs):
        assert torch.equal(out, sliding_window(lambda x: x * 2 + 1, image, 8, 0.0, 2))
        assert torch.equal(out, image * 2 + 1)
    assert sliding_window_many(record, [], 8, 0.0, 2) == []


def test_runs_a_real_unet_on_an_odd_image() -> None:
    torch.manual_seed(0)
    model = UNet(ModelConfig(in_channels=3, num_classes=2, depth=2, base_width=4)).eval()
    out = sliding_window(model, _image(3, 23, 30), 16, 0.25, 2, batch_size=2)
    assert out.shape == (2, 23, 30) and torch.isfinite(out).all()


def test_bad_arguments_raise_value_error() -> None:
    image = _image(3, 10, 10)
    with pytest.raises(ValueError, match=r"must return \(1, 2, 8, 8\), got \(1, 3, 8, 8\)"):
        sliding_window(lambda x: x, image[:, :8, :8], 8, 0.0, 2)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\), got 1.0"):
        sliding_window(lambda x: x, image, 8, 1.0, 3)
    with pytest.raises(ValueError, match=r"expected image C,H,W or 1,C,H,W, got \(2, 3, 10, 10\)"):
        sliding_window(lambda x: x, torch.stack([image, image]), 8, 0.0, 3)
    with pytest.raises(ValueError, match="tile sides must be >= 1, got 0"):
        sliding_window(lambda x: x, image, 0, 0.0, 3)
    with pytest.raises(ValueError, match="num_out and batch_size must be >= 1, got 3, 0"):
        sliding_window(lambda x: x, image, 4, 0.0, 3, batch_size=0)


@pytest.mark.parametrize("size", [(3, 200), (200, 3), (40, 40), (1, 1000)])
def test_stitch_streams_along_either_axis_and_counts_its_windows(size: tuple[int, int]) -> None:
    """Wide images stream column by column, tall ones row by row: the result is the same, and
    ``window_grid`` / ``forward_pixels`` count exactly the windows that ran."""
    image = _image(2, *size)
    shapes: list[tuple[int, ...]] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        shapes.extend([tuple(x.shape[-2:])] * x.shape[0])
        return x * 3 - 1

    out = sliding_window(record, image, 16, 0.25, 2, batch_size=5)
    assert torch.equal(out, image * 3 - 1)
    rows, cols, window_h, window_w = window_grid(*size, 16, 0.25)
    assert len(shapes) == rows * cols and set(shapes) == {(window_h, window_w)}
    assert forward_pixels(*size, 16, 0.25, 8) == rows * cols * (-(-window_h // 8) * 8) * \
        (-(-window_w // 8) * 8)


def test_forward_pixels_by_hand() -> None:
    # 1 x 1000, window 1 x 16, stride 12: starts 0, 12, ..., 984 -> 83 windows, then 984 is the
    # last (1000 - 16): 83 windows of 1 x 16, padded to 8 x 16 by a depth-3 network.
    assert window_grid(1, 1000, 16, 0.25) == (1, 83, 1, 16)
    assert forward_pixels(1, 1000, 16, 0.25, 8) == 83 * 8 * 16
    assert forward_pixels(20, 20, 8, 0.0) == 9 * 64  # starts 0, 8, 12 on both axes
    assert len(tile_starts(1000, 16, 12)) == 83
