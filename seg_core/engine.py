"""Device-agnostic training math: optimiser, LR schedule, one train step.

Everything here runs on any iterable of batches on whatever device the model's parameters
live on; distributed wrappers (Ray Train, DDP) stay outside and only feed batches in.
Validation counts come from :func:`seg_core.metrics.mask_counts`.  A batch is a dict with
``"image"`` (float ``N, C, H, W``) and ``"mask"`` (integer ``N, H, W`` class ids, or
``N, K, H, W`` in ``{0, 1}`` for multi-label; both may hold ``ignore_index``).
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from seg_core.config import ScheduleKind

Batch = Mapping[str, torch.Tensor]
# (images, masks) -> (images, masks), on the training device
DeviceAugment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_optimizer(
    model: nn.Module, *, lr: float = 1e-3, weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999), fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW; biases and norm parameters (all 1-D tensors) get no weight decay.

    ``fused=True`` runs the update as one fused kernel per parameter group (CUDA and CPU);
    None leaves torch's default (the multi-tensor ``foreach`` path on CUDA).
    """
    if lr <= 0 or weight_decay < 0:
        raise ValueError(
            f"build_optimizer: need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused)


@dataclass(frozen=True)
class WarmupDecay:
    """LR multiplier per optimiser step: linear warmup, then cosine or polynomial decay.

    Warmup rises as ``(step + 1) / warmup_steps`` so the first step is not wasted at 0; decay
    goes from 1 at the end of warmup to ``min_lr_ratio`` at ``total_steps`` and stays there.
    A callable object rather than a closure so that ``LambdaLR.state_dict`` saves its fields.
    """

    total_steps: int
    warmup_steps: int = 0
    schedule: ScheduleKind = "cosine"
    min_lr_ratio: float = 0.0
    power: float = 0.9

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"WarmupDecay: need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got "
                f"total_steps={self.total_steps}, warmup_steps={self.warmup_steps}"
            )
        if self.schedule not in ("cosine", "poly"):
            raise ValueError(
                f"WarmupDecay: schedule must be 'cosine' or 'poly', got {self.schedule!r}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0 or self.power <= 0:
            raise ValueError(
                f"WarmupDecay: need 0 <= min_lr_ratio <= 1 and power > 0, got "
                f"{self.min_lr_ratio}, {self.power}"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            decay = (1.0 - progress) ** self.power
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
    schedule: ScheduleKind = "cosine", min_lr_ratio: float = 0.0, power: float = 0.9,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step :class:`WarmupDecay` schedule; call ``.step()`` after every optimiser step.

    Its ``state_dict`` holds the step count and the schedule's fields, so loading it (together
    with the optimiser's state) resumes at exactly the scheduled learning rate.
    """
    rule = WarmupDecay(total_steps, warmup_steps, schedule, min_lr_ratio, power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=rule)


def train_step(
    model: nn.Module,
    batch: Batch,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp_dtype: torch.dtype | None = None,
    clip_grad: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One optimiser step; returns ``loss``, pre-clip ``grad_norm`` and the ``lr`` it used.

    Puts the model in train mode.  ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the forward pass
    under autocast; the loss is always computed in float32.  ``scaler`` is only needed for
    float16 on CUDA.  ``clip_grad`` clips the global gradient norm.
    """
    device = model_device(model)
    images, target = batch_to_device(batch, device)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(images)  # N,K,H,W
    loss = loss_fn(logits.float(), target)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"train_step: loss is {loss.item()}; lower the LR or check the data"
        )
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # so that clipping sees true gradients
    else:
        loss.backward()
    max_norm = clip_grad if clip_grad is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    lr = float(optimizer.param_groups[0]["lr"])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"loss": float(loss.item()), "grad_norm": float(grad_norm), "lr": lr}


def fit_batch(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    augment: DeviceAugment | None = None,
    channels_last: bool = True,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp_dtype: torch.dtype | None = None,
    clip_grad: float | None = None,
) -> dict[str, Any]:
    """The training loop's body for one batch, shared by ``rayseg train``'s epoch
    (:func:`pipelines.train.loop.train_epoch`) and the GPU check: copy the batch to ``device``,
    run the on-device ``augment`` (e.g. :meth:`seg_core.transforms.Augment.on_device`), lay the
    images out channels_last, and take one :func:`train_step`.  Returns its dict plus ``size``,
    the (H, W) the network saw."""
    images = torch.as_tensor(images).to(device, non_blocking=True)
    masks = torch.as_tensor(masks).to(device, non_blocking=True)
    if augment is not None:
        images, masks = augment(images, masks)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    result: dict[str, Any] = train_step(
        model, {"image": images, "mask": masks}, loss_fn, optimizer, scheduler=scheduler,
        amp_dtype=amp_dtype, clip_grad=clip_grad)
    result["size"] = (int(images.shape[-2]), int(images.shape[-1]))
    return result


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free module)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def batch_to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, mask)`` from a batch dict, moved to ``device``; the image as float."""
    missing = [key for key in ("image", "mask") if key not in batch]
    if missing:
        raise ValueError(
            f"batch: expected keys 'image' and 'mask', missing {missing}; got {sorted(batch)}"
        )
    images = torch.as_tensor(batch["image"]).to(device, non_blocking=True).float()
    target = torch.as_tensor(batch["mask"]).to(device, non_blocking=True)
    if images.ndim != 4 or target.shape[0] != images.shape[0]:
        raise ValueError(
            f"batch: expected image N,C,H,W and mask with the same N, got "
            f"{tuple(images.shape)} and {tuple(target.shape)}"
        )
    return images, target


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and (when a GPU is present) CUDA generator states,
    as plain data that ``torch.load(weights_only=True)`` reads back."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the CUDA states only where a GPU is present).

    Generator states are CPU byte tensors, so a state saved on a GPU machine loads on a CPU
    one (``map_location="cpu"``) and back.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s).cpu() for s in state["cuda"]])
