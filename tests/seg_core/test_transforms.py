"""Paired transforms: image and mask move together, masks stay nearest + ignore-padded."""
from __future__ import annotations

import numpy as np
import pytest

from seg_core.errors import InputError
from seg_core.transforms import (
    Augment,
    Compose,
    HorizontalFlip,
    Normalize,
    Pad,
    RandomCrop,
    RandomRot90,
    Resize,
    VerticalFlip,
    resize_mask_nearest,
)

IGN = 255


def _coded_pair(height: int = 5, width: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Image whose channel 0 equals the mask, so any misalignment shows up exactly."""
    mask = (np.arange(height * width).reshape(height, width) % 200).astype(np.int64)
    image = np.stack([mask, -mask, np.ones_like(mask)], axis=-1).astype(np.float32)
    return image, mask


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("transform", [
    HorizontalFlip(p=1.0), VerticalFlip(p=1.0), RandomRot90(p=1.0), RandomCrop((3, 4)),
    RandomCrop((8, 9)), Pad((6, 9), multiple=4),
    Compose([RandomRot90(), HorizontalFlip(), RandomCrop((6, 6)), VerticalFlip()]),
])
def test_image_and_mask_move_together(transform: object) -> None:
    image, mask = _coded_pair()
    for seed in range(6):
        out_image, out_mask = transform(image, mask, _rng(seed))  # type: ignore[operator]
        assert out_image.shape[:2] == out_mask.shape
        assert out_image.flags.c_contiguous and out_mask.flags.c_contiguous
        kept = out_mask != IGN
        np.testing.assert_array_equal(out_image[..., 0][kept], out_mask[kept])
        assert (out_image[..., 2][~kept] == 0).all()  # padding: image fill, mask ignore
        assert (out_image[..., 2][kept] == 1).all()


def test_flips_and_rotation_by_hand() -> None:
    image, mask = _coded_pair(2, 3)  # mask [[0, 1, 2], [3, 4, 5]]
    _, flipped = HorizontalFlip(p=1.0)(image, mask, _rng())
    np.testing.assert_array_equal(flipped, [[2, 1, 0], [5, 4, 3]])
    _, flipped = VerticalFlip(p=1.0)(image, mask, _rng())
    np.testing.assert_array_equal(flipped, [[3, 4, 5], [0, 1, 2]])
    out_image, out_mask = HorizontalFlip(p=0.0)(image, mask, _rng())
    np.testing.assert_array_equal(out_mask, mask)
    rng = _rng(3)
    turns = [int(RandomRot90()(image, mask, rng)[1].shape == (3, 2)) for _ in range(20)]
    assert 0 < sum(turns) < 20  # both odd and even quarter turns occur


def test_same_seed_same_output_different_seeds_differ() -> None:
    image, mask = _coded_pair(9, 11)
    pipeline = Compose([RandomRot90(), HorizontalFlip(), VerticalFlip(), RandomCrop((5, 5))])
    first = pipeline(image, mask, _rng(42))
    again = pipeline(image, mask, _rng(42))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    others = [pipeline(image, mask, _rng(seed))[1] for seed in range(8)]
    assert any(not np.array_equal(first[1], other) for other in others)


def test_random_crop_larger_than_image_pads_mask_with_ignore() -> None:
    image, mask = _coded_pair(3, 4)
    out_image, out_mask = RandomCrop((5, 6), ignore_index=IGN)(image, mask, _rng())
    assert out_image.shape == (5, 6, 3) and out_mask.shape == (5, 6)
    assert (out_mask == IGN).sum() == 5 * 6 - 3 * 4
    np.testing.assert_array_equal(out_mask[:3, :4], mask)  # padding goes bottom/right


def test_pad_to_multiple_by_hand() -> None:
    image = np.ones((5, 7, 1), dtype=np.uint8)
    mask = np.zeros((5, 7), dtype=np.uint8)
    out_image, out_mask = Pad(multiple=4, fill=9)(image, mask, _rng())
    assert out_image.shape == (8, 8, 1) and out_image.dtype == np.uint8
    assert (out_image[5:] == 9).all() and (out_image[:5, :7] == 1).all()
    assert (out_mask[:, 7] == IGN).all() and (out_mask[:5, :7] == 0).all()
    with pytest.raises(ValueError, match="ignore_index=-1 does not fit the mask dtype uint8"):
        Pad(multiple=4, ignore_index=-1)(image, mask, _rng())


def test_resize_mask_nearest_by_hand() -> None:
    image = np.zeros((2, 3, 1), dtype=np.float32)
    mask = np.array([[0, 1, 2], [3, 4, 5]])
    _, up = Resize((4, 6))(image, mask, _rng())
    np.testing.assert_array_equal(up, np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1))
    big = np.arange(24).reshape(4, 6)
    _, down = Resize((2, 3))(np.zeros((4, 6, 1), np.float32), big, _rng())
    np.testing.assert_array_equal(down, big[1::2, 1::2])  # centres 1 and 3 on both axes
    assert set(np.unique(down)) <= set(np.unique(big))  # never interpolated values


def test_resize_keeps_image_and_mask_aligned() -> None:
    mask = np.zeros((20, 30), dtype=np.int64)
    mask[4:12, 9:24] = 1
    image = mask[..., None].astype(np.uint8) * 200
    out_image, out_mask = Resize((13, 17))(image, mask, _rng())
    assert out_image.dtype == np.uint8 and out_image.shape == (13, 17, 1)
    image_fg, mask_fg = out_image[..., 0] > 100, out_mask == 1
    iou = (image_fg & mask_fg).sum() / (image_fg | mask_fg).sum()
    assert iou > 0.8
    centre = lambda m: np.argwhere(m).mean(axis=0)  # noqa: E731
    assert np.abs(centre(image_fg) - centre(mask_fg)).max() < 0.75


def test_multilabel_masks_move_per_channel() -> None:
    image, mask = _coded_pair(4, 5)
    stacked = np.stack([mask, mask + 1]).astype(np.int64)  # K,H,W
    for transform in (RandomRot90(), HorizontalFlip(p=1.0), RandomCrop((3, 6)), Resize((8, 10))):
        out_image, out = transform(image, stacked, _rng(5))
        assert out.shape[0] == 2 and out.shape[1:] == out_image.shape[:2]
        kept = out[0] != IGN
        np.testing.assert_array_equal(out[1][kept], out[0][kept] + 1)


def test_normalize_scales_by_dtype() -> None:
    image = np.array([[[255, 0, 51]]], dtype=np.uint8)
    out, mask = Normalize(mean=(0.5, 0.5, 0.2), std=(0.25, 0.5, 0.1))(image, None, _rng())
    assert out.dtype == np.float32 and mask is None
    np.testing.assert_allclose(out[0, 0], [2.0, -1.0, 0.0], atol=1e-6)
    wide = np.array([[[65535]]], dtype=np.uint16)
    assert Normalize((0.0,), (1.0,))(wide, None, _rng())[0].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="image has 3 channels but mean/std have 1/1 entries"):
        Normalize((0.5,), (0.5,))(image, None, _rng())


def test_bad_inputs_raise() -> None:
    image, mask = _coded_pair(4, 5)
    with pytest.raises(InputError, match="image is 4x5 but mask is 4x6") as err:
        HorizontalFlip()(image, np.zeros((4, 6), dtype=np.int64), _rng())
    assert err.value.reason == "size_mismatch"
    with pytest.raises(ValueError, match=r"expected image H,W,C, got shape \(4, 5\)"):
        Resize((2, 2))(image[..., 0], mask, _rng())
    with pytest.raises(ValueError, match=r"size must be two positive ints \(H, W\), got \(0, 3\)"):
        RandomCrop((0, 3))(image, mask, _rng())


def test_resize_mask_nearest_keeps_labels():
    mask = np.array([[0, 1], [2, 3]], np.int64)
    assert resize_mask_nearest(mask, (4, 4)).tolist() == [
        [0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert resize_mask_nearest(np.stack([mask, mask]), (1, 1)).shape == (2, 1, 1)


def test_augment_is_seeded_per_epoch_and_crops_with_ignore_padding():
    batch = {"id": np.array(["a", "b"], dtype=object),
             "image": np.arange(2 * 3 * 6 * 6, dtype=np.float32).reshape(2, 3, 6, 6),
             "mask": np.arange(2 * 6 * 6, dtype=np.int64).reshape(2, 6, 6) % 3}
    aug = Augment(crop_size=4, seed=1)
    first = aug(batch, aug.rng(epoch=0))
    assert first["image"].shape == (2, 3, 4, 4) and first["mask"].shape == (2, 4, 4)
    again = aug(batch, aug.rng(epoch=0))
    assert np.array_equal(first["image"], again["image"])
    others = [aug(batch, aug.rng(epoch=e))["image"] for e in range(1, 6)]
    assert any(not np.array_equal(first["image"], o) for o in others)
    padded = Augment(crop_size=8, hflip=False, vflip=False, rot90=False)(batch, aug.rng(0))
    assert padded["mask"].shape == (2, 8, 8) and (padded["mask"] == 255).sum() == 2 * (64 - 36)
    assert set(np.unique(padded["image"][padded["mask"][:, None].repeat(3, 1) == 255])) == {0.0}


# ------------------------------------------------------------------ batch transforms on tensors


def _ramps(n: int, height: int, width: int):
    """Images whose two channels are each pixel's own y and x: a warped image reads back, at
    every pixel, the source position it sampled (bilinear interpolation of a ramp is exact)."""
    import torch

    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                            torch.arange(width, dtype=torch.float32), indexing="ij")
    return torch.stack([yy, xx])[None].repeat(n, 1, 1, 1)


def test_elastic_deform_moves_pixels_by_the_drawn_lattice_and_keeps_masks_aligned():
    import torch

    from seg_core.transforms import elastic_deform

    n, height, width, sigma = 64, 61, 83, 4.0   # odd sides: the lattice centre is a pixel
    seed = torch.Generator().manual_seed(7)
    lattice = torch.randn((n, 2, 3, 3), generator=torch.Generator().manual_seed(7)) * sigma
    warped, _ = elastic_deform(_ramps(n, height, width), None, sigma_px=sigma, generator=seed)
    displacement = warped - _ramps(n, height, width)          # where each pixel read from
    centre = displacement[:, :, height // 2, width // 2]      # the lattice's middle node
    assert torch.allclose(centre, lattice[:, :, 1, 1], atol=1e-3)
    assert 0.7 * sigma < float(centre.std()) < 1.3 * sigma
    # smooth: neighbouring pixels move alike (a 3x3 lattice over ~70 px, not per-pixel noise)
    assert float((displacement[..., 1:] - displacement[..., :-1]).abs().max()) < sigma

    # image and mask move together: an image that is the mask x 100 still thresholds to it
    masks = torch.zeros(n, height, width, dtype=torch.uint8)
    masks[:, 10:40, 20:70] = 1
    masks[:, 45:, :8] = 255                                   # ignore pixels survive as they are
    images = (masks.float() * 100)[:, None]
    again = torch.Generator().manual_seed(3)
    moved_images, moved_masks = elastic_deform(images, masks, sigma_px=sigma, generator=again)
    assert moved_masks.dtype == torch.uint8 and set(moved_masks.unique().tolist()) <= {0, 1, 255}
    values = torch.tensor([0.0, 100.0, 25500.0])              # the image's three levels
    nearest = values[(moved_images[:, 0, ..., None] - values).abs().argmin(-1)]
    agree = (nearest == moved_masks.float() * 100).float().mean()
    assert agree > 0.99                  # bilinear vs nearest differ on a few boundary pixels
    assert not torch.equal(moved_masks, masks)


def test_elastic_deform_is_seeded_handles_multilabel_and_is_identity_at_zero():
    import torch

    from seg_core.transforms import Augment, elastic_deform

    images = torch.randn(3, 2, 40, 56)
    labels = (torch.rand(3, 4, 40, 56) > 0.5).to(torch.uint8)   # multi-label N,K,H,W
    same = [elastic_deform(images, labels, sigma_px=6.0,
                           generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(same[0][0], same[1][0]) and torch.equal(same[0][1], same[1][1])
    assert same[0][1].shape == labels.shape
    still, kept = elastic_deform(images, labels, sigma_px=0.0)
    assert torch.allclose(still, images, atol=1e-4) and torch.equal(kept, labels)
    with pytest.raises(ValueError, match="same N, H, W"):
        elastic_deform(images, labels[:, :, :20])

    # the training preset: seeded per epoch and worker, off unless elastic_px > 0
    augment = Augment(elastic_px=5.0, seed=3)
    masks = labels[:, 0].long()
    runs = [augment.on_device(images, masks, augment.device_generator(2, 1, images.device))
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    other = augment.on_device(images, masks, augment.device_generator(3, 1, images.device))
    assert not torch.equal(runs[0][0], other[0])
    plain = Augment()
    assert plain.on_device(images, masks, plain.device_generator(0, 0, images.device))[0] is images


def test_random_dihedral_draws_all_eight_symmetries_with_masks_aligned():
    import torch

    from seg_core.transforms import random_dihedral

    base = torch.arange(36, dtype=torch.float32).view(1, 1, 6, 6).repeat(64, 1, 1, 1)
    images, masks = random_dihedral(base, base[:, 0].long(),
                                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(images[:, 0].long(), masks)
    seen = {tuple(image.flatten().tolist()) for image in images[:, 0]}
    assert len(seen) == 8
    wide = torch.arange(24, dtype=torch.float32).view(1, 1, 4, 6).repeat(16, 1, 1, 1)
    flipped, _ = random_dihedral(wide, None, generator=torch.Generator().manual_seed(0))
    assert flipped.shape == wide.shape                       # not square: flips only
