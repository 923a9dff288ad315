"""The plain PyTorch baseline of the quality benchmarks: the loop a competent engineer writes.

Written without rayseg's data pipeline, loop, scheduler or inference: images decoded with PIL
into memory once, normalised as the config says, shuffled per epoch; each sample flipped and
turned as the config's augmentation says; the same ``seg_core.model.UNet`` in channels_last,
AdamW with the same learning rate and weight decay (none on biases and norms, as is usual),
linear warmup then cosine decay per step over the same planned span, the same loss and gradient
clipping, the same torch threads, stopped by the same wall budget.  Prediction is one forward of
each whole image (at the training size when the config resizes, the probabilities resized back
bilinearly), then argmax, or ``sigmoid >= 0.5`` for multi-label.

The network and the loss are rayseg's: those are the work being compared, not the overhead.
"""
from __future__ import annotations

import csv
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from seg_core.losses import build_loss
from seg_core.model import UNet

WARMUP_STEPS = 2   # steps not counted in the median step time


@dataclass(frozen=True)
class Split:
    """One split in memory: images N,C,H,W float32 normalised (at the training size when the
    config resizes), masks N,H,W int64 class ids or N,K,H,W {0, 1}; ``full`` holds the
    original-size masks that scoring uses (the same as ``masks`` without a resize)."""

    images: np.ndarray
    masks: np.ndarray
    full_masks: list[np.ndarray]

    @property
    def full_sizes(self) -> list[tuple[int, int]]:
        return [tuple(m.shape[-2:]) for m in self.full_masks]  # type: ignore[misc]


@dataclass(frozen=True)
class PlainRun:
    """What the plain loop did."""

    model: UNet
    steps: int
    epochs: int       # epochs started
    seconds: float    # training loop wall time
    step_s: float     # median seconds per step after the warmup steps
    final_lr: float


def load_split(manifest: Path, split: str, cfg: Any, *,
               mask_values: tuple[int, ...] | None = None) -> Split:
    """Decode the rows of ``split`` with PIL and normalise with ``cfg.preprocessing``.

    Masks are class ids (``mask_values``, e.g. ISBI's ``(0, 255)``, map value i to class i), or
    K x H x W {0, 1} when the mask column lists one file per class (``a.png;b.png``).  With
    ``preprocessing.resize`` images are resized bilinearly (antialiased) and masks by nearest.
    """
    with manifest.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == split]
    pre = cfg.preprocessing
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(-1, 1, 1)
    mode = "RGB" if pre.channels == 3 else "L"
    images, masks, full = [], [], []
    for row in rows:
        pixels = np.asarray(Image.open(manifest.parent / row["image"]).convert(mode))
        x = torch.from_numpy(pixels.astype(np.float32) / 255.0)
        x = x.permute(2, 0, 1) if x.ndim == 3 else x[None]           # C,H,W
        mask = _read_mask(manifest.parent, row["mask"], mask_values)
        full.append(mask)
        if pre.resize is not None:
            x = F.interpolate(x[None], size=tuple(pre.resize), mode="bilinear",
                              align_corners=False, antialias=True)[0]
            target = torch.from_numpy(mask.astype(np.int64))
            target = target[None, None] if target.ndim == 2 else target[None]
            mask = F.interpolate(target.float(), size=tuple(pre.resize), mode="nearest"
                                 )[0].long().squeeze(0).numpy().astype(mask.dtype)
        images.append(((x - mean) / std).numpy())
        masks.append(mask)
    return Split(np.stack(images).astype(np.float32), np.stack(masks), full)


def _read_mask(root: Path, value: str, mask_values: tuple[int, ...] | None) -> np.ndarray:
    parts = value.split(";")
    if len(parts) > 1:
        return np.stack([np.asarray(Image.open(root / p)) > 0 for p in parts]).astype(np.uint8)
    raw = np.asarray(Image.open(root / value))
    if raw.ndim == 3:
        raw = raw[..., 0]
    if mask_values is None:
        return raw.astype(np.int64)
    ids = np.full(raw.shape, 255, np.int64)
    for class_id, value_ in enumerate(mask_values):
        ids[raw == value_] = class_id
    return ids


def augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, *, hflip: bool,
            vflip: bool, rot90: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each pair flipped left-right and up-down with probability 1/2 and turned by a random
    multiple of 90 degrees (square images only), image and mask together (images N,C,H,W)."""
    out_images, out_masks = [], []
    for image, mask in zip(images, masks):  # image C,H,W; mask H,W (or K,H,W multi-label)
        if hflip and rng.random() < 0.5:
            image, mask = image[..., ::-1], mask[..., ::-1]
        if vflip and rng.random() < 0.5:
            image, mask = image[..., ::-1, :], mask[..., ::-1, :]
        if rot90 and image.shape[-1] == image.shape[-2]:
            turns = int(rng.integers(4))
            image, mask = np.rot90(image, turns, axes=(-2, -1)), np.rot90(mask, turns,
                                                                          axes=(-2, -1))
        out_images.append(image)
        out_masks.append(mask)
    return np.ascontiguousarray(np.stack(out_images)), np.ascontiguousarray(np.stack(out_masks))


def optimizer_for(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on 1-D parameters (biases, norms)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


def warmup_cosine(total: int, warmup: int, floor: float) -> Callable[[int], float]:
    """LR factor of step ``s``: linear warmup over ``warmup`` steps, then cosine down to
    ``floor`` at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def train_plain(cfg: Any, train: Split, *, epochs: int, budget_s: float,
                max_steps: int | None = None, loss_fn: Any = None) -> PlainRun:
    """Train ``cfg.model`` on ``train`` for ``epochs`` epochs (the schedule's span) or until
    ``budget_s`` seconds have passed (checked every step), or ``max_steps`` steps."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = UNet(cfg.model).to(memory_format=torch.channels_last)
    optimizer = optimizer_for(model, cfg.optim.lr, cfg.optim.weight_decay)
    steps_per_epoch = math.ceil(len(train.images) / cfg.batch_size)
    total = max_steps or epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        total, min(cfg.optim.warmup_iterations, total), cfg.optim.min_lr_ratio))
    loss_fn = loss_fn or build_loss(cfg.loss, num_classes=cfg.model.num_classes,
                                    ignore_index=cfg.mask.ignore_index)
    model.train()
    step, epoch, started = 0, 0, time.perf_counter()
    durations: list[float] = []
    while epoch < epochs and step < total and time.perf_counter() - started < budget_s:
        order, epoch = rng.permutation(len(train.images)), epoch + 1
        for first in range(0, len(order), cfg.batch_size):
            step_started = time.perf_counter()
            index = order[first:first + cfg.batch_size]
            images, masks = augment(train.images[index], train.masks[index], rng,
                                    hflip=cfg.augment.hflip, vflip=cfg.augment.vflip,
                                    rot90=cfg.augment.rot90)
            x = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), torch.from_numpy(masks))
            loss.backward()
            if cfg.optim.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            schedule.step()
            step += 1
            durations.append(time.perf_counter() - step_started)
            if step == total or time.perf_counter() - started >= budget_s:
                break
    timed = durations[WARMUP_STEPS:] or durations
    return PlainRun(model, step, epoch, time.perf_counter() - started, statistics.median(timed),
                    optimizer.param_groups[0]["lr"])


@torch.no_grad()
def predict_plain(model: torch.nn.Module, split: Split, *, multilabel: bool = False
                  ) -> list[np.ndarray]:
    """Per image: class ids H,W (or K,H,W {0, 1}) at the original size, from one forward of
    the whole prepared image; probabilities resized back bilinearly when training resized."""
    model.eval()
    out = []
    for image, size in zip(split.images, split.full_sizes):
        logits = model(torch.from_numpy(image[None]).contiguous(
            memory_format=torch.channels_last)).float()
        probs = logits.sigmoid() if multilabel else logits.softmax(dim=1)
        if tuple(probs.shape[-2:]) != size:
            probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        mask = (probs[0] >= 0.5).to(torch.uint8) if multilabel else probs[0].argmax(dim=0)
        out.append(mask.numpy())
    return out


# ----------------------------------------------------------------------------------- scoring


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int,
              ignore_index: int = 255) -> np.ndarray:
    """``K x K`` int64 counts (row = truth, column = prediction) of pixels not ignored in truth."""
    if pred.shape != truth.shape:
        raise ValueError(f"confusion: prediction {pred.shape} and truth {truth.shape} differ")
    keep = truth != ignore_index
    index = truth[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray) -> dict[str, Any]:
    """Per-class IoU and Dice, mIoU (mean over classes present in truth or prediction), pixel
    accuracy.  IoU = tp / (tp + fp + fn); a class with ``tp + fp + fn == 0`` is nan and not in
    the mean."""
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(union > 0, 2 * tp / (union + tp), np.nan)
    present = ~np.isnan(iou)
    return {"iou": iou.tolist(), "dice": dice.tolist(),
            "miou": float(iou[present].mean()) if present.any() else math.nan,
            "pixel_accuracy": float(tp.sum() / max(matrix.sum(), 1))}


def binary_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """3 x K int64 (tp, fp, fn) of K x H x W {0, 1} prediction against truth."""
    if pred.shape != truth.shape:
        raise ValueError(f"binary_counts: prediction {pred.shape} and truth {truth.shape} differ")
    p, t = pred.astype(bool), truth.astype(bool)
    return np.stack([(p & t).sum(axis=(1, 2)), (p & ~t).sum(axis=(1, 2)),
                     (~p & t).sum(axis=(1, 2))]).astype(np.int64)


def iou_scores(counts: np.ndarray) -> dict[str, Any]:
    """Per-class IoU and their mean from summed (tp, fp, fn); 0/0 is nan and left out."""
    tp, fp, fn = counts.astype(np.float64)
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = ~np.isnan(iou)
    return {"iou": iou.tolist(), "miou": float(iou[present].mean()) if present.any() else math.nan}


def plan_epochs(budget_s: float, steps_per_epoch: int, step_s: float, num_val: int = 0,
                val_image_s: float | None = None) -> int:
    """Epochs whose steps, plus rayseg's validation and checkpoint, fill ``budget_s``.

    Validation is priced at ``val_image_s`` per val image (default a quarter step), at rayseg's
    default ``val_fraction`` of 0.1 of the epochs, plus 0.5 s per epoch for the checkpoint.
    Planning errs long on purpose: the budget then stops both loops in the flat tail of the
    cosine, where the learning rate is already under a tenth of its peak, while planning short
    would leave the budget unused.  Both sides train the same planned span.
    """
    per_val = num_val * (step_s / 4 if val_image_s is None else val_image_s)
    per_epoch = steps_per_epoch * step_s + 0.1 * per_val + 0.5
    return max(1, int(budget_s / per_epoch))


def rounded(value: float | None) -> float | None:
    """Four decimals; nan (a class absent from truth and prediction) becomes None for JSON."""
    return None if value is None or math.isnan(value) else round(float(value), 4)


def class_table(names: tuple[str, ...] | list[str], share_pct: Any,
                columns: dict[str, list[float | None]]) -> str:
    """Fixed-width per-class table: class, share of val pixels, then one column per side."""
    def shown(value: float | None) -> str:
        return "   n/a" if value is None else f"{value:6.3f}"

    head = f"{'class':<10} {'val %':>7}" + "".join(f" {name:>12}" for name in columns)
    lines = [head, "-" * len(head)]
    for index, (name, pct) in enumerate(zip(names, share_pct)):
        lines.append(f"{name:<10} {float(pct):7.2f}" + "".join(
            f" {shown(values[index]):>12}" for values in columns.values()))
    return "\n".join(lines)
