"""The per-worker Ray Train loop: dataset shard in, ``seg_core.engine`` math, report + checkpoint out.

Everything that is training math (optimizer, schedule, step, loss, metrics, prediction) lives in
seg_core; this module adds only what Ray needs: the dataset shards, ``prepare_model`` (DDP and
device), summing validation counts across workers, ``ray.train.report`` every epoch with a
checkpoint written by rank zero, and restoring that checkpoint after a failure or on resume.

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
"""
from __future__ import annotations

import copy
import dataclasses
import os
import random
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.config import TrainConfig
from seg_core.engine import build_optimizer, build_scheduler, train_step
from seg_core.inference import Segmenter
from seg_core.losses import build_loss
from seg_core.metrics import compute_metrics, confusion_counts, multilabel_counts
from seg_core.model import UNet

STATE_FILE = "state.pt"
COUNT_NAMES = ("tp", "fp", "fn", "tn")


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps per epoch (identical on every worker) and the schedule's length."""

    steps_per_epoch: int
    total_steps: int


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


@dataclass
class Parts:
    """What one worker trains with (``model`` is ``unet`` wrapped by DDP when world > 1)."""

    unet: UNet
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    loss_fn: torch.nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point.  ``loop_config``: ``cfg`` (TrainConfig), ``plan`` (StepPlan),
    ``augment`` (per-batch augmentation), ``progress`` (optional ``ray.util.queue.Queue`` for
    console lines on the driver)."""
    import ray.train

    cfg: TrainConfig = loop_config["cfg"]
    plan: StepPlan = loop_config["plan"]
    say = _Say(loop_config.get("progress"), cfg.run_name)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    seed_everything(cfg.seed * 1000 + rank)
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    parts = build_parts(cfg, plan)
    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = restore(os.path.join(directory, STATE_FILE), parts, rank)
        lr = current_lr(parts.optimizer)
        state.restarts.append({"epoch": state.epoch, "step": state.step, "lr": lr})
        say(rank, f"resumed at epoch {state.epoch} step {state.step} lr {lr:.3g}")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    started = time.monotonic()
    while state.epoch < cfg.epochs and state.stopped is None:
        totals = train_epoch(parts, train_shard, loop_config["augment"], cfg, plan, state,
                             rank, world, started, say)
        state.train_size = agreed_train_size(state.train_size, parts.device, world)
        counts = validate(parts.unet, val_shard, cfg, parts.device, rank, world,
                          train_size=state.train_size)
        record = epoch_record(cfg, state, totals, counts, current_lr(parts.optimizer), world)
        state.epoch += 1
        state.history.append(record)
        _early_stopping(cfg, state, parts.unet, record)
        say(rank, f"epoch {state.epoch}/{cfg.epochs} loss {record['train_loss']:.4f} val mIoU "
                  f"{record['val_miou']:.4f} acc {record['val_pixel_accuracy']:.4f} "
                  f"{record['images_per_s']:.1f} images/s")
        report(state, record, parts, rank, world)
    return {"epoch": state.epoch, "step": state.step, "stopped": state.stopped}


def build_parts(cfg: TrainConfig, plan: StepPlan) -> Parts:
    """Model (channels_last on GPU, DDP via prepare_model), AdamW, schedule and loss."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    channels_last = on_gpu if cfg.channels_last is None else cfg.channels_last
    unet = UNet(cfg.model)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(unet)  # DDP when world > 1, moved to `device`
    optimizer = build_optimizer(unet, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps=plan.total_steps,
                                warmup_steps=min(cfg.optim.warmup_iterations, plan.total_steps),
                                schedule=cfg.optim.schedule, min_lr_ratio=cfg.optim.min_lr_ratio,
                                power=cfg.optim.poly_power)
    loss_fn = build_loss(cfg.loss, num_classes=cfg.model.num_classes,
                         ignore_index=cfg.mask.ignore_index, class_weights=cfg.class_weights,
                         pos_weight=cfg.pos_weight)
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and on_gpu)
    return Parts(unet, model, optimizer, scheduler, loss_fn, device,
                 torch.bfloat16 if amp else None, channels_last)


def train_epoch(parts: Parts, shard: Any, augment: Any, cfg: TrainConfig, plan: StepPlan,
                state: LoopState, rank: int, world: int, started: float,
                say: "_Say") -> torch.Tensor:
    """At most ``plan.steps_per_epoch`` steps; returns summed (loss*images, images, seconds)."""
    totals = torch.zeros(3, dtype=torch.float64)
    steps, t0 = 0, time.perf_counter()
    rng = augment.rng(state.epoch, rank)  # per epoch and worker: reproducible on resume
    shuffle = {"local_shuffle_buffer_size": cfg.data.shuffle_buffer,
               "local_shuffle_seed": (cfg.seed * 10_000 + state.epoch) * 1_000 + rank
               } if cfg.data.shuffle_buffer else {}
    for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                    prefetch_batches=2, **shuffle):
        _maybe_fail(cfg, state.step, rank, world)
        batch = augment(batch, rng)
        images = torch.from_numpy(batch["image"]).to(parts.device, non_blocking=True)
        if parts.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        masks = torch.from_numpy(np.ascontiguousarray(batch["mask"])).to(parts.device)
        state.train_size = _larger(state.train_size, images.shape[-2:])
        loss = train_step(parts.model, {"image": images, "mask": masks}, parts.loss_fn,
                          parts.optimizer, scheduler=parts.scheduler, amp_dtype=parts.amp_dtype,
                          clip_grad=cfg.optim.clip_grad)["loss"]
        state.step, steps = state.step + 1, steps + 1
        totals[0] += loss * len(images)
        totals[1] += len(images)
        if cfg.log_every_steps and state.step % cfg.log_every_steps == 0:
            say(rank, f"epoch {state.epoch + 1}/{cfg.epochs} step {state.step} loss {loss:.4f} "
                      f"lr {current_lr(parts.optimizer):.3g}")
        state.stopped = _should_stop(cfg, state.step, started, world, parts.device)
        if state.stopped or steps == plan.steps_per_epoch:
            break  # an epoch is exactly steps_per_epoch steps on every worker
    totals[2] = time.perf_counter() - t0
    return all_reduce_sum(totals, parts.device, world)


# ----------------------------------------------------------------------------------- validation


def validate(unet: UNet, val_shard: Any, cfg: TrainConfig, device: torch.device, rank: int,
             world: int, train_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Integer counts of full-resolution predictions against the original masks, summed over
    every worker.  Each worker predicts the val rows whose id hashes to its rank (the val set is
    not split, so every row is scored exactly once), through the same Segmenter as batch predict,
    at the geometry the saved artifact will record (``train_size``).
    """
    broadcast_buffers(unet, device, world)
    pre = dataclasses.replace(cfg.preprocessing, train_size=train_size)
    segmenter = Segmenter.from_model(unet, cfg.mask, pre, device=device)
    k = cfg.mask.num_classes
    counts = {name: np.zeros(k, dtype=np.int64) for name in COUNT_NAMES}
    for row in val_shard.iter_rows():
        if zlib.crc32(str(row["id"]).encode()) % world != rank:
            continue
        prediction = segmenter.predict(np.asarray(row["image"]))
        target = np.asarray(row["mask"])
        if cfg.mask.multilabel:
            found = multilabel_counts(prediction.mask, target, ignore_index=cfg.mask.ignore_index)
        else:
            found = confusion_counts(prediction.mask.astype(np.int64), target, k,
                                     cfg.mask.ignore_index)
        for name in COUNT_NAMES:
            counts[name] += found[name]
    stacked = torch.from_numpy(np.stack([counts[n] for n in COUNT_NAMES]))  # 4 x K int64
    summed = all_reduce_sum(stacked, device, world)
    return {name: summed[i].numpy() for i, name in enumerate(COUNT_NAMES)}


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


# ---------------------------------------------------------------------------- checkpointing


def report(state: LoopState, record: dict[str, Any], parts: Parts, rank: int,
           world: int) -> None:
    """``ray.train.report`` on every worker (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    rng = gather_objects(rng_state(), world)
    metrics = {k: v for k, v in record.items() if k != "val"}
    metrics.update({f"val_iou_{name}": value for name, value in
                    zip(record["val"]["class_names"], record["val"]["per_class"]["iou"])})
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            torch.save({"model": _cpu_state(parts.unet),
                        "optimizer": parts.optimizer.state_dict(),
                        "scheduler": parts.scheduler.state_dict(), "rng": rng,
                        "epoch": state.epoch, "step": state.step, "history": state.history,
                        "best": state.best, "restarts": state.restarts,
                        "bad_epochs": state.bad_epochs, "stopped": state.stopped,
                        "train_size": state.train_size},
                       os.path.join(directory, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint_epoch_{state.epoch:04d}")
    # report() returns before the controller has registered the checkpoint; a worker lost in
    # that window would take it along.  Wait for the commit so a restart resumes from here.
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def restore(path: str, parts: Parts, rank: int) -> LoopState:
    """Load ``state.pt`` into the model, optimizer, scheduler and this rank's generators."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    parts.unet.load_state_dict(saved["model"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    rng = saved.get("rng") or []
    if rank < len(rng):  # same world size: exact; otherwise keep the fresh per-rank seed
        set_rng_state(rng[rank])
    return LoopState(epoch=saved["epoch"], step=saved["step"], history=saved["history"],
                     best=saved["best"], restarts=saved["restarts"],
                     bad_epochs=saved["bad_epochs"], stopped=saved["stopped"],
                     train_size=saved.get("train_size"))


def _cpu_state(unet: UNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in unet.state_dict().items()}


def _early_stopping(cfg: TrainConfig, state: LoopState, unet: UNet, record: dict) -> None:
    """Keep the best weights; stop after ``stopping_rounds`` epochs without a gain."""
    best = state.best["val_miou"] if state.best else -1.0
    if record["val_miou"] > best + cfg.stopping_tolerance or state.best is None:
        state.best = {"epoch": record["epoch"], "val_miou": record["val_miou"],
                      "val": copy.deepcopy(record["val"]), "model": _cpu_state(unet)}
        state.bad_epochs = 0
    else:
        state.bad_epochs += 1
    if cfg.stopping_rounds and state.bad_epochs >= cfg.stopping_rounds and state.stopped is None:
        state.stopped = f"early stopping: no val mIoU gain in {cfg.stopping_rounds} epochs"


# ------------------------------------------------------------------------------ small helpers


def _should_stop(cfg: TrainConfig, step: int, started: float, world: int,
                 device: torch.device) -> str | None:
    """Same answer on every worker: step limits are deterministic, the clock is agreed on."""
    if cfg.max_iterations is not None and step >= cfg.max_iterations:
        return f"max_iterations={cfg.max_iterations} reached"
    if cfg.max_runtime_secs is not None:
        over = torch.tensor([float(time.monotonic() - started >= cfg.max_runtime_secs)])
        if all_reduce_sum(over, device, world).item() > 0:
            return f"max_runtime_secs={cfg.max_runtime_secs:g} reached"
    return None


def _maybe_fail(cfg: TrainConfig, step: int, rank: int, world: int) -> None:
    """TESTS ONLY: the last worker's process dies once at ``fail_at_step`` (a lost node)."""
    if cfg.fail_at_step is None or step != cfg.fail_at_step or rank != world - 1:
        return
    from pipelines import storage

    marker = storage.join_uri(cfg.storage.storage_path, cfg.run_name,
                              f"fault_injected_at_step_{cfg.fail_at_step}")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, f"rank {rank} killed at step {step}\n".encode())
    os._exit(1)  # no cleanup, no exception: the actor process is gone


class _Say:
    """Rank 0's progress lines, to the driver's queue (or stdout when there is none)."""

    def __init__(self, progress: Any, run_name: str) -> None:
        self.progress, self.prefix = progress, f"[{run_name}] "

    def __call__(self, rank: int, line: str) -> None:
        if rank != 0:
            return
        if self.progress is None:
            print(self.prefix + line, flush=True)
        else:
            self.progress.put(self.prefix + line, block=False)


def current_lr(optimizer: Any) -> float:
    return float(optimizer.param_groups[0]["lr"])


def all_reduce_sum(tensor: torch.Tensor, device: torch.device, world: int,
                   op: str = "SUM") -> torch.Tensor:
    """Element-wise sum (or ``op="MAX"``) over workers (a no-op on one worker); on the CPU."""
    if world == 1:
        return tensor
    import torch.distributed as dist

    on_device = tensor.to(device)
    dist.all_reduce(on_device, op=getattr(dist.ReduceOp, op))
    return on_device.cpu()


def agreed_train_size(size: tuple[int, int] | None, device: torch.device,
                      world: int) -> tuple[int, int] | None:
    """The largest H and W any worker has fed the network so far (every worker gets it)."""
    local = torch.tensor(size or (0, 0), dtype=torch.int64)
    height, width = (int(v) for v in all_reduce_sum(local, device, world, op="MAX"))
    return (height, width) if height and width else None


def _larger(size: tuple[int, int] | None, seen: Any) -> tuple[int, int]:
    """Per-axis maximum of ``size`` and the ``(H, W)`` just seen."""
    height, width = int(seen[0]), int(seen[1])
    return (height, width) if size is None else (max(size[0], height), max(size[1], width))


def broadcast_buffers(unet: UNet, device: torch.device, world: int) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every worker.

    DDP broadcasts buffers at the start of each forward, so after the last training step every
    rank holds its own running stats.  Validation must score the weights that rank 0 saves.
    """
    if world == 1:
        return
    import torch.distributed as dist

    for buffer in unet.buffers():
        on_device = buffer.data.to(device)
        dist.broadcast(on_device, src=0)
        buffer.data.copy_(on_device)


def gather_objects(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
