"""The shared inference path: preprocessing values, shapes, bounds, TTA, determinism, encoding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from seg_core.artifact import load_artifact, save_artifact
from seg_core.codecs import decode_image
from seg_core.config import MaskSpec, ModelConfig, Preprocessing
from seg_core.inference import Segmenter, encode_prediction, prepare_image, row_fields
from seg_core.model import UNet

PRE = Preprocessing(channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), tile_size=32,
                    tile_overlap=0.25)
RNG = np.random.default_rng(0)


def constant_model(bias: list[float]) -> nn.Module:
    """Per-pixel model whose logits are ``bias`` everywhere (1x1 conv, zero weights)."""
    conv = nn.Conv2d(3, len(bias), kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor(bias))
    return conv


def pixelwise_model(num_out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, num_out, kernel_size=1)


def small_unet_segmenter(tmp_path, **kwargs) -> Segmenter:
    torch.manual_seed(0)
    model = UNet(ModelConfig(in_channels=3, num_classes=3, depth=2, base_width=4))
    directory = save_artifact(tmp_path / "a", model.eval(), name="t", version="0",
                              mask_spec=MaskSpec(3), preprocessing=PRE)
    return Segmenter(load_artifact(directory), **{"engine": "torch", **kwargs})


def test_prepare_image_values() -> None:
    rgb = np.array([[[255, 0, 128]]], dtype=np.uint8)
    np.testing.assert_allclose(prepare_image(rgb, PRE)[:, 0, 0].numpy(),
                               [2.0, -2.0, (128 / 255 - 0.5) / 0.25], atol=1e-6)
    deep = np.full((2, 3, 1), 65535, dtype=np.uint16)  # grey -> RGB
    out = prepare_image(deep, PRE)
    assert out.shape == (3, 2, 3) and torch.allclose(out, torch.full_like(out, 2.0))
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # alpha dropped, not read as a colour
    assert torch.allclose(prepare_image(rgba, PRE), torch.full((3, 4, 5), -2.0))
    grey_pre = Preprocessing(channels=1, mean=(0.0,), std=(1.0,), resize=(8, 6))
    red = np.zeros((20, 30, 3), dtype=np.uint8)
    red[..., 0] = 255
    out = prepare_image(red, grey_pre)
    assert out.shape == (1, 8, 6) and torch.allclose(out, torch.full_like(out, 0.299))


def test_constant_model_hand_computed() -> None:
    # logits (0, ln 3) -> probs (1/4, 3/4) everywhere
    segmenter = Segmenter.from_model(constant_model([0.0, math.log(3.0)]), MaskSpec(2), PRE)
    pred = segmenter.predict(RNG.integers(0, 256, (45, 71, 3), dtype=np.uint8))
    assert pred.mask.shape == (45, 71) and pred.mask.dtype == np.uint8
    assert np.all(pred.mask == 1)
    np.testing.assert_allclose(pred.probs[:, 7, 9], [0.25, 0.75], atol=1e-5)
    np.testing.assert_allclose(pred.confidence, 0.75, atol=1e-5)
    expected_entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    np.testing.assert_allclose(pred.entropy, expected_entropy, atol=1e-5)


def test_tiling_matches_whole_image_for_pixelwise_model() -> None:
    model = pixelwise_model()
    image = RNG.integers(0, 256, (50, 77, 3), dtype=np.uint8)
    pred = Segmenter.from_model(model, MaskSpec(3), PRE).predict(image)
    with torch.no_grad():
        direct = model(prepare_image(image, PRE)[None])[0].softmax(0).numpy()
    np.testing.assert_allclose(pred.probs, direct, atol=1e-5)


@pytest.mark.parametrize("size", [(37, 53), (70, 41), (5, 9)])
def test_unet_shapes_and_bounds(tmp_path, size: tuple[int, int]) -> None:
    segmenter = small_unet_segmenter(tmp_path)
    pred = segmenter.predict(RNG.integers(0, 256, (*size, 3), dtype=np.uint8))
    assert pred.mask.shape == size and pred.probs.shape == (3, *size)
    assert pred.mask.max() < 3
    np.testing.assert_allclose(pred.probs.sum(axis=0), 1.0, atol=1e-5)
    for field in (pred.confidence, pred.entropy):
        assert field.shape == size and field.min() >= 0.0 and field.max() <= 1.0
    assert pred.confidence.min() >= 1 / 3 - 1e-6


def test_resize_returns_input_size() -> None:
    pre = Preprocessing(channels=3, resize=(32, 32), tile_size=32)
    segmenter = Segmenter.from_model(pixelwise_model(), MaskSpec(3), pre)
    pred = segmenter.predict(RNG.integers(0, 256, (45, 61), dtype=np.uint8))  # grey input
    assert pred.mask.shape == (45, 61) and pred.probs.shape == (3, 45, 61)
    np.testing.assert_allclose(pred.probs.sum(axis=0), 1.0, atol=1e-5)


def test_tta_runs_and_is_exact_for_flip_equivariant_model(tmp_path) -> None:
    image = RNG.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    model = pixelwise_model()
    plain = Segmenter.from_model(model, MaskSpec(3), PRE).predict(image)
    flipped = Segmenter.from_model(model, MaskSpec(3), PRE, tta=True).predict(image)
    np.testing.assert_allclose(plain.probs, flipped.probs, atol=1e-5)
    unet_tta = small_unet_segmenter(tmp_path, tta=True).predict(image)
    assert unet_tta.mask.shape == (40, 52)
    np.testing.assert_allclose(unet_tta.probs.sum(axis=0), 1.0, atol=1e-5)


def test_deterministic_bytes(tmp_path) -> None:
    segmenter = small_unet_segmenter(tmp_path)
    image = RNG.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    first, second = segmenter.predict_batch([image, image.copy()])
    spec = MaskSpec(3)
    assert encode_prediction(first, spec) == encode_prediction(second, spec)


def test_predict_batch_is_one_forward_and_matches_predict(tmp_path) -> None:
    segmenter = small_unet_segmenter(tmp_path, batch_size=8)
    images = [RNG.integers(0, 256, shape, dtype=np.uint8)
              for shape in [(32, 32, 3), (20, 28, 3), (32, 32, 3), (17, 9, 3), (30, 31, 3)]]
    forwards: list[int] = []
    hook = segmenter.model.register_forward_hook(
        lambda module, args, out: forwards.append(args[0].shape[0]))
    try:
        batched = segmenter.predict_batch(images)
    finally:
        hook.remove()
    # Images within one 32-pixel tile take one forward on themselves, never padded: the two
    # 32x32 images share a forward, each other size has its own.
    assert sorted(forwards) == [1, 1, 1, 2]
    for image, got in zip(images, batched):
        alone = segmenter.predict(image)
        assert got.mask.shape == image.shape[:2]
        np.testing.assert_allclose(got.probs, alone.probs, atol=1e-5)
        np.testing.assert_array_equal(got.mask, alone.mask)
    assert segmenter.predict_batch([]) == []


def test_bf16_autocast_is_opt_in_on_the_cpu_and_the_default_on_gpus(tmp_path) -> None:
    from seg_core.inference import resolve_amp, tiles_per_forward

    assert resolve_amp("auto", torch.device("cpu")) is None
    assert resolve_amp("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_amp(None, torch.device("cuda")) is None
    with pytest.raises(ValueError, match="amp_dtype"):
        resolve_amp("fp16", torch.device("cpu"))
    fp32 = small_unet_segmenter(tmp_path)
    # on a CPU: 64K padded pixels per torch thread, at least one window, at most 32
    assert fp32.amp_dtype is None and fp32.batch_size == 32   # 32^2 tiles
    for threads, expected in ((1, ((512, 1), (256, 1), (200, 1), (128, 4), (64, 16), (32, 32),
                                   (8, 32))),
                              (2, ((512, 1), (256, 2), (128, 8), (64, 32))),
                              (16, ((1024, 1), (512, 4), (256, 16), (128, 32)))):
        for side, windows in expected:
            assert tiles_per_forward(fp32.model, (side, side), "cpu",
                                     threads=threads) == windows, (threads, side)
    threads = torch.get_num_threads()   # by default, the threads when it is called
    try:
        torch.set_num_threads(2)
        assert tiles_per_forward(fp32.model, (256, 256), "cpu") == 2
        torch.set_num_threads(1)
        assert tiles_per_forward(fp32.model, (256, 256), "cpu") == 1
    finally:
        torch.set_num_threads(threads)
    bf16 = small_unet_segmenter(tmp_path, amp_dtype=torch.bfloat16)
    seen: list[torch.dtype] = []
    hook = bf16.model.stem[0].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    image = RNG.integers(0, 256, (70, 45, 3), dtype=np.uint8)   # several windows, stitched
    try:
        low = bf16.predict(image)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}              # the convolutions ran in bf16
    high = fp32.predict(image)
    assert low.probs.dtype == np.float32                       # probabilities stay float32
    np.testing.assert_allclose(low.probs, high.probs, atol=0.05)
    assert np.mean(low.mask == high.mask) > 0.95


def test_channels_last_matches_nchw(tmp_path) -> None:
    image = RNG.integers(0, 256, (45, 38, 3), dtype=np.uint8)
    nhwc = small_unet_segmenter(tmp_path, channels_last=True)
    nchw = small_unet_segmenter(tmp_path, channels_last=False)
    conv_weight = nhwc.model.stem[0].weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv_weight.is_contiguous()
    np.testing.assert_allclose(nhwc.predict(image).probs, nchw.predict(image).probs, atol=1e-5)


def test_predict_each_isolates_a_bad_image(tmp_path) -> None:
    from seg_core.errors import InputError

    segmenter = small_unet_segmenter(tmp_path)
    good = RNG.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    bad = np.zeros((24, 24, 5), dtype=np.uint8)  # five channels: prepare_image refuses it
    first, middle, last = segmenter.predict_each([good, bad, good])
    assert isinstance(middle, InputError) and middle.reason == "bad_channels"
    np.testing.assert_array_equal(first.mask, segmenter.predict(good).mask)
    np.testing.assert_array_equal(last.mask, first.mask)
    with pytest.raises(InputError):
        segmenter.predict_batch([good, bad])


def test_encode_prediction_round_trip(tmp_path) -> None:
    pred = small_unet_segmenter(tmp_path).predict(RNG.integers(0, 256, (33, 29, 3), np.uint8))
    encoded = encode_prediction(pred, MaskSpec(3))
    np.testing.assert_array_equal(decode_image(encoded["mask_png"])[..., 0], pred.mask)
    for k, png in enumerate(encoded["class_mask_pngs"]):
        np.testing.assert_array_equal(decode_image(png)[..., 0], (pred.mask == k) * 255)
    assert encoded["class_pixel_counts"] == [int((pred.mask == k).sum()) for k in range(3)]
    assert sum(encoded["class_pixel_counts"]) == 33 * 29
    confidence = decode_image(encoded["confidence_png"])[..., 0]
    np.testing.assert_allclose(confidence / 255, pred.confidence, atol=0.5 / 255 + 1e-6)
    assert encoded["mean_confidence"] == pytest.approx(float(pred.confidence.mean()))
    assert encode_prediction(pred, MaskSpec(3), with_confidence=False)["confidence_png"] is None


def test_multilabel_sigmoid_and_bitfield() -> None:
    # logits (ln 3, -ln 3): p = (3/4, 1/4) -> mask (1, 0), confidence 3/4
    spec = MaskSpec(num_classes=2, multilabel=True)
    segmenter = Segmenter.from_model(constant_model([math.log(3.0), -math.log(3.0)]), spec, PRE)
    pred = segmenter.predict(RNG.integers(0, 256, (35, 40, 3), dtype=np.uint8))
    assert pred.mask.shape == (2, 35, 40)
    assert np.all(pred.mask[0] == 1) and np.all(pred.mask[1] == 0)
    np.testing.assert_allclose(pred.confidence, 0.75, atol=1e-5)
    binary = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    np.testing.assert_allclose(pred.entropy, binary, atol=1e-5)
    encoded = encode_prediction(pred, spec)
    assert np.all(decode_image(encoded["mask_png"]) == 1)  # bit 0 set, bit 1 clear
    assert encoded["class_pixel_counts"] == [35 * 40, 0]


def test_fields_left_out_are_none_and_the_rest_is_unchanged(tmp_path) -> None:
    """What rows need (mask, confidence; probs for multi-label) comes back as the full
    prediction has it; probs and entropy left out are None; a multi-label row refuses to encode
    without its probs, and an unknown field is refused by name."""
    segmenter = small_unet_segmenter(tmp_path)
    images = [RNG.integers(0, 256, shape, np.uint8) for shape in ((33, 29, 3), (40, 52, 3))]
    full = segmenter.predict_batch(images)
    rows = segmenter.predict_batch(images, fields=row_fields(MaskSpec(3)))
    for whole, lean in zip(full, rows):
        np.testing.assert_array_equal(lean.mask, whole.mask)
        np.testing.assert_array_equal(lean.confidence, whole.confidence)
        assert lean.probs is None and lean.entropy is None
        assert encode_prediction(lean, MaskSpec(3)) == encode_prediction(whole, MaskSpec(3))
    assert row_fields(MaskSpec(3)) == {"mask", "confidence"}
    spec = MaskSpec(num_classes=2, multilabel=True)
    assert row_fields(spec) == {"mask", "confidence", "probs"}
    multi = Segmenter.from_model(constant_model([math.log(3.0), -math.log(3.0)]), spec, PRE)
    image = RNG.integers(0, 256, (20, 24, 3), np.uint8)
    kept = multi.predict(image, fields=row_fields(spec))
    assert kept.entropy is None and kept.probs.shape == (2, 20, 24)
    assert encode_prediction(kept, spec) == encode_prediction(multi.predict(image), spec)
    with pytest.raises(ValueError, match="needs its probs"):
        encode_prediction(multi.predict(image, fields=frozenset({"mask"})), spec)
    with pytest.raises(ValueError, match="unknown prediction fields.*'logits'"):
        segmenter.predict_batch(images, fields=frozenset({"mask", "logits"}))
