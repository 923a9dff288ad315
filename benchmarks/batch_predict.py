"""``batch_predict``: ``rayseg predict`` images/s against plain loops doing the same work, and memory.

Everything runs in one invocation against moto's S3 server (its own process, 127.0.0.1) holding
PNG images (textured scenes from :mod:`seg_core.sample_data`) as loose objects and packed into
Parquet shards by ``rayseg pack``, and a random-init U-Net (depth 4, base width 16, 3 classes)
whose tile equals the image size.

- **rayseg**: :func:`pipelines.predict.predict.run_predict`, wall time from planning to the last
  committed file: S3 reads, decode, tiled inference, PNG encode, Parquet commits, and the actor
  pool's start-up (process spawn, imports, model load) included.
- **plain** (the ``ratio``: what the pipeline costs): the same PNG bytes, already in memory,
  decoded with PIL, normalised, in batches of ``BATCH`` images as rayseg batches rows, through
  *the same folded network and engine* (:meth:`seg_core.inference.Segmenter.logits`: BatchNorm
  folded, channels_last for torch, the compiled graph for OpenVINO), then argmax to uint8
  masks; torch's default threads.  Each batch goes through the network in the faster of two
  ways: forwards of as many images as rayseg's rule gives for the loop's threads
  (:func:`seg_core.inference.tiles_per_forward`: about 64K pixels per thread, as rayseg's actors
  do for theirs), or one forward of the whole batch.
- **plain from S3** (loose objects only, ``steady_ratio_vs_plain_from_s3``): the plain loop
  with its bytes read from the same moto server as rayseg's (16 threads, every GET issued at
  once, through the same one-GET reader), so that both sides pay the S3 server's CPU on the
  same two cores.  The issue's goal stays against the plain loop from memory.
- **user loop** (``vs_user_loop``: what a user would otherwise run): the same decode, normalise,
  forwards and argmax through the artifact's network as trained (not folded), eager fp32, the
  fastest of NCHW and channels_last with either way of forwarding.

Both plain loops run over (up to 128 of) the same images just before and just after each rayseg
run, and their means are the baselines, so drift on a shared machine hits both sides.
``ratio`` is the whole run's; ``steady_ratio`` leaves out what comes before the first committed
file (planning, the actor pool's start-up, the first file's rows), which the plain loops, timed
after a warm-up, never pay: the pipeline's pace once it runs, beside ``rayseg_first_file_s``.
``cpu_ratio`` compares CPU time per image (the plain process against the whole rayseg process
tree): what the wall ratio becomes on an idle machine where both keep every core busy.
``rayseg_cpu_ms_per_image_by_role`` splits the tree's CPU: the driver, Ray's workers (read,
predict and write), Ray's own processes, and the S3 server, which here is moto in Python on the
same two cores (a real object store's work is not on the machine that reads from it).

Runs, torch engine unless named: 256² and 128², from shards and from loose objects (moto answers
one GET per object from Python), and 256² from shards with ``engine: auto`` (OpenVINO on
CPUs).  Memory: peak summed PSS (driver + local Ray cluster + moto) at 128² from shards over 1k
and 4k images (goal: 4k / 1k <= 1.1).
"""
from __future__ import annotations

import io
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks import Context
from benchmarks.common import TreeSampler, create_bucket, moto_process, result

BATCH = 16
PLAIN_IMAGES = 128
ROWS_PER_FILE = 512


def run(ctx: Context) -> dict[str, Any]:
    big, small = (64, 32) if ctx.quick else (256, 128)
    n_big, n_small, n_large = (24, 24, 48) if ctx.quick else (600, 1000, 4000)
    runs = [(big, "shards", n_big, "torch"), (big, "loose", n_big, "torch"),
            (big, "shards", n_big, "auto"),
            (small, "shards", n_small, "torch"), (small, "shards", n_large, "torch"),
            (small, "loose", n_large, "torch")]
    if ctx.quick:   # every code path once: both layouts, both engines, both memory sizes
        runs = [(big, "shards", n_big, "torch"), (big, "loose", n_big, "auto"),
                (small, "shards", n_small, "torch"), (small, "shards", n_large, "torch")]
    figures: dict[str, Any] = {"batch_size": BATCH, "sizes": [big, small],
                               "model": "UNet depth 4, base width 16, 3 classes, tile = image"}
    with moto_process(), tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        from pipelines.raycluster import ensure_ray

        ensure_ray()
        for size in (big, small):
            wanted = [(layout, n, engine) for s, layout, n, engine in runs if s == size]
            model, inputs, blobs = _setup(Path(tmp) / str(size), size, wanted)
            for layout, n, engine in wanted:
                key = f"{size}px_{layout}_{n}" + ("" if engine == "torch" else f"_{engine}")
                uris = [f"s3://bench{size}/images/{i:05d}.png" for i in range(n)] \
                    if layout == "loose" else None   # as _setup wrote them
                measured = _measure(model, inputs[layout, n], blobs[:n],
                                    Path(tmp) / f"out-{key}", engine, uris)
                figures.update({f"{name}_{key}": value for name, value in measured.items()})
    for size, layout, n, engine in runs:
        key = f"{size}px_{layout}_{n}" + ("" if engine == "torch" else f"_{engine}")
        figures[f"ratio_{key}"] = round(figures[f"rayseg_images_per_s_{key}"]
                                        / figures[f"plain_images_per_s_{key}"], 3)
        figures[f"vs_user_loop_{key}"] = round(figures[f"rayseg_images_per_s_{key}"]
                                               / figures[f"user_loop_images_per_s_{key}"], 3)
    memory = [figures[f"peak_pss_mb_{small}px_shards_{n}"] for n in (n_small, n_large)]
    figures["memory_ratio_large_over_small"] = round(memory[1] / memory[0], 3)
    figures["goals"] = (f"ratio >= 0.9 at {big}px from shards; steady_ratio >= 0.95 at "
                        f"{small}px from shards and >= 0.85 from loose objects, {n_large} images "
                        f"(issue 30); auto engine: vs_user_loop >= 2.0; memory 4k/1k <= 1.1")
    head = f"{big}px_shards_{n_big}"
    return result("batch_predict", figures,
                  (f"rayseg_images_per_s_{head}", "/", f"plain_images_per_s_{head}"),
                  f">=0.9 (rayseg / the same folded network and engine in a plain loop, "
                  f"{big}px from shards)")


def _measure(model: str, source: str, blobs: list[bytes], out: Path,
             engine: str, uris: list[str] | None = None) -> dict[str, Any]:
    """One rayseg run between two timings of each plain loop, with the tree sampler running
    (``uris``: the loose objects, which the plain loop then also reads from S3)."""
    from pipelines.config import PredictConfig
    from pipelines.predict.predict import run_predict

    loops = _PlainLoops(model, blobs[:PLAIN_IMAGES], engine,
                        None if uris is None else uris[:PLAIN_IMAGES])
    before = loops.measure()
    with TreeSampler() as sampler, _FirstFile(str(out)) as first:
        started = time.perf_counter()
        summary = run_predict(PredictConfig(model=model, input=source, out=str(out),
                                            batch_size=BATCH, rows_per_file=ROWS_PER_FILE,
                                            progress=False, engine=engine), log=lambda _: None)
        ended = time.perf_counter()
    after = loops.measure()
    if summary["predicted"] != len(blobs) or summary["duplicates"] or summary["missing"]:
        raise RuntimeError(f"batch_predict: run incomplete: {summary}")
    mean = {k: (before[k] + after[k]) / 2 for k in before}
    rayseg_cpu = sampler.cpu_seconds / len(blobs) * 1000
    steady = None   # rows after the first committed file, over the time after it
    if first.at is not None and first.rows <= len(blobs) // 2:   # else too few rows to time
        steady = round((len(blobs) - first.rows) / (ended - first.at), 2)
    from_s3 = {} if uris is None else {   # the same loop, its bytes read from the same moto
        "plain_from_s3_images_per_s": round(mean["from_s3"], 2),
        "steady_ratio_vs_plain_from_s3": None if steady is None
        else round(steady / mean["from_s3"], 3)}
    return {"rayseg_images_per_s": round(len(blobs) / summary["seconds"], 2),
            "rayseg_seconds": summary["seconds"],
            "rayseg_first_file_s": None if first.at is None else round(first.at - started, 2),
            "rayseg_steady_images_per_s": steady,
            "steady_ratio": None if steady is None else round(steady / mean["plain"], 3),
            "plain_images_per_s": round(mean["plain"], 2),
            "user_loop_images_per_s": round(mean["user"], 2),
            "plain_before_after": f"{before['plain']:.1f}/{after['plain']:.1f}",
            "rayseg_cpu_ms_per_image": round(rayseg_cpu, 1),
            "rayseg_cpu_ms_per_image_by_role": {   # the S3 server's share is moto's, on this box
                role: round(seconds / len(blobs) * 1000, 1)
                for role, seconds in sorted(sampler.cpu_by_role.items())},
            "plain_cpu_ms_per_image": round(mean["plain_cpu_ms"], 1),
            "cpu_ratio": round(mean["plain_cpu_ms"] / rayseg_cpu, 3),
            "engine": loops.engine,
            "peak_pss_mb": sampler.peak_pss_mb,
            "pss_before_run_mb": round(sampler.start_pss / 2**20, 1),
            "processes": sampler.processes, **from_s3}


class _FirstFile:
    """When the run's first prediction file appears under ``out``, and its rows: a thread
    lists the output every 0.2 s until one does.  What comes before it (planning, the actor
    pool's start-up, the first file's rows) is left out of the steady-state rate."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.at: float | None = None
        self.rows = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "_FirstFile":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        import pyarrow.parquet as pq

        from pipelines.predictions import prediction_files

        while not self._stop.wait(0.2):
            files = prediction_files(self.out) if Path(self.out).exists() else []
            if files:
                self.at = time.perf_counter()
                self.rows = sum(pq.read_metadata(f).num_rows for f in files)
                return


class _PlainLoops:
    """The two plain loops over the same image bytes (see the module docstring)."""

    def __init__(self, model_dir: str, blobs: list[bytes], engine: str,
                 uris: list[str] | None = None) -> None:
        import torch

        from pipelines.storage import fetch_artifact
        from seg_core.artifact import load_artifact
        from seg_core.inference import Segmenter

        artifact = load_artifact(fetch_artifact(model_dir))
        self.segmenter = Segmenter(artifact, engine=engine)   # folded; the same engine
        self.engine = self.segmenter.engine
        self.user = load_artifact(fetch_artifact(model_dir)).model.eval()   # as trained
        pre = artifact.preprocessing
        self.mean = np.asarray(pre.mean, np.float32).reshape(1, 1, -1)
        self.std = np.asarray(pre.std, np.float32).reshape(1, 1, -1)
        self.blobs, self.uris = blobs, uris
        self.torch = torch

    def _batches(self, fetched: bool = False) -> Any:
        """Decoded, normalised N x C x H x W float tensors of ``BATCH`` images each; with
        ``fetched``, of the bytes read from ``uris`` (16 threads, every GET issued at once)."""
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        from pipelines.ingest.policy import read_limited

        with ThreadPoolExecutor(16) as pool:
            blobs = iter(pool.map(read_limited, self.uris) if fetched and self.uris
                         else self.blobs)
            while chunk := [b for _, b in zip(range(BATCH), blobs)]:
                pixels = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float32)
                          for b in chunk]
                x = np.stack([(p / 255.0 - self.mean) / self.std for p in pixels])
                yield self.torch.from_numpy(x.transpose(0, 3, 1, 2))

    def _loop(self, forward: Callable[[Any], Any], per_forward: int,
              fetched: bool = False) -> tuple[float, float]:
        """(images per second, CPU ms per image) of decode -> forward -> argmax masks, with
        ``per_forward`` images per forward."""
        torch = self.torch
        with torch.inference_mode():
            forward(next(self._batches())[:per_forward])   # warm-up (kernels, graph)
            started, cpu = time.perf_counter(), time.process_time()
            for x in self._batches(fetched):
                for part in x.split(per_forward):
                    forward(part).argmax(dim=1).to(torch.uint8).numpy()
            cpu = time.process_time() - cpu
        return len(self.blobs) / (time.perf_counter() - started), cpu / len(self.blobs) * 1000

    def _best(self, forward: Callable[[Any], Any], fetched: bool = False
              ) -> tuple[float, float]:
        """The faster of the rule's forwards for this process's threads and whole batches."""
        return max(self._loop(forward, n, fetched) for n in {self.segmenter.batch_size, BATCH})

    def measure(self) -> dict[str, float]:
        torch = self.torch
        plain, plain_cpu = self._best(self.segmenter.logits)
        # loose objects: the plain loop again, reading them from the same S3 server
        from_s3 = self._best(self.segmenter.logits, fetched=True)[0] if self.uris else 0.0
        user = 0.0
        for layout in (torch.contiguous_format, torch.channels_last):   # the faster one counts
            model = self.user.to(memory_format=layout)
            user = max(user, self._best(lambda x: model(x.contiguous(memory_format=layout)))[0])
        return {"plain": plain, "plain_cpu_ms": plain_cpu, "user": user, "from_s3": from_s3}


def _setup(tmp: Path, size: int, wanted: list[tuple[str, int, str]]
           ) -> tuple[str, dict[tuple[str, int], str], list[bytes]]:
    """Artifact, shards and loose objects of ``size``^2 images on S3 for each (layout, n).

    Returns (model URI, {(layout, n): input URI}, image bytes).
    """
    import torch

    from pipelines.pack import pack
    from pipelines.storage import copy_dir_from_local, write_bytes
    from seg_core.artifact import save_artifact
    from seg_core.codecs import encode_png
    from seg_core.config import MaskSpec, ModelConfig, Preprocessing
    from seg_core.model import UNet
    from seg_core.sample_data import render_sample

    bucket = f"bench{size}"
    create_bucket(bucket)
    torch.manual_seed(0)
    unet = UNet(ModelConfig(in_channels=3, num_classes=3, depth=4, base_width=16))
    local = save_artifact(tmp / "model", unet, name="bench", version="1",
                          mask_spec=MaskSpec(num_classes=3),
                          preprocessing=Preprocessing(tile_size=size))
    model = copy_dir_from_local(local, f"s3://{bucket}/model")
    distinct = [encode_png(render_sample(i, size=(size, size), seed=1)[0]) for i in range(32)]
    blobs = [distinct[i % len(distinct)] for i in range(max(n for _, n, _ in wanted))]
    (tmp / "images").mkdir(parents=True)
    for i, blob in enumerate(blobs):
        (tmp / "images" / f"{i:05d}.png").write_bytes(blob)
    inputs: dict[tuple[str, int], str] = {}
    for layout, n, _ in wanted:
        if (layout, n) in inputs:
            continue
        rows = "image,mask\n" + "".join(f"images/{i:05d}.png,\n" for i in range(n))
        if layout == "shards":
            manifest = tmp / f"manifest-{n}.csv"
            manifest.write_text(rows)
            inputs[layout, n] = pack(str(manifest), f"s3://{bucket}/shards-{n}",
                                     shard_mb=16).out_uri
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(8) as pool:   # setup, not measured
                list(pool.map(lambda i: write_bytes(f"s3://{bucket}/images/{i:05d}.png",
                                                    blobs[i]), range(n)))
            inputs[layout, n] = f"s3://{bucket}/manifest-{n}.csv"
            write_bytes(inputs[layout, n], rows.encode())
    return model, inputs, blobs
