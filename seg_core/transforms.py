"""Paired (image, mask) transforms on NumPy arrays, shared by ingest, training and serving.

- ``image``: ``H, W, C`` float32, uint8 or uint16.
- ``mask``: ``H, W`` integer class ids, or ``K, H, W`` multi-label channels; ``None`` when there
  is no mask (inference).  Masks only ever move with nearest-neighbour sampling, and new pixels
  are filled with ``ignore_index`` so that losses and metrics skip them.

Every transform is a frozen dataclass called as ``t(image, mask, rng) -> (image, mask)`` with a
``np.random.Generator``; the same generator state gives the same output.  Outputs are
C-contiguous, so ``torch.from_numpy`` works on them directly.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from seg_core.config import as_hw
from seg_core.errors import InputError
from seg_core.pixels import resize_mask_nearest

Mask = np.ndarray | None
Pair = tuple[np.ndarray, Mask]


class PairTransform(Protocol):
    """Anything called as ``(image, mask, rng) -> (image, mask)``."""

    def __call__(self, image: np.ndarray, mask: Mask, rng: np.random.Generator) -> Pair: ...


@dataclass(frozen=True)
class Compose:
    """Apply ``transforms`` in order, sharing one generator."""

    transforms: Sequence[PairTransform]

    def __call__(self, image: np.ndarray, mask: Mask, rng: np.random.Generator) -> Pair:
        for transform in self.transforms:
            image, mask = transform(image, mask, rng)
        return image, mask


@dataclass(frozen=True)
class Resize:
    """Resize to ``size = (H, W)``: image bilinear (antialiased when shrinking), mask nearest."""

    size: tuple[int, int]

    def __call__(self, image: np.ndarray, mask: Mask, rng: np.random.Generator) -> Pair:
        _check_pair(image, mask)
        height, width = _positive_size(self.size, "Resize")
        return _resize_image(image, height, width), resize_mask_nearest(mask, (height, width))


@dataclass(frozen=True)
class Pad:
    """Pad bottom/right to at least ``size`` and then to a multiple of ``multiple``.

    The image is filled with ``fill``; the mask with ``ignore_index``.
    """

    size: tuple[int, int] = (1, 1)
    multiple: int = 1
    fill: float = 0.0
    ignore_index: int = 255

    def __call__(self, image: np.ndarray, mask: Mask, rng: np.random.Generator) -> Pair:
        _check_pair(image, mask)
        min_h, min_w = _positive_size(self.size, "Pad")
        if self.multiple < 1:
            raise ValueError(f"Pad: multiple must be >= 1, got {self.multiple}")
        height, width = image.shape[:2]
        pad_h = -max(height, min_h) % self.multiple + max(min_h - height, 0)
        pad_w = -max(width, min_w) % self.multiple + max(min_w - width, 0)
        if pad_h == 0 and pad_w == 0:
            return image, mask
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=self.fill)
        if mask is not None:
            _check_ignore_fits(mask, self.ignore_index)
            lead = ((0, 0),) * (mask.ndim - 2)
            mask = np.pad(mask, lead + ((0, pad_h), (0, pad_w)), constant_values=self.ignore_index)
        return image, mask


@dataclass(frozen=True)
class RandomCrop:
    """Crop a random ``size = (H, W)`` window; smaller inputs are first padded like :class:`Pad`."""

    size: tuple[int, int]
    fill: float = 0.0
    ignore_index: int = 255

    def __call__(self, image: np.ndarray, mask: Mask, rng: np.random.Generator) -> Pair:
        crop_h, crop_w = _positive_size(self.size, "RandomCrop")
        image, mask = Pad((crop_h, crop_w), 1, self.fill, self.ignore_index)(image, mask, rng)
        height, width = image.shape[:2]
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        rows, cols = slice(top, top + crop_h), slice(left, left + crop_w)
        image = np.ascontiguousarray(image[rows, cols])
        mask = None if mask is None else np.ascontiguousarray(mask[..., rows, cols])
        return image, mask


@dataclass(frozen=True)
class HorizontalFlip:
    """Mirror left-right with probability ``p``."""

    p: float = 0.5

    def __call__(self, image: np.ndarray, mask: Mask, rng: np.random.Generator) -> Pair:
        _check_pair(image, mask)
        if rng.random() >= self.p:
            return image, mask
        return _contiguous(image[:, ::-1], None if mask is None else mask[..., ::-1])


@dataclass(frozen=True)
class VerticalFlip:
    """Mirror top-bottom with probability ``p``."""

    p: float = 0.5

    def __call__(self, image: np.ndarray, mask: Mask, rng: np.random.Generator) -> Pair:
        _check_pair(image, mask)
        if rng.random() >= self.p:
            return image, mask
        return _contiguous(image[::-1], None if mask is None else mask[..., ::-1, :])


@dataclass(frozen=True)
class RandomRot90:
    """With probability ``p``, rotate by a uniformly drawn multiple of 90 degrees (0..270)."""

    p: float = 1.0

    def __call__(self, image: np.ndarray, mask: Mask, rng: np.random.Generator) -> Pair:
        _check_pair(image, mask)
        turns = int(rng.integers(0, 4)) if rng.random() < self.p else 0
        if turns == 0:
            return image, mask
        image = np.rot90(image, turns, axes=(0, 1))  # H,W of H,W,C
        mask = None if mask is None else np.rot90(mask, turns, axes=(-2, -1))  # H,W of [K,]H,W
        return _contiguous(image, mask)


@dataclass(frozen=True)
class Normalize:
    """``(image / dtype_max - mean) / std`` per channel, as float32; the mask is untouched.

    Integer images are first scaled to ``[0, 1]`` by their dtype's maximum (255, 65535);
    float images are taken to be in ``[0, 1]`` already.
    """

    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, image: np.ndarray, mask: Mask, rng: np.random.Generator) -> Pair:
        _check_pair(image, mask)
        channels = image.shape[2]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"Normalize: image has {channels} channels but mean/std have "
                f"{len(self.mean)}/{len(self.std)} entries"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Normalize: std must be > 0, got {tuple(self.std)}")
        scaled = image.astype(np.float32) / np.float32(_dtype_scale(image.dtype))
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return (scaled - mean) / std, mask


# ------------------------------------------------------------------------------ batch preset


@dataclass(frozen=True)
class Augment:
    """The training preset: per-batch paired augmentation of preprocessed C x H x W images.

    ``crop_size`` (a side, or ``(H, W)``) crops a random window (padding with 0 = the normalised
    mean, and the mask with ``ignore_index``); without it, images in a batch must already share
    one size.  ``rot90`` only applies to square inputs, so a batch keeps one shape.  The training
    loop calls it on every batch with ``rng(epoch, rank)``: new per epoch, reproducible on resume.
    """

    crop_size: int | tuple[int, int] | None = None
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    ignore_index: int = 255
    seed: int = 0
    elastic_px: float = 0.0   # > 0: :func:`elastic_deform` with this sigma, on the device

    def rng(self, epoch: int, rank: int = 0) -> np.random.Generator:
        """The generator for one epoch on one worker: new per epoch, fixed by the seed."""
        return np.random.default_rng([self.seed, epoch, rank])

    def device_generator(self, epoch: int, rank: int, device: torch.device) -> torch.Generator:
        """The torch generator :meth:`on_device` draws from, on ``device``: like :meth:`rng`,
        new per epoch and worker and fixed by the seed, so a resumed epoch deforms alike."""
        seed = int(np.random.default_rng([self.seed, epoch, rank, 1]).integers(2**62))
        return torch.Generator(device=device).manual_seed(seed)

    def on_device(self, images: torch.Tensor, masks: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of the preset that runs on the training device, after the batch is copied
        there: the elastic deformation when ``elastic_px`` > 0 (else the batch unchanged)."""
        if self.elastic_px <= 0:
            return images, masks
        images, moved = elastic_deform(images, masks, sigma_px=self.elastic_px,
                                       generator=generator)
        assert moved is not None
        return images, moved

    def __call__(self, batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Augment every row of a numpy batch; returns stacked ``image`` N,C,h,w and ``mask``."""
        steps: list[Any] = []
        if self.crop_size:
            steps.append(RandomCrop(as_hw(self.crop_size, "crop_size"), fill=0.0,
                                      ignore_index=self.ignore_index))
        if self.hflip:
            steps.append(HorizontalFlip(0.5))
        if self.vflip:
            steps.append(VerticalFlip(0.5))
        images, masks = [], []
        for image, mask in zip(batch["image"], batch["mask"]):
            hwc = np.moveaxis(np.asarray(image), 0, -1)  # C,H,W -> H,W,C (transforms' layout)
            hwc, mask = Compose(steps)(hwc, np.asarray(mask), rng)
            if self.rot90 and hwc.shape[0] == hwc.shape[1]:
                hwc, mask = RandomRot90()(hwc, mask, rng)
            images.append(np.ascontiguousarray(np.moveaxis(hwc, -1, 0)))
            masks.append(mask)
        shapes = {i.shape for i in images}
        if len(shapes) > 1:
            raise ValueError(f"Augment: batch images differ in size {sorted(shapes)}; set "
                             f"crop_size or preprocessing.resize so that a batch stacks")
        return {**batch, "image": np.stack(images), "mask": np.stack(masks)}



# ------------------------------------------------------------------ batch transforms on tensors
# These work on whole N-image batches on whatever device the tensors live on (the GPU in
# training), so they cost no host time: the training loop applies them after the copy.


def elastic_deform(images: torch.Tensor, masks: torch.Tensor | None, *, sigma_px: float = 10.0,
                   grid: int = 3, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The U-Net paper's elastic deformation, one random field per image.

    Random displacement vectors on a coarse ``grid x grid`` lattice spanning the image, drawn
    from a Gaussian with ``sigma_px`` pixels standard deviation (the paper: 3 x 3, 10 px), are
    interpolated bicubically to a per-pixel displacement field.  Output pixel ``(y, x)`` takes
    the input at ``(y + dy, x + dx)``: images bilinearly, masks (``N, H, W`` class ids or
    ``N, K, H, W`` labels, ``ignore_index`` included) by nearest neighbour, so mask values stay
    values the mask had.  Positions outside the image are reflected back in.

    ``images`` is ``N, C, H, W`` float; both keep their device and dtype.  ``generator`` must be
    on the tensors' device; the same generator state gives the same deformation.
    """
    if images.ndim != 4 or (masks is not None and (masks.ndim not in (3, 4)
                                                    or masks.shape[0] != images.shape[0]
                                                    or masks.shape[-2:] != images.shape[-2:])):
        raise ValueError(f"elastic_deform: expected images N,C,H,W and masks N,H,W or N,K,H,W "
                         f"of the same N, H, W, got {tuple(images.shape)} and "
                         f"{None if masks is None else tuple(masks.shape)}")
    if grid < 2 or sigma_px < 0:
        raise ValueError(f"elastic_deform: need grid >= 2 and sigma_px >= 0, got {grid}, "
                         f"{sigma_px}")
    n, _, height, width = images.shape
    device = images.device
    lattice = torch.randn((n, 2, grid, grid), generator=generator, device=device) * sigma_px
    field = F.interpolate(lattice, size=(height, width), mode="bicubic", align_corners=True)
    sample = torch.stack((  # where each output pixel reads from, as grid_sample's (x, y) in [-1, 1]
        _unit_coords(width, device).view(1, 1, width) + field[:, 1] * _unit_step(width),
        _unit_coords(height, device).view(1, height, 1) + field[:, 0] * _unit_step(height),
    ), dim=-1)
    warped = F.grid_sample(images.float(), sample, mode="bilinear", padding_mode="reflection",
                           align_corners=True).to(images.dtype)
    if masks is None:
        return warped, None
    planes = masks if masks.ndim == 4 else masks[:, None]
    moved = F.grid_sample(planes.float(), sample, mode="nearest", padding_mode="reflection",
                          align_corners=True).round_().to(masks.dtype)
    return warped, moved if masks.ndim == 4 else moved[:, 0]


def random_dihedral(images: torch.Tensor, masks: torch.Tensor | None, *,
                    generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each image (and its mask) turned by a random multiple of 90 degrees and mirrored or not:
    one of the 8 symmetries of the square, uniformly; non-square batches get flips only, so the
    batch keeps its shape.  Same layouts and devices as :func:`elastic_deform`."""
    n, square = images.shape[0], images.shape[-1] == images.shape[-2]
    draws = torch.randint(0, 8 if square else 4, (n,), generator=generator,
                          device=images.device).tolist()
    out_images, out_masks = [], []
    for i, draw in enumerate(draws):
        image, mask = images[i], None if masks is None else masks[i]
        if square:
            turns, mirror = draw % 4, draw >= 4
            image = torch.rot90(image, turns, dims=(-2, -1))
            mask = None if mask is None else torch.rot90(mask, turns, dims=(-2, -1))
            dims: tuple[int, ...] = (-1,) if mirror else ()
        else:
            dims = ((), (-1,), (-2,), (-2, -1))[draw]
        if dims:
            image = image.flip(dims)
            mask = None if mask is None else mask.flip(dims)
        out_images.append(image)
        out_masks.append(mask)
    stacked = None if masks is None else torch.stack(out_masks)
    return torch.stack(out_images), stacked


def _unit_coords(size: int, device: torch.device) -> torch.Tensor:
    """Pixel centres ``0 .. size - 1`` as ``align_corners=True`` coordinates in ``[-1, 1]``."""
    return torch.linspace(-1.0, 1.0, size, device=device) if size > 1 else \
        torch.zeros(1, device=device)


def _unit_step(size: int) -> float:
    """One pixel in ``align_corners=True`` coordinates."""
    return 2.0 / (size - 1) if size > 1 else 0.0


def _resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``H, W, C`` keeping the dtype (integers are rounded and clipped)."""
    if image.shape[:2] == (height, width):
        return image
    chw = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    shrinking = height < image.shape[0] or width < image.shape[1]
    out = F.interpolate(chw[None], size=(height, width), mode="bilinear",
                        align_corners=False, antialias=shrinking)[0]  # C,h,w
    result = out.permute(1, 2, 0).numpy()
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        result = np.clip(np.rint(result), info.min, info.max)
    return np.ascontiguousarray(result.astype(image.dtype))


def _check_pair(image: np.ndarray, mask: Mask) -> None:
    """``image`` must be ``H, W, C``; ``mask`` ``H, W`` or ``K, H, W`` with the same ``H, W``."""
    if image.ndim != 3:
        raise ValueError(f"transforms: expected image H,W,C, got shape {image.shape}")
    if mask is None:
        return
    if mask.ndim not in (2, 3):
        raise ValueError(f"transforms: expected mask H,W or K,H,W, got shape {mask.shape}")
    if mask.shape[-2:] != image.shape[:2]:
        raise InputError(
            "size_mismatch",
            f"image is {image.shape[0]}x{image.shape[1]} but mask is "
            f"{mask.shape[-2]}x{mask.shape[-1]}",
            hint="pair each image with the mask drawn for it, at the same resolution",
        )


def _check_ignore_fits(mask: np.ndarray, ignore_index: int) -> None:
    if not np.can_cast(np.min_scalar_type(ignore_index), mask.dtype):
        raise ValueError(
            f"transforms: ignore_index={ignore_index} does not fit the mask dtype {mask.dtype}; "
            f"use a wider mask dtype or another ignore_index"
        )


def _positive_size(size: Sequence[int], name: str) -> tuple[int, int]:
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name}: size must be two positive ints (H, W), got {tuple(size)}")
    return int(size[0]), int(size[1])


def _dtype_scale(dtype: np.dtype) -> float:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def _contiguous(image: np.ndarray, mask: Mask) -> Pair:
    return np.ascontiguousarray(image), None if mask is None else np.ascontiguousarray(mask)
