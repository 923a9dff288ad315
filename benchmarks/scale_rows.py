"""``scale_rows``: validate and predict over a million tiny images; what each row costs at scale.

Builds ``ctx.scale_rows`` (``BenchConfig.scale_rows``, default 1,000,000) 32 x 32 RGB scenes with
3-class masks (:func:`seg_core.sample_data.render_sample`: 256 scenes, each row's image made
distinct by its index written into its first pixels, so no two rows share bytes and Parquet
cannot fold them) as shards of 10,000 rows in ``rayseg pack``'s format, written straight to moto's S3
server (its own process, 127.0.0.1, request log on).  A random-init U-Net (depth 4, base width
16, 3 classes, tile 32) is the model.  Then, each phase on its own:

- **validate** (:func:`pipelines.validate.validate`, report and quarantine written to S3);
- **predict, first half**: ``rayseg predict --split a`` (half the rows are split ``a``);
- **predict, resume**: every row, so the run lists the half already committed, leaves it out and
  predicts the rest (the "skipped" line's time from the run's start is the resume listing, and
  :func:`pipelines.predict.store.done_sources` is also timed alone).

Per phase: rows/s (wall, Ray's start excluded: one local Ray for all phases), the driver's peak
RSS (this process, sampled every 0.2 s; the goal is about the driver, whose memory is what grows
with rows), and S3 requests per 1,000 rows by method, counted in moto's request log.  After
predict: the committed files' count and sizes.

The ``ratio`` is predict's rows/s (both runs, the resume listing included) over a plain loop's:
decode, normalise, the same folded network, argmax (``batch_predict``'s plain loop) over 2,048 of
the same images in memory, measured before and after the predict runs.  Goals (issue 30): driver
peak RSS <= 1 GiB, resume listing <= 30 s, output files 64-512 MiB or one per input shard (in
each of the two runs).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks import Context
from benchmarks.common import _memory_kb, count_requests, create_bucket, moto_process, result

SIDE = 32
SHARD_ROWS = 10_000
DISTINCT = 256
PLAIN_IMAGES = 2048
GOALS = {"driver_peak_rss_mib": 1024, "resume_listing_s": 30, "file_mib": (64, 512)}


def run(ctx: Context) -> dict[str, Any]:
    rows = 4_000 if ctx.quick else ctx.scale_rows
    figures: dict[str, Any] = {"rows": rows, "image": f"{SIDE}x{SIDE} RGB PNG, 3-class mask",
                               "shard_rows": SHARD_ROWS, "model": "UNet depth 4, base 16, tile 32"}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        log = str(Path(tmp) / "moto.log")
        with moto_process(log=log):
            from pipelines.raycluster import ensure_ray

            create_bucket("scale")
            started = time.perf_counter()
            shards, blobs, shard_bytes = _write_shards(rows)
            figures["setup_s"] = round(time.perf_counter() - started, 1)
            figures["input_mib"] = round(shard_bytes / 2**20, 1)
            figures["input_shards"] = -(-rows // SHARD_ROWS)
            model = _model(Path(tmp))
            ensure_ray()
            requests = _Requests(log)
            figures.update(_phase("validate", rows, requests, lambda: _validate(shards)))
            loops = _plain(model, blobs)
            before = loops.measure()
            out = "s3://scale/predictions"
            figures.update(_phase("predict_half", rows // 2, requests,
                                  lambda: _predict(model, shards, out, "a")))
            figures["files_after_half"] = _files(out)["files"]
            from pipelines.predict import store

            rss, listing = _rss(), time.perf_counter()
            done = store.done_sources(out)
            figures["done_sources_s"] = round(time.perf_counter() - listing, 2)
            figures["done_sources_rows"] = done.num_rows
            figures["done_sources_mib"] = round(done.nbytes / 2**20, 1)
            figures["done_sources_rss_growth_mib"] = round((_rss() - rss) / 2**20, 1)
            del done
            resume = _phase("predict_resume", rows - rows // 2, requests,
                            lambda: _predict(model, shards, out, None))
            figures.update(resume)
            after = loops.measure()
            figures.update(_files(out))
    plain = statistics.mean([before["plain"], after["plain"]])
    predict_s = figures["predict_half_s"] + figures["predict_resume_s"]
    figures["predict_rows_per_s"] = round(rows / predict_s, 1)
    figures["plain_rows_per_s"] = round(plain, 1)
    figures["plain_before_after"] = f"{before['plain']:.0f}/{after['plain']:.0f}"
    peak = max(figures[f"{p}_driver_peak_rss_mib"] for p in
               ("validate", "predict_half", "predict_resume"))
    figures["driver_peak_rss_mib"] = peak
    sizes = (figures["file_mib_min"], figures["file_mib_max"])
    figures["goals_met"] = {
        "driver_peak_rss": peak <= GOALS["driver_peak_rss_mib"],
        "resume_listing": figures["predict_resume_listing_s"] <= GOALS["resume_listing_s"],
        "file_sizes": (GOALS["file_mib"][0] <= sizes[0] and sizes[1] <= GOALS["file_mib"][1])
        or (figures["files_after_half"] <= figures["input_shards"]   # one per input shard
            and figures["files"] - figures["files_after_half"] <= figures["input_shards"])}
    return result("scale_rows", figures, ("predict_rows_per_s", "/", "plain_rows_per_s"),
                  "driver peak RSS <= 1 GiB; resume listing <= 30 s; output files 64-512 MiB "
                  "or one per input shard (issue 30); ratio: rayseg predict rows/s / a plain "
                  "loop's (decode, same folded network, argmax), reported")


def _write_shards(rows: int) -> tuple[str, list[bytes], int]:
    """``rows`` pairs as shards of :data:`SHARD_ROWS` under ``s3://scale/shards``; returns the
    URI, the distinct image bytes, and the bytes written."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import storage
    from pipelines.records import SHARD_SCHEMA
    from seg_core.codecs import encode_png
    from seg_core.sample_data import render_sample

    pairs = [render_sample(i, size=(SIDE, SIDE), shape_types=2, seed=7) for i in range(DISTINCT)]
    masks = [encode_png(mask) for _, mask in pairs]

    def image(row: int) -> bytes:
        pixels = pairs[row % DISTINCT][0].copy()
        pixels[0, :4] = np.frombuffer(row.to_bytes(12, "little"), np.uint8).reshape(4, 3)
        return encode_png(pixels)
    uri = "s3://scale/shards"
    fs, path = storage.filesystem_for(uri)
    written = 0
    for first in range(0, rows, SHARD_ROWS):
        index = range(first, min(rows, first + SHARD_ROWS))
        pick = [i % DISTINCT for i in index]
        images = [image(i) for i in index]
        if first == 0:
            blobs = images[:DISTINCT]
        columns = {
            "id": pa.array([f"img-{i:07d}" for i in index]),
            "image_bytes": pa.array(images, pa.binary()),
            "mask_bytes": pa.array([masks[p] for p in pick], pa.binary()),
            "image_format": pa.array(["png"] * len(pick)),
            "height": pa.array([SIDE] * len(pick), pa.int32()),
            "width": pa.array([SIDE] * len(pick), pa.int32()),
            "source_uri": pa.array([f"generated://scale/img-{i:07d}.png" for i in index]),
            "mask_uri": pa.array([f"generated://scale/mask-{i:07d}.png" for i in index]),
            "sha256": pa.array([hashlib.sha256(b).hexdigest() for b in images]),
            "split": pa.array(["a" if i % 2 == 0 else "b" for i in index]),
            "fold": pa.nulls(len(pick), pa.int32()),
        }
        table = pa.Table.from_arrays([columns[f.name] for f in SHARD_SCHEMA], schema=SHARD_SCHEMA)
        name = f"{path}/part-{first // SHARD_ROWS:05d}.parquet"
        # as rayseg pack writes them, but no dictionary for the bytes (real images never repeat)
        pq.write_table(table, name, filesystem=fs, use_dictionary=["image_format", "split"])
        written += fs.get_file_info(name).size
    return uri, blobs, written


def _model(tmp: Path) -> str:
    import torch

    from pipelines.storage import copy_dir_from_local
    from seg_core.artifact import save_artifact
    from seg_core.config import MaskSpec, ModelConfig, Preprocessing
    from seg_core.model import UNet

    torch.manual_seed(0)
    unet = UNet(ModelConfig(in_channels=3, num_classes=3, depth=4, base_width=16))
    local = save_artifact(tmp / "model", unet, name="scale", version="1",
                          mask_spec=MaskSpec(num_classes=3),
                          preprocessing=Preprocessing(tile_size=SIDE))
    return copy_dir_from_local(local, "s3://scale/model")


def _validate(shards: str) -> dict[str, Any]:
    from pipelines.validate import validate
    from seg_core.config import MaskSpec

    report = validate(shards, MaskSpec(num_classes=3), out_uri="s3://scale/validate")
    if report.total != report.ok:
        raise RuntimeError(f"scale_rows: validate rejected {report.quarantined} generated pairs")
    return {"result": f"{report.total} pairs"}


def _predict(model: str, shards: str, out: str, split: str | None) -> dict[str, Any]:
    from pipelines.config import PredictConfig
    from pipelines.predict.predict import run_predict

    lines: list[tuple[float, str]] = []
    started = time.perf_counter()
    summary = run_predict(PredictConfig(model=model, input=shards, out=out, split=split,
                                        progress=False),
                          log=lambda line: lines.append((time.perf_counter() - started, line)))
    if summary["duplicates"] or summary["missing"] or summary["quarantined"]:
        raise RuntimeError(f"scale_rows: predict incomplete: {summary}")
    # the resume listing: from the run's start to the line that reports the skipped ids
    skipped = [t for t, line in lines if "skipped" in line and "already committed" in line]
    return {"result": f"{summary['predicted']} predicted, {summary['skipped']} skipped",
            "listing_s": round(skipped[0], 2) if skipped else None}


class _Requests:
    """S3 requests since the last call, from moto's request log."""

    def __init__(self, log: str) -> None:
        self.log = log
        self.offset = count_requests(log)[1]

    def since_last(self) -> dict[str, int]:
        time.sleep(0.5)   # the server writes its log line after answering
        counts, self.offset = count_requests(self.log, self.offset)
        return counts


def _phase(name: str, rows: int, requests: _Requests,
           body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` with the driver's RSS sampled; its figures and the ones it returns under
    ``<name>_...``."""
    sampler = _RssSampler()
    requests.since_last()
    started = time.perf_counter()
    with sampler:
        extra = body()
    seconds = time.perf_counter() - started
    counts = requests.since_last()
    figures = {f"{name}_s": round(seconds, 1), f"{name}_rows_per_s": round(rows / seconds, 1),
               f"{name}_driver_peak_rss_mib": sampler.peak_mib,
               f"{name}_driver_rss_before_mib": sampler.start_mib,
               f"{name}_s3_requests_per_1000_rows": round(sum(counts.values()) / rows * 1000, 2),
               f"{name}_s3_requests": counts}
    return {**figures, **{f"{name}_{key}": value for key, value in extra.items()}}


class _RssSampler:
    """Peak resident set of this process (the driver) while the block runs."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @property
    def peak_mib(self) -> float:
        return round(self.peak / 2**20, 1)

    @property
    def start_mib(self) -> float:
        return round(self.start / 2**20, 1)

    def __enter__(self) -> "_RssSampler":
        self.start = self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _rss())


def _rss() -> int:
    """This process's resident set in bytes."""
    return _memory_kb(os.getpid())[1] * 1024


def _plain(model: str, blobs: list[bytes]) -> Any:
    """``batch_predict``'s plain loops over :data:`PLAIN_IMAGES` of the images, in memory."""
    from benchmarks.batch_predict import _PlainLoops

    return _PlainLoops(model, [blobs[i % len(blobs)] for i in range(PLAIN_IMAGES)], "torch")


def _files(out: str) -> dict[str, Any]:
    """Count and sizes of the committed prediction files."""
    from pipelines import storage
    from pipelines.predictions import prediction_files

    files = prediction_files(out)
    sizes = sorted(size or 0 for size in storage.file_sizes(files))
    mib = [s / 2**20 for s in sizes]
    return {"files": len(files), "file_mib_min": round(mib[0], 3),
            "file_mib_median": round(statistics.median(mib), 3), "file_mib_max": round(mib[-1], 3),
            "output_mib": round(sum(mib), 1)}
