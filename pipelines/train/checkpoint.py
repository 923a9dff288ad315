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

Only plain data is saved (tensors, numbers, strings, lists, dicts; generator states converted),
so checkpoints load with ``torch.load(weights_only=True)``: whoever can write the checkpoint
prefix cannot make the workers run code.  A newest checkpoint that does not load (torn by a
crash mid-upload, or corrupt) is skipped for the one before it, with a warning.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines import storage
from pipelines.config import TrainConfig
from seg_core.engine import set_rng_state
from seg_core.metrics import COUNT_NAMES, compute_metrics

STATE_FILE = "state.pt"
NON_FINITE = "non-finite loss"   # how LoopState.stopped starts when the loss blew up
logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint of a run could be loaded."""


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
    schedule: dict[str, Any] | None = None  # the schedule fitted to max_runtime_secs (budget.py)

    def note_size(self, seen: Any) -> None:
        """Grow ``train_size`` to cover the ``(H, W)`` just fed to the network (this worker)."""
        height, width = int(seen[0]), int(seen[1])
        if self.train_size is not None:
            height, width = max(self.train_size[0], height), max(self.train_size[1], width)
        self.train_size = (height, width)

    def stop_non_finite(self) -> None:
        """The loss blew up: stop now, for good (a resume would replay the same data)."""
        self.stopped = (f"{NON_FINITE} at step {self.step} (epoch {self.epoch + 1}): training "
                        f"stopped without retry; the artifact gets the best epoch so far. Lower "
                        f"optim.lr, set optim.clip_grad, or check the inputs and preprocessing")

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
    torch.save(plain({"model": cpu_state(model), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "rng": rng, **progress}), path)


def load_state(source: str | bytes) -> dict[str, Any]:
    """A ``state.pt`` (a local path, or its bytes) as plain data; tensors and numbers only."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    with torch.serialization.safe_globals(_NUMPY_DATA):   # checkpoints written before 0.2
        return torch.load(handle, map_location="cpu", weights_only=True)


# numpy's array/scalar/dtype reconstructors rebuild data only; rayseg 0.1 checkpoints hold numpy
# generator states and float64 metrics.  Nothing else outside plain data is allowed.
_NUMPY_DATA = [np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray,
               np.dtype] + [type(np.dtype(code)) for code in ("uint32", "float64", "float32",
                                                                "int64", "bool")]


def load_newest_good(directory: str | None, run_uri: str) -> dict[str, Any]:
    """The checkpoint in ``directory`` (Ray's latest), else the newest older one that loads.

    ``run_uri`` holds the run's ``checkpoint_epoch_*/state.pt`` (local or object storage).
    Each one skipped is logged as a warning naming the file; raises :class:`CheckpointError`
    when none loads.
    """
    tried: list[str] = []
    if directory is not None:
        try:
            return load_state(f"{directory}/{STATE_FILE}")
        except Exception as error:   # torn or corrupt: any unpickling/zip/IO failure
            tried.append(f"{directory}/{STATE_FILE}: {type(error).__name__}: {error}")
            logger.warning("checkpoint %s does not load (%s); trying the one before it",
                           directory, error)
    saved = sorted((uri for uri in storage.list_uri(run_uri, suffixes=(f"/{STATE_FILE}",))
                    if "/checkpoint_" in uri), reverse=True)
    for uri in saved:
        if directory is not None and uri.rstrip("/").endswith(
                f"{directory.rstrip('/').rsplit('/', 1)[-1]}/{STATE_FILE}"):
            continue   # the one that just failed
        try:
            state = load_state(storage.read_bytes(uri))
        except Exception as error:
            tried.append(f"{uri}: {type(error).__name__}: {error}")
            logger.warning("checkpoint %s does not load (%s); trying the one before it", uri,
                           error)
            continue
        if tried:
            logger.warning("resuming from %s: newer checkpoint(s) did not load", uri)
        return state
    raise CheckpointError(f"{run_uri}: no checkpoint loads ({'; '.join(tried) or 'none saved'}); "
                          f"delete the run directory (or set storage.run_name to a new name) to "
                          f"start over")


def restore_state(saved: dict[str, Any], model: nn.Module, optimizer: Any, scheduler: Any,
                  rank: int) -> LoopState:
    """Load a checkpoint (:func:`load_newest_good`) into the model, optimizer, scheduler and
    this rank's generators."""
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
                 counts: dict[str, np.ndarray] | None, lr: float, world: int,
                 stepped_at: tuple[float, float] | None = None) -> dict[str, Any]:
    """One history entry; ``totals`` = summed over workers: loss*images, images, seconds,
    seconds waiting for data, augmenting on the host and stepping, then K class pixel counts and
    the labelled pixels (:func:`pipelines.train.loop.train_epoch`).  ``counts`` is None for an
    epoch that was not validated (``val_fraction``): its ``val*`` entries are None.
    ``stepped_at``: when the epoch's first and last optimizer step ended on this worker
    (``time.time()``), so start-up and shutdown can be told from training."""
    loss_sum, images, seconds, wait, host, step = (float(x) for x in totals[:6])
    spent = max(wait + host + step, 1e-9)
    val = None if counts is None else val_metrics(counts, cfg)
    return {
        "epoch": state.epoch + 1, "step": state.step, "lr": lr,
        "train_loss": loss_sum / max(images, 1.0),
        "images_per_s": images / max(seconds / world, 1e-9),  # seconds summed over workers
        "val_miou": val and val["miou"], "val_pixel_accuracy": val and val["pixel_accuracy"],
        "val": val,
        # where the epoch's time went, as shares of the loop's time
        "time_shares": {"data_wait": wait / spent, "augment": host / spent, "step": step / spent},
        "class_pixels_seen": [int(x) for x in totals[6:]],   # K classes, then labelled
        "first_step_at": stepped_at and stepped_at[0], "last_step_at": stepped_at and stepped_at[1],
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


def plain(value: Any) -> Any:
    """``value`` with numpy scalars/arrays turned into Python numbers/lists (and tuples into
    lists), so it unpickles with ``weights_only=True``; tensors are left as they are."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


