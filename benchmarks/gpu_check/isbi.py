"""Part 2: ISBI 2012 at full 512x512, trained from scratch on the device, scored by Segmenter."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import synchronize
from benchmarks.gpu_check.data import MASK, MEMBRANE, Pairs
from benchmarks.gpu_check.sizes import PRE, Sizes, say
from benchmarks.gpu_check.throughput import unet
from seg_core.config import Preprocessing
from seg_core.engine import WarmupDecay, build_optimizer, fit_batch
from seg_core.inference import Segmenter, prepare_image
from seg_core.losses import build_loss
from seg_core.metrics import compute_metrics, mask_counts
from seg_core.model import UNet
from seg_core.transforms import elastic_deform, random_dihedral


def to_device_set(pairs: Pairs, pre: Preprocessing, device: torch.device,
                  crop: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised N x 1 x H x W images (through ``prepare_image``, as inference does) and
    N x H x W masks, on the device; ``crop`` takes the top-left corner (CPU rehearsal)."""
    if crop is not None:
        pairs = [(image[:crop[0], :crop[1]], mask[:crop[0], :crop[1]]) for image, mask in pairs]
    images = torch.stack([prepare_image(image, pre) for image, _ in pairs]).to(device)
    masks = torch.stack([torch.from_numpy(mask).long() for _, mask in pairs]).to(device)
    return images, masks


def deform(images: torch.Tensor, masks: torch.Tensor,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The check's on-device augmentation: one of the 8 square symmetries, then elastic."""
    images, masks = random_dihedral(images, masks, generator=generator)
    images, moved = elastic_deform(images, masks, sigma_px=10.0, generator=generator)
    assert moved is not None
    return images, moved


def train_isbi(data: dict[str, Pairs], sizes: Sizes, device: torch.device,
               choice: dict[str, Any]) -> tuple[UNet, dict[str, Any]]:
    """Train from scratch for ``sizes.isbi_budget_s`` of wall time: AdamW (fused if that won),
    bf16, channels_last, LR warmup then cosine over the wall budget, each batch turned /
    mirrored and elastically deformed on the device, each step through the training loop's
    own batch body (:func:`seg_core.engine.fit_batch`).  Eager even where compiling won part 1:
    another batch size would compile again, and the check has 8 minutes in all."""
    pre = Preprocessing(**PRE)
    images, masks = to_device_set(data["train"], pre, device, sizes.isbi_crop)
    torch.manual_seed(0)
    model = unet(sizes.isbi_width, device)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=1e-4,
                                fused=True if choice.get("fused_adamw") else None)
    loss_fn = build_loss("dice_ce", num_classes=2)
    schedule = WarmupDecay(total_steps=10_000, warmup_steps=200, schedule="cosine")
    generator = torch.Generator(device=device).manual_seed(0)
    n, batch = len(images), min(sizes.isbi_batch, len(images))
    steps, losses, started = 0, [], None
    first_s = 0.0
    while True:
        order = torch.randperm(n, generator=generator, device=device)
        for start in range(0, n - batch + 1, batch):
            now = time.perf_counter()
            progress = 0.0 if started is None else (now - started) / sizes.isbi_budget_s
            if sizes.isbi_min_steps:   # the budget and the step floor must both be spent
                progress = min(progress, steps / sizes.isbi_min_steps)
            if progress >= 1.0:
                break
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * schedule(int(progress * schedule.total_steps))
            pick = order[start:start + batch]
            losses.append(fit_batch(   # the training loop's own per-batch body
                model, images[pick], masks[pick], loss_fn, optimizer, device=device,
                augment=lambda x, y: deform(x, y, generator), channels_last=True,
                amp_dtype=torch.bfloat16, clip_grad=1.0)["loss"])
            steps += 1
            if started is None:     # the budget starts after the first (compiling) step
                first_s = time.perf_counter() - now
                started = time.perf_counter()
        else:
            continue
        break
    synchronize(device)
    wall = time.perf_counter() - (started or time.perf_counter())
    say(f"ISBI: {steps} steps of {batch} in {wall:.0f} s (first step {first_s:.1f} s), "
        f"loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}")
    return model, {"steps": steps, "batch": batch, "images_seen": steps * batch,
                   "epochs": round(steps * batch / n, 1), "train_s": round(wall, 1),
                   "first_step_s": round(first_s, 1), "budget_s": sizes.isbi_budget_s,
                   "width": sizes.isbi_width, "final_loss": round(float(np.mean(losses[-20:])), 4),
                   "augmentation": "8 square symmetries + elastic (3x3 grid, 10 px), on device",
                   "train_size": list(images.shape[-2:]), "compiled": False,
                   "fused_adamw": bool(choice.get("fused_adamw"))}


def score(segmenter: Segmenter, pairs: Pairs) -> tuple[dict[str, float], list[np.ndarray]]:
    """Pixel accuracy and membrane Dice of ``segmenter`` on ``pairs``, and the masks."""
    predictions = segmenter.predict_batch([image for image, _ in pairs])
    counts = [mask_counts(p.mask, mask, MASK) for p, (_, mask) in zip(predictions, pairs)]
    summed = {k: sum(c[k] for c in counts) for k in ("tp", "fp", "fn", "tn")}
    metrics = compute_metrics(**summed)
    return ({"pixel_accuracy": round(float(metrics["pixel_accuracy"]), 4),
             "membrane_dice": round(float(metrics["per_class"]["dice"][MEMBRANE]), 4)},
            [p.mask for p in predictions])
