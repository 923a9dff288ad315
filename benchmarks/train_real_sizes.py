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
"""
from __future__ import annotations

import contextlib
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


def run(ctx: Context) -> dict[str, Any]:
    from pipelines.raycluster import ensure_ray

    case = QUICK if ctx.quick else CASE
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
    finally:
        torch.set_num_threads(threads)
    said = [line.split("data: ", 1)[1] for line in tee.kept.getvalue().splitlines()
            if "] data: " in line]
    workers = [line.split("] ", 1)[1] for line in tee.kept.getvalue().splitlines()
               if "torch thread(s)" in line]
    figures = {"budget_s": case.budget_s,
               "images": f"{case.train} train + {case.val} val, sides {case.sides[0]}.."
                         f"{case.sides[1] - 1}, PNG",
               "crop": case.crop, "batch": case.batch,
               "model": f"UNet depth {case.depth}, base {case.base_width}, 3 classes",
               **sizes, "rayseg_data_line": said[0] if said else None,
               "rayseg_workers_line": workers[0] if workers else None,
               "rayseg_cached": bool(said) and "caching them" in said[0],
               **{f"rayseg_{k}": v for k, v in ours.items()},
               **{f"plain_{k}": v for k, v in plain.items()}}
    return result("train_real_sizes", figures, ("rayseg_images_per_s", "/", "plain_images_per_s"),
                  ">=0.9 (rayseg train / plain loop images/s, whole wall; images up to 1399 px "
                  "that the old cache rule streamed)")
