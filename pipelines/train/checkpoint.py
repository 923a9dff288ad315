"""The training checkpoint (``state.pt``) and the random-generator state it carries.

Checkpoint ``state.pt`` (one per epoch, written by rank 0)::

    model, optimizer, scheduler   state_dicts (model unwrapped from DDP, on CPU)
    rng                            per-rank python/numpy/torch(/cuda) generator states
    epoch, step                    epochs completed, optimizer steps taken
    history                        one record per epoch (loss, lr, val metrics, images/s)
    best                           {epoch, val_miou, model} of the best val mIoU so far
    restarts                       {epoch, step, lr} each time the loop resumed from a checkpoint
    bad_epochs, stopped            early-stopping counter; why training stopped (or None)
    train_size                     largest [H, W] batch the network saw (max over workers); the
                                   artifact records it so inference reproduces the geometry

Everything after ``rng`` is a field of :class:`LoopState`; :func:`epoch_record` builds the
``history`` entries (``pipelines.train.train`` reads them, and ``best``, to write the artifact).
"""
from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.config import TrainConfig
from seg_core.metrics import COUNT_NAMES, compute_metrics

STATE_FILE = "state.pt"


@dataclass
class LoopState:
    """Mutable training progress, saved whole in every checkpoint."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    restarts: list[dict[str, Any]] = field(default_factory=list)
    bad_epochs: int = 0
    stopped: str | None = None
    train_size: tuple[int, int] | None = None  # largest H x W fed to the network, all workers

    def note_size(self, seen: Any) -> None:
        """Grow ``train_size`` to cover the ``(H, W)`` just fed to the network (this worker)."""
        height, width = int(seen[0]), int(seen[1])
        if self.train_size is not None:
            height, width = max(self.train_size[0], height), max(self.train_size[1], width)
        self.train_size = (height, width)

    def track_best(self, record: dict[str, Any], model: nn.Module, rounds: int | None,
                   tolerance: float) -> None:
        """Early stopping: keep the best weights; stop after ``rounds`` epochs without a gain."""
        best = self.best["val_miou"] if self.best else -1.0
        if record["val_miou"] > best + tolerance or self.best is None:
            self.best = {"epoch": record["epoch"], "val_miou": record["val_miou"],
                         "val": copy.deepcopy(record["val"]), "model": cpu_state(model)}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        if rounds and self.bad_epochs >= rounds and self.stopped is None:
            self.stopped = f"early stopping: no val mIoU gain in {rounds} epochs"


def save_state(path: str, state: LoopState, model: nn.Module, optimizer: Any, scheduler: Any,
               rng: list[dict[str, Any]]) -> None:
    """Write ``state.pt``; ``model`` is the bare network (not DDP), ``rng`` one entry per rank."""
    progress = {f.name: getattr(state, f.name) for f in dataclasses.fields(LoopState)}
    torch.save({"model": cpu_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng, **progress}, path)


def restore_state(path: str, model: nn.Module, optimizer: Any, scheduler: Any,
                  rank: int) -> LoopState:
    """Load ``state.pt`` into the model, optimizer, scheduler and this rank's generators."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = saved.get("rng") or []
    if rank < len(rng):  # same world size: exact; otherwise keep the fresh per-rank seed
        set_rng_state(rng[rank])
    # train_size may be missing from older checkpoints; the default (None) then applies
    return LoopState(**{f.name: saved[f.name] for f in dataclasses.fields(LoopState)
                        if f.name in saved})


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's ``state_dict`` (safe to keep while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def epoch_record(cfg: TrainConfig, state: LoopState, totals: torch.Tensor,
                 counts: dict[str, np.ndarray], lr: float, world: int) -> dict[str, Any]:
    """One history entry; ``totals`` = summed (loss*images, images, seconds) over workers."""
    loss_sum, images, seconds = (float(x) for x in totals)
    val = val_metrics(counts, cfg)
    return {
        "epoch": state.epoch + 1, "step": state.step, "lr": lr,
        "train_loss": loss_sum / max(images, 1.0),
        "images_per_s": images / max(seconds / world, 1e-9),  # seconds summed over workers
        "val_miou": val["miou"], "val_pixel_accuracy": val["pixel_accuracy"], "val": val,
    }


def val_metrics(counts: dict[str, np.ndarray], cfg: TrainConfig) -> dict[str, Any]:
    """Per-class IoU/Dice from counts summed over all val pixels, their mean, pixel accuracy."""
    per_class = compute_metrics(*(counts[n] for n in COUNT_NAMES), reduction="macro",
                                multilabel=cfg.mask.multilabel)
    pooled = compute_metrics(*(counts[n] for n in COUNT_NAMES), reduction="micro",
                             multilabel=cfg.mask.multilabel)
    return {
        "miou": per_class["iou"], "mdice": per_class["dice"],
        "pixel_accuracy": per_class["pixel_accuracy"],
        "iou_pooled": pooled["iou"], "dice_pooled": pooled["dice"],
        "class_names": list(cfg.mask.names),
        "per_class": per_class["per_class"],
        "counts": {n: counts[n].tolist() for n in COUNT_NAMES},
        "reduction": "per-class counts summed over every val pixel of every image (micro over "
                     "images); miou/mdice = mean over classes; *_pooled = counts pooled over "
                     "classes too",
        "empty_policy": per_class["empty_policy"],
    }


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and cuda) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
