"""The per-worker Ray Train loop: dataset shard in, ``seg_core.engine`` math, report + checkpoint out.

Training math (optimizer, schedule, step, loss, metrics, prediction) lives in seg_core; this
module adds only what Ray needs: the dataset shards, ``prepare_model`` (DDP and device),
``ray.train.report`` every epoch with a checkpoint written by rank zero (at most one per
``storage.checkpoint_every_secs``, and always at the last epoch), and restoring it after a
failure or on resume.  The checkpoint format and generator state are in
:mod:`pipelines.train.checkpoint`; every collective is in :mod:`pipelines.train.distributed`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from pipelines.config import TrainConfig
from pipelines.train.budget import BudgetFit
from pipelines.train.checkpoint import (NON_FINITE, STATE_FILE, LoopState, epoch_record,
                                        load_newest_good, restore_state, save_state,
                                        seed_everything)
from pipelines.train.distributed import (RankZeroLog, agreed_min, agreed_stop,
                                         agreed_train_size, all_reduce_sum, any_worker,
                                         broadcast_buffers, gather_objects)
from pipelines.faults import Faults, maybe_fail, maybe_nan, maybe_pause
from pipelines.train.data import (EpochPrefetch, float_if_padded, mask_class_pixels,
                                  network_input, shuffled_batches)
from seg_core.engine import build_optimizer, build_scheduler, fit_batch, rng_state
from seg_core.errors import InputError
from seg_core.inference import Segmenter
from seg_core.losses import build_loss
from seg_core.metrics import COUNT_NAMES, mask_counts
from seg_core.model import UNet


# What train_epoch sums before the class pixel counts (epoch_record reads them by name).
EPOCH_TOTALS = ("loss_x_images", "images", "seconds", "data_wait_s", "augment_s", "step_s")


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps per epoch (identical on every worker) and the schedule's length."""

    steps_per_epoch: int
    total_steps: int


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
    console lines on the driver), ``deadline`` (``time.time()`` at which a run with
    ``max_runtime_secs`` must be done: :mod:`pipelines.train.budget`) and ``val_images``,
    ``faults`` (:class:`pipelines.faults.Faults`, the tests' fault injection; none otherwise)."""
    import ray.train

    cfg: TrainConfig = loop_config["cfg"]
    plan: StepPlan = loop_config["plan"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    say = RankZeroLog(loop_config.get("progress"), cfg.run_name, rank)
    seed_everything(cfg.seed * 1000 + rank)
    parts = build_parts(cfg, plan)
    threads = torch_threads(cfg, parts.device, context.get_local_world_size())
    if threads:
        torch.set_num_threads(threads)
    sharing = ThreadShare.for_streaming(cfg, parts.device, loop_config.get("cached", False))
    say(f"{world} worker(s) on {parts.device.type}, {torch.get_num_threads()} torch thread(s) "
        f"each")
    state = LoopState()
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as directory:   # a torn newest one: the one before
            saved = load_newest_good(directory, cfg.run_uri)
        state = restore_state(saved, parts.unet, parts.optimizer, parts.scheduler, rank)
        lr = current_lr(parts.optimizer)
        state.restarts.append({"epoch": state.epoch, "step": state.step, "lr": lr})
        say(f"resumed at epoch {state.epoch} step {state.step} lr {lr:.3g}")
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard(f"val_{rank}")   # this worker's rows only
    deadline = loop_config.get("deadline")
    budget = None if deadline is None else BudgetFit(
        deadline, plan.total_steps, plan.steps_per_epoch,
        math.ceil(loop_config.get("val_images", 0) / world), cfg.batch_size, cfg.val_fraction)
    clock = ValClock(cfg.val_fraction)
    saved = time.monotonic()   # the last checkpoint (storage.checkpoint_every_secs)
    # the next epoch's blocks decode while this one's last steps train (EpochPrefetch)
    stream = EpochPrefetch(lambda: train_shard.iter_batches(
        batch_size=None, batch_format="numpy", prefetch_batches=2),
        ahead_rows=cfg.data.shuffle_buffer + cfg.batch_size, epochs=cfg.epochs - state.epoch)
    with contextlib.closing(stream):
        while state.epoch < cfg.epochs and state.stopped is None:
            epoch_started, first_step = time.perf_counter(), state.step
            totals, stepped_at = train_epoch(
                parts, stream.epoch(), loop_config["augment"], cfg, plan, state, rank, world,
                deadline, say, loop_config.get("faults") or Faults(), budget)
            clock.trained(float(totals[2]) / world)
            if (state.stopped or "").startswith(NON_FINITE):   # no validation of broken weights,
                say(state.stopped)                              # no retry: the same data would
                report(state, None, parts, rank, world)         # blow up again
                break
            state.train_size = agreed_train_size(state.train_size, parts.device, world)
            last = state.epoch + 1 >= cfg.epochs or state.stopped is not None
            counts, val_s = None, None
            if any_worker(clock.due(last), parts.device, world):   # every worker, or none
                with clock.validating():
                    counts = validate(parts.unet, val_shard, cfg, parts.device, rank, world,
                                      train_size=state.train_size)
                val_s = clock.last_val_s
            record = epoch_record(cfg, state, totals, counts, current_lr(parts.optimizer), world,
                                  stepped_at)
            record["torch_threads"] = torch.get_num_threads()   # this epoch's (rank 0's)
            if sharing is not None and (change := sharing.after_epoch(record["images_per_s"])):
                say(change)
            state.epoch += 1
            state.history.append(record)
            if counts is not None:
                state.track_best(record, parts.unet, cfg.stopping_rounds, cfg.stopping_tolerance)
                val = (f"val mIoU {record['val_miou']:.4f} acc {record['val_pixel_accuracy']:.4f}")
            else:
                val = f"val skipped (val_fraction {cfg.val_fraction:g})"
            shares = record["time_shares"]
            say(f"epoch {state.epoch}/{cfg.epochs} loss {record['train_loss']:.4f} {val} "
                f"{record['images_per_s']:.1f} images/s (data wait {shares['data_wait']:.0%}, "
                f"augment {shares['augment']:.0%}, step {shares['step']:.0%})")
            last = state.epoch >= cfg.epochs or state.stopped is not None
            due = last or time.monotonic() - saved >= cfg.storage.checkpoint_every_secs
            if any_worker(due, parts.device, world):   # every worker, or none
                saved = time.monotonic()
                report(state, record, parts, rank, world)
            else:
                report(state, record, parts, rank, world, checkpoint=False)
            if budget is not None:
                budget.ended_epoch(time.perf_counter() - epoch_started, state.step - first_step,
                                   val_s)
    return {"epoch": state.epoch, "step": state.step, "stopped": state.stopped}


class ValClock:
    """When to validate: ``fraction`` of the training time at most, the first and last epoch
    always (``TrainConfig.val_fraction``; None: every epoch)."""

    def __init__(self, fraction: float | None) -> None:
        self.fraction = fraction
        self.train_s = self.val_s = self.last_val_s = 0.0
        self.validations = 0

    def trained(self, seconds: float) -> None:
        self.train_s += seconds

    def due(self, last: bool) -> bool:
        if self.fraction is None or last or self.validations == 0:
            return True
        return self.val_s + self.last_val_s <= self.fraction * self.train_s

    @contextlib.contextmanager
    def validating(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.last_val_s = time.perf_counter() - started
        self.val_s += self.last_val_s
        self.validations += 1


def torch_threads(cfg: TrainConfig, device: torch.device, local_workers: int) -> int | None:
    """Intra-op threads of this worker: ``scaling.torch_threads`` when set; on the CPU, every
    CPU of the node shared among its workers; otherwise None (Ray's setting: one per reserved
    CPU).

    Ray reserves fewer CPUs for the trainer than the node has, so that Ray Data's tasks get
    cores (one stays free on a small box).  Once the decoded data sits in the object store, an
    epoch only reads it back, and those cores idle: on the 2-core box the trainer ran one
    thread while the other core waited (3.4 against 4.9 images/s with both,
    ``rayseg bench train_throughput``).  Streamed data is decoded while the trainer steps
    (:class:`pipelines.train.data.EpochPrefetch`), and :class:`ThreadShare` tries fewer
    threads in case the decoders need the cores more.
    """
    if cfg.scaling.torch_threads:
        return cfg.scaling.torch_threads
    if device.type != "cpu":
        return None
    return max(1, int(node_cpus() // max(1, local_workers)))


class ThreadShare:
    """Torch threads of a CPU worker whose data streams, set by measured throughput.

    While the data streams, Ray Data's decode tasks and the trainer share the node's cores.  The
    worker starts on every CPU of the node it may use (:func:`torch_threads`).  From the third
    epoch on (the first pays for the first execution, the second is the yardstick), it tries
    one thread fewer for an epoch, and keeps it when that epoch trained at least ``GAIN``
    times as fast (images/s, waits for data included), then tries another; otherwise it goes
    back and stays there.  Every worker sees the same summed times, so all decide alike.

    A rule that started on Ray's reservation (one thread per reserved CPU) and tried more
    trained the first two epochs of every streamed run on one thread of the 2-core box, at
    5.5 images/s against 7.5 on two (48 images of 256-1399 px; the node 58% busy against 99%).
    The share of an epoch spent waiting for data is no guide either: it measures when the
    decode happens, not whether the cores are full.
    """

    GAIN = 1.03

    def __init__(self) -> None:
        self.settled, self.epochs = False, 0
        self.before: float | None = None   # images/s of the epoch before a trial

    @classmethod
    def for_streaming(cls, cfg: TrainConfig, device: torch.device, cached: bool
                      ) -> "ThreadShare | None":
        """None unless this worker streams on the CPU with no thread count set and more than
        one thread to try fewer of."""
        if cached or device.type != "cpu" or cfg.scaling.torch_threads:
            return None
        return cls() if torch.get_num_threads() > 1 else None

    def after_epoch(self, images_per_s: float) -> str | None:
        """Adjust the threads for the next epoch from this one's pace; the sentence saying
        so, if they changed."""
        self.epochs += 1
        if self.settled or self.epochs < 2:
            return None
        threads, before = torch.get_num_threads(), self.before
        self.before = None
        if before is not None and images_per_s < before * self.GAIN:   # the trial lost
            torch.set_num_threads(threads + 1)
            self.settled = True
            return (f"{_threads(threads)} trained at {images_per_s:.1f} images/s against "
                    f"{before:.1f} on {threads + 1}: back to {threads + 1}")
        kept = "" if before is None else \
            f"{_threads(threads)} trained at {images_per_s:.1f} images/s against " \
            f"{before:.1f} on {threads + 1}: keeping {threads}"
        if threads <= 1:
            self.settled = True
            return kept or None
        self.before = images_per_s
        torch.set_num_threads(threads - 1)
        return (f"{kept}; " if kept else "") + \
            f"trying {_threads(threads - 1)} ({images_per_s:.1f} images/s on {threads})"


def _threads(n: int) -> str:
    return f"{n} torch thread{'s' if n != 1 else ''}"


def node_cpus() -> float:
    """Logical CPUs Ray counts on this node (a pod's limit on KubeRay, the cores locally)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    for entry in ray.nodes():
        if entry.get("NodeID") == node:
            return float(entry.get("Resources", {}).get("CPU", 1))
    return float(os.cpu_count() or 1)


def build_parts(cfg: TrainConfig, plan: StepPlan) -> Parts:
    """Model (channels_last unless turned off, DDP via prepare_model), AdamW, schedule, loss."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    channels_last = cfg.uses_channels_last
    unet = UNet(cfg.model)
    if cfg.init_from is not None:   # a resumed run's checkpoint replaces these afterwards
        from pipelines.model import open_artifact
        from seg_core.model import warm_start

        warm_start(unet, open_artifact(cfg.init_from).model.state_dict())
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


def train_epoch(parts: Parts, blocks: Iterable[dict[str, np.ndarray]], augment: Any,
                cfg: TrainConfig, plan: StepPlan, state: LoopState, rank: int, world: int,
                deadline: float | None, say: RankZeroLog, faults: Faults = Faults(),
                budget: BudgetFit | None = None
                ) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """At most ``plan.steps_per_epoch`` steps over ``blocks`` (one epoch's); returns, summed
    over workers, the :data:`EPOCH_TOTALS` (loss*images, images, seconds; seconds waiting for
    data, on the host's augmentation, in the step) then the K class pixel counts and the
    labelled pixel count of the batches trained on; and when this worker's first and last
    optimizer step of the epoch ended (``time.time()``; None without a step)."""
    totals = torch.zeros(len(EPOCH_TOTALS) + cfg.mask.num_classes + 1, dtype=torch.float64)
    steps, t0 = 0, time.perf_counter()
    first_at = last_at = None
    ready = t0   # when the loop last asked for a batch
    rng = augment.rng(state.epoch, rank)  # per epoch and worker: reproducible on resume
    device_rng = augment.device_generator(state.epoch, rank, parts.device)
    order = np.random.default_rng((cfg.seed * 10_000 + state.epoch) * 1_000 + rank)
    for batch in shuffled_batches(blocks, cfg.batch_size, cfg.data.shuffle_buffer, order):
        got = time.perf_counter()
        maybe_fail(faults, cfg.run_uri, state.step, rank, world)
        maybe_pause(faults, cfg.run_uri, state.step, rank, world)
        batch = augment(float_if_padded(batch, augment, cfg.preprocessing), rng)
        seen = mask_class_pixels(batch["mask"], cfg.mask)   # what the network is shown
        augmented = time.perf_counter()
        result = fit_batch(   # compact pixels become the network's input on the device
            parts.model, torch.from_numpy(batch["image"]),
            torch.from_numpy(np.ascontiguousarray(batch["mask"])), parts.loss_fn,
            parts.optimizer, device=parts.device, channels_last=parts.channels_last,
            augment=lambda x, y: augment.on_device(network_input(x, cfg.preprocessing), y,
                                                   device_rng),   # elastic, if set
            scheduler=parts.scheduler, amp_dtype=parts.amp_dtype, clip_grad=cfg.optim.clip_grad)
        state.note_size(result["size"])
        loss, images = result["loss"], len(batch["image"])
        state.step, steps = state.step + 1, steps + 1
        loss = maybe_nan(faults, state.step, loss)
        if any_worker(not math.isfinite(loss), parts.device, world):
            state.stop_non_finite()
            break
        stepped, last_at = time.perf_counter(), time.time()
        first_at = first_at or last_at
        totals[0] += loss * images
        totals[1] += images
        totals[3:6] += torch.tensor([got - ready, augmented - got, stepped - augmented],
                                    dtype=torch.float64)
        totals[len(EPOCH_TOTALS):] += torch.from_numpy(seen.astype(np.float64))
        if cfg.log_every_steps and state.step % cfg.log_every_steps == 0:
            say(f"epoch {state.epoch + 1}/{cfg.epochs} step {state.step} loss {loss:.4f} "
                f"lr {current_lr(parts.optimizer):.3g}")
        if budget is not None:
            budget.step(stepped - ready)
            if budget.due(state.step):
                fit_schedule(budget, state, parts, world, say)
        state.stopped = agreed_stop(cfg, state.step, deadline, world, parts.device,
                                    schedule_end=(state.schedule or {}).get("total_steps"))
        if state.stopped or steps == plan.steps_per_epoch:
            break  # an epoch is exactly steps_per_epoch steps on every worker
        ready = time.perf_counter()
    totals[2] = time.perf_counter() - t0
    return (all_reduce_sum(totals, parts.device, world),
            None if first_at is None else (first_at, last_at))


def fit_schedule(budget: BudgetFit, state: LoopState, parts: Parts, world: int,
                 say: RankZeroLog) -> None:
    """Refit the learning-rate schedule's length to the time left (every worker takes the
    smallest fit: they stop at the same step); the fit and its evidence go in ``state``."""
    fitted = budget.fit(state.step)
    total = agreed_min(fitted["total_steps"], parts.device, world)
    fitted["total_steps"] = total
    budget.plan_midpoint(state.step, total)
    scheduler = parts.scheduler
    scheduler.lr_lambdas = [dataclasses.replace(rule, total_steps=total,
                                                warmup_steps=min(rule.warmup_steps, total))
                            for rule in scheduler.lr_lambdas]
    state.schedule = fitted
    how = "measured" if fitted["measured_epoch_end"] else "estimated"
    say(f"schedule fitted to the time budget: {total} steps (planned {fitted['planned_steps']};"
        f" {fitted['step_s'] * 1000:.0f} ms a step, validation {fitted['validation_s']:.1f} s "
        f"{how}, {fitted['seconds_left']:.0f} s left at step {fitted['fitted_at_step']})")


def validate(unet: UNet, val_shard: Any, cfg: TrainConfig, device: torch.device, rank: int,
             world: int, train_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Integer counts of full-resolution predictions against the original masks, summed over
    every worker.  Each worker reads and predicts only its share of the val rows (``val_<rank>``,
    see :func:`pipelines.train.data.val_shards`: every row once, none dropped), through the
    same Segmenter as batch predict, at the geometry the artifact will record (``train_size``).
    Like a segmenter loaded from the artifact, it predicts with a copy whose BatchNorms are
    folded into the convolutions, in NHWC: the training model keeps its layout, and an epoch's
    validation takes about 0.6x the time of the unfolded NCHW model (8 images of 256-640 px
    through 256^2 windows on 2 cores: 1.2 s against 1.9 s).
    """
    broadcast_buffers(unet, device, world)
    pre = dataclasses.replace(cfg.preprocessing, train_size=train_size)
    segmenter = Segmenter.from_model(unet, cfg.mask, pre, device=device, fold_norms=True,
                                     channels_last=True)
    counts = np.zeros((len(COUNT_NAMES), cfg.mask.num_classes), dtype=np.int64)  # 4 x K
    for row in val_shard.iter_rows():
        prediction = segmenter.predict_each([np.asarray(row["image"])],
                                            fields=frozenset({"mask"}))[0]
        if not isinstance(prediction, InputError):   # over the memory budget: not scored
            found = mask_counts(prediction.mask, np.asarray(row["mask"]), cfg.mask)
            counts += np.stack([found[name] for name in COUNT_NAMES])
    summed = all_reduce_sum(torch.from_numpy(counts), device, world)
    return {name: summed[i].numpy() for i, name in enumerate(COUNT_NAMES)}


def report(state: LoopState, record: dict[str, Any] | None, parts: Parts, rank: int,
           world: int, *, checkpoint: bool = True) -> None:
    """``ray.train.report`` on every worker (a barrier); rank 0 attaches the checkpoint unless
    ``checkpoint`` is False (the metrics alone: ``storage.checkpoint_every_secs`` has not
    passed).  ``record`` is None when the epoch was cut short by a non-finite loss (no
    validation)."""
    import ray.train

    metrics: dict[str, Any] = {"epoch": state.epoch, "step": state.step, "stopped": state.stopped}
    if record is not None:
        metrics = {k: v for k, v in record.items() if k != "val" and v is not None}
        if record["val"] is not None:
            metrics.update({f"val_iou_{name}": value for name, value in
                            zip(record["val"]["class_names"], record["val"]["per_class"]["iou"])})
    if not checkpoint:
        ray.train.report(metrics)
        return
    rng = gather_objects(rng_state(), world)
    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if rank == 0:
            save_state(os.path.join(directory, STATE_FILE), state, parts.unet,
                       parts.optimizer, parts.scheduler, rng)
            saved = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=saved,
                         checkpoint_dir_name=f"checkpoint_epoch_{state.epoch:04d}")
    # report() returns before the controller has registered the checkpoint; a worker lost in
    # that window would take it along.  Wait for the commit so a restart resumes from here.
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def current_lr(optimizer: Any) -> float:
    """The learning rate the next optimizer step will use."""
    return float(optimizer.param_groups[0]["lr"])
