"""Every collective the training loop uses, in one place (``torch.distributed``, no Ray),
plus the per-worker plumbing around them: rank-0 console lines.

Each collective takes the ``world`` size and is a no-op on a single worker, so the loop calls
them unconditionally.  Tensors travel on the worker's ``device`` (NCCL needs CUDA tensors) and
come back on the CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from pipelines.config import TrainConfig


def all_reduce_sum(tensor: torch.Tensor, device: torch.device, world: int) -> torch.Tensor:
    """Element-wise sum over workers, on the CPU."""
    return _all_reduce(tensor, device, world, "SUM")


def agreed_train_size(size: tuple[int, int] | None, device: torch.device,
                      world: int) -> tuple[int, int] | None:
    """The largest H and W any worker has fed the network so far (every worker gets it)."""
    local = torch.tensor(size or (0, 0), dtype=torch.int64)
    height, width = (int(v) for v in _all_reduce(local, device, world, "MAX"))
    return (height, width) if height and width else None


def any_worker(flag: bool, device: torch.device, world: int) -> bool:
    """True on every worker when ``flag`` is true on any of them (so they act together)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64), device,
                               world).item() > 0)


def agreed_min(value: int, device: torch.device, world: int) -> int:
    """The smallest ``value`` of any worker (every worker gets it)."""
    return int(_all_reduce(torch.tensor([value], dtype=torch.int64), device, world, "MIN")[0])


def agreed_stop(cfg: "TrainConfig", step: int, deadline: float | None, world: int,
                device: torch.device, *, schedule_end: int | None = None) -> str | None:
    """Why training stops now, the same answer on every worker (None: go on).  Step limits are
    deterministic (``schedule_end``: the step the schedule was fitted to end at, agreed by
    every worker); the wall clock (``deadline``, ``time.time()``) is agreed on."""
    if cfg.max_iterations is not None and step >= cfg.max_iterations:
        return f"max_iterations={cfg.max_iterations} reached"
    if schedule_end is not None and step >= schedule_end:
        return (f"max_runtime_secs={cfg.max_runtime_secs:g}: the schedule fitted to it ended "
                f"at step {schedule_end}")
    if deadline is not None and any_worker(time.time() >= deadline, device, world):
        return f"max_runtime_secs={cfg.max_runtime_secs:g} reached"
    return None


def broadcast_buffers(model: nn.Module, device: torch.device, world: int) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every worker.

    DDP broadcasts buffers at the start of each forward, so after the last training step every
    rank holds its own running stats.  Validation must score the weights that rank 0 saves.
    """
    if world == 1:
        return
    import torch.distributed as dist

    for buffer in model.buffers():
        on_device = buffer.data.to(device)
        dist.broadcast(on_device, src=0)
        buffer.data.copy_(on_device)


def gather_objects(obj: Any, world: int) -> list[Any]:
    """Every worker's ``obj`` (picklable), in rank order, on every worker."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


@dataclass(frozen=True)
class RankZeroLog:
    """Rank 0's progress lines, to the driver's queue (or stdout when there is none)."""

    progress: Any  # a ray.util.queue.Queue, or None
    run_name: str
    rank: int

    def __call__(self, line: str) -> None:
        if self.rank != 0:
            return
        line = f"[{self.run_name}] {line}"
        if self.progress is not None:
            try:
                self.progress.put(line, block=False)
                return
            except Exception:  # noqa: BLE001 - the queue went with its node: a log line
                pass           # must never stop training; it goes to the worker's log instead
        print(line, flush=True)


def _all_reduce(tensor: torch.Tensor, device: torch.device, world: int,
                op: str) -> torch.Tensor:
    """``dist.all_reduce`` with ``ReduceOp.<op>``, on ``device``; the result on the CPU."""
    if world == 1:
        return tensor
    import torch.distributed as dist

    on_device = tensor.to(device)
    dist.all_reduce(on_device, op=getattr(dist.ReduceOp, op))
    return on_device.cpu()
