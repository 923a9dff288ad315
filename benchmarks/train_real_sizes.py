"""``train_real_sizes``: ``rayseg train`` on images as big as real ones, against a plain loop.

The case (issue 30): a user's held-out set of mostly-small and some large RGB images trained
with random 256 crops streamed at 2.5 images/s, because the decoded cache was five times the
data (float32 images, int64 masks) and the object store was capped at 2 GB, so the set did not
"fit" and was decoded again every epoch on one torch thread.  Here 96 + 8 generated scenes
(:func:`seg_core.sample_data.render_sample`) have sides drawn from 256..1399: about 1.3 GB under
the old rule (which streamed them) and about 0.27 GB as cached now (uint8 pixels and masks).

- **rayseg**: :func:`pipelines.train.train.train` with the shipped defaults; only data, model
  size, crop, batch and the wall budget are set (as in ``train_throughput``).  The data line it
  prints (cache decision, sizes, object store) is kept in the figures.
- **plain**: the loop of :func:`benchmarks.train_throughput.plain_run`: decode everything into
  memory once, random 256 crops with flips and rot90, ``train_step`` on every core, validation
  as often as rayseg's shipped ``val_fraction`` lets rayseg validate (once, at the end, until
  2026-12-05); same budget.

``ratio`` = rayseg images/s over plain images/s (whole wall each); the goal is >= 0.9.

- **streamed** (``streamed_*``): the same images, ``data.cache_decoded=false`` (decoded again
  every epoch, as a set too big for the object store is), ``STREAM_BUDGET_S``, not registered.
  How busy the node's CPUs are (``/proc/stat``, every process) over each epoch's steps,
  listed by epoch after the first (which pays for the first execution) with its torch
  threads.  ``streamed_node_busy_while_stepping``: the mean over the settled epochs, the last
  ones on the threads the worker's rule ended on (:class:`pipelines.train.loop.ThreadShare`;
  goal >= 0.9 on 2 cores); ``streamed_node_busy_settled``: from the first settled epoch's
  first step to the last step, epoch boundaries and validation included;
  ``streamed_node_busy_whole``: the same from the second epoch, the rule's trial epoch
  included.  Also the epochs' time shares (data wait, augmentation, step) and the
  torch-thread changes the worker printed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import Context
from benchmarks.common import result
from benchmarks.train_throughput import Case, make_dataset, plain_run, rayseg_config, rayseg_run

CASE = Case(train=96, val=8, sides=(256, 1400), budget_s=240.0)
STREAM_BUDGET_S = 150.0
# --quick: three epochs (under a loaded box's pace a few seconds' budget gave one), 60 s at most
QUICK_STREAM = (60.0, ("epochs=3",))
QUICK = Case(batch=2, crop=32, train=6, val=2, sides=(32, 140), budget_s=6.0, base_width=8,
             depth=2)
OLD_STORE_MB, OLD_SHARE, OLD_BYTES = 2048, 0.5, (3 * 4 + 8, 3 + 8)   # the rule before issue 30


class _Tee(io.TextIOBase):
    """Writes to the terminal and keeps a copy."""

    def __init__(self, out: Any) -> None:
        self.out, self.kept = out, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def data_sizes(manifest: Path) -> dict[str, Any]:
    """Rows, mean pixels and what the old cache rule would have decided, from the files."""
    import csv

    from PIL import Image

    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    pixels = {split: [int(np.prod(Image.open(manifest.parent / r["image"]).size))
                      for r in rows if r["split"] == split] for split in ("train", "val")}
    old = sum(pixels["train"]) * OLD_BYTES[0] + sum(pixels["val"]) * OLD_BYTES[1]
    new = (sum(pixels["train"]) + sum(pixels["val"])) * 4
    return {"train_rows": len(pixels["train"]), "val_rows": len(pixels["val"]),
            "mean_megapixels": round(float(np.mean(pixels["train"])) / 1e6, 3),
            "old_rule_mib": round(old / 2**20), "compact_mib": round(new / 2**20),
            "old_rule_streams": old > OLD_SHARE * OLD_STORE_MB * 2**20}


def streamed_run(manifest: Path, work: Path, case: Case, extra: tuple[str, ...] = ()
                 ) -> dict[str, Any]:
    """``train()`` on ``manifest`` streamed: pace, time shares and the node's CPU use."""
    from benchmarks.common import NodeCpu
    from pipelines.train.train import train

    cfg = rayseg_config(manifest, work, case,
                        ("data.cache_decoded=false", "register=false", *extra))
    with NodeCpu() as node:
        history = train(cfg).history
    steady = [h for h in history[1:] if h["first_step_at"] is not None]   # epoch 1: first run
    per_epoch = [[round(h["images_per_s"], 2), node.busy_share(h["first_step_at"],
                                                               h["last_step_at"]),
                  h["torch_threads"]] for h in steady]
    settled = len(steady)   # the last epochs on the threads the rule ended on
    while settled > 1 and steady[settled - 2]["torch_threads"] == steady[-1]["torch_threads"]:
        settled -= 1
    busy = [b for _, b, _ in per_epoch[settled - 1:] if b is not None]
    whole, after = (node.busy_share(steady[i]["first_step_at"], steady[-1]["last_step_at"])
                    if steady else None for i in (0, settled - 1))
    shares = {name: round(float(np.mean([h["time_shares"][name] for h in steady])), 3)
              for name in ("data_wait", "augment", "step")} if steady else None
    return {"epochs": len(history),
            "node_busy_while_stepping": round(float(np.mean(busy)), 3) if busy else None,
            "node_busy_whole": None if whole is None else round(whole, 3),
            "node_busy_settled": None if after is None else round(after, 3),
            "settled_from_epoch": steady[settled - 1]["epoch"] if steady else None,
            "steady_time_shares": shares,
            "images_per_s_node_busy_and_threads_by_epoch": [
                [ips, None if b is None else round(b, 3), threads]
                for ips, b, threads in per_epoch]}


def run(ctx: Context) -> dict[str, Any]:
    from pipelines.raycluster import ensure_ray

    case = QUICK if ctx.quick else CASE
    stream_budget_s, stream_extra = QUICK_STREAM if ctx.quick else (STREAM_BUDGET_S, ())
    ensure_ray()
    threads = torch.get_num_threads()
    tee = _Tee(sys.stdout)
    try:
        with tempfile.TemporaryDirectory(prefix="rayseg-real-sizes-") as tmp:
            manifest = make_dataset(Path(tmp) / "data", case)
            sizes = data_sizes(manifest)
            cfg = rayseg_config(manifest, Path(tmp), case)
            plain = plain_run(manifest, case, cfg.val_fraction)
            with contextlib.redirect_stdout(tee):
                ours = rayseg_run(cfg, case)
                cached_lines = len(tee.kept.getvalue().splitlines())
                streamed = streamed_run(manifest, Path(tmp) / "streamed", dataclasses.replace(
                    case, budget_s=stream_budget_s), stream_extra)
    finally:
        torch.set_num_threads(threads)
    lines = tee.kept.getvalue().splitlines()
    said = [line.split("data: ", 1)[1] for line in lines[:cached_lines] if "] data: " in line]
    workers = [line.split("] ", 1)[1] for line in lines[:cached_lines]
               if "torch thread(s)" in line]
    streamed["thread_lines"] = [line.split("] ", 1)[1] for line in lines[cached_lines:]
                                if "torch thread" in line]
    figures = {"budget_s": case.budget_s,
               "images": f"{case.train} train + {case.val} val, sides {case.sides[0]}.."
                         f"{case.sides[1] - 1}, PNG",
               "crop": case.crop, "batch": case.batch,
               "model": f"UNet depth {case.depth}, base {case.base_width}, 3 classes",
               **sizes, "rayseg_data_line": said[0] if said else None,
               "rayseg_workers_line": workers[0] if workers else None,
               "rayseg_cached": bool(said) and "caching them" in said[0],
               **{f"rayseg_{k}": v for k, v in ours.items()},
               **{f"plain_{k}": v for k, v in plain.items()},
               "streamed_budget_s": stream_budget_s,
               **{f"streamed_{k}": v for k, v in streamed.items()}}
    return result("train_real_sizes", figures, ("rayseg_images_per_s", "/", "plain_images_per_s"),
                  ">=0.9 (rayseg train / plain loop images/s, whole wall; images up to 1399 px "
                  "that the old cache rule streamed); streamed: the node's CPUs >= 90% busy "
                  "while stepping")
