"""``batch_predict``: ``rayseg predict`` images/s against a plain ``model(x)`` loop, and peak memory.

Everything runs in this process and one run, against a moto S3 server on 127.0.0.1:<free port>
holding PNG images (textured scenes from :mod:`seg_core.sample_data`) packed into Parquet shards
by ``rayseg pack`` (the layout rayseg recommends for bulk jobs), some also as loose objects, and a
random-init U-Net (depth 4, base width 16, 3 classes) whose tile equals the image size.

- **rayseg**: :func:`pipelines.predict.predict.run_predict`, wall time from planning to the last
  committed file: S3 reads, decode, tiled inference, PNG encode, Parquet commits, and the actor
  pool's start-up (torch import, model load) included.
- **plain**: the same PNG bytes decoded into one float tensor beforehand (not timed), then
  ``model(x)`` in batches of the same size under ``inference_mode`` with torch's default threads,
  in NCHW and in channels_last (the faster counts; the Segmenter runs channels_last),
  timed just before and just after each rayseg run; their mean is the baseline, so drift on a
  shared machine cancels out.  ``cpu_ratio`` compares CPU time per image instead (plain process
  vs the whole rayseg process tree): what the wall ratio becomes on an otherwise idle machine
  where both keep every core busy.
- **memory**: peak of the summed PSS (proportional set size, so the object store's shared pages
  count once) of this process and all its descendants, i.e. the driver plus the local Ray
  cluster it started (GCS, raylet, workers, actors; also the moto thread), sampled every 0.5 s.
  Linux only (reads ``/proc``).

Runs: throughput at ``RATIO_SIZE``^2 over shards with the torch engine (the headline ``ratio``,
goal >= 0.9) and with ``engine: auto`` (OpenVINO on CPUs; goal >= 2.0 against the same eager
loop); the rest with the torch engine: memory
at ``MEMORY_SIZE``^2 over shards of ``n_small`` and ``n_large`` images (goal: peak ratio <= 1.1),
whose throughput is reported too; and loose objects at ``MEMORY_SIZE``^2, ``n_small`` images
(moto answers two requests per object, HEAD + GET, from pure Python on the same cores).
"""
from __future__ import annotations

import io
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

RATIO_SIZE, MEMORY_SIZE = 256, 128
BATCH = 16


def run(quick: bool = False) -> dict[str, Any]:
    n_ratio = 200 if quick else 600
    n_small, n_large = (250, 1000) if quick else (1000, 4000)
    figures: dict[str, Any] = {"batch_size": BATCH, "torch_threads_plain": _torch_threads(),
                               "model": "UNet depth 4, base width 16, 3 classes, tile = image"}
    from pipelines.storage import local_s3_server

    with local_s3_server(credentials="bench"), \
            tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        from pipelines.raycluster import ensure_ray

        ensure_ray()
        runs = [(RATIO_SIZE, "shards", n_ratio, "torch"), (RATIO_SIZE, "shards", n_ratio, "auto"),
                (MEMORY_SIZE, "shards", n_small, "torch"), (MEMORY_SIZE, "shards", n_large, "torch"),
                (MEMORY_SIZE, "loose", n_small, "torch")]
        for size in (RATIO_SIZE, MEMORY_SIZE):
            counts = sorted({n for s, _, n, _ in runs if s == size})
            loose = n_small if size == MEMORY_SIZE else 0
            model, inputs, blobs = _setup(Path(tmp) / str(size), size, counts, loose)
            for layout, n, engine in ((lay, n, e) for s, lay, n, e in runs if s == size):
                result = _measure(model, inputs[layout, n], blobs[:n],
                                  Path(tmp) / f"out-{size}-{layout}-{n}-{engine}", engine)
                tag = "" if engine == "torch" else f"_{engine}"
                figures.update({f"{key}_{size}px_{layout}_{n}{tag}": v
                                for key, v in result.items()})
    head = f"{RATIO_SIZE}px_shards_{n_ratio}"
    ratio = figures[f"rayseg_images_per_s_{head}"] / figures[f"plain_images_per_s_{head}"]
    for name, suffix in (("ratio_128px_shards", f"{MEMORY_SIZE}px_shards_{n_large}"),
                         ("ratio_128px_loose_objects", f"{MEMORY_SIZE}px_loose_{n_small}"),
                         ("ratio_256px_shards_auto_engine", f"{head}_auto")):
        figures[name] = round(figures[f"rayseg_images_per_s_{suffix}"]
                              / figures[f"plain_images_per_s_{suffix}"], 3)
    figures["memory_ratio_large_over_small"] = round(
        figures[f"peak_pss_mb_{MEMORY_SIZE}px_shards_{n_large}"]
        / figures[f"peak_pss_mb_{MEMORY_SIZE}px_shards_{n_small}"], 3)
    growth = [figures[f"peak_pss_mb_{MEMORY_SIZE}px_shards_{n}"]
              - figures[f"pss_before_run_mb_{MEMORY_SIZE}px_shards_{n}"] for n in (n_small, n_large)]
    figures["pipeline_pss_growth_mb_small_large"] = f"{growth[0]:.0f}/{growth[1]:.0f}"
    figures["memory_goal"] = "<= 1.1 (peak summed PSS, driver + local Ray cluster)"
    figures["engine_goals"] = ("torch: >= 0.95 at 128px from shards, >= 0.85 from loose objects; "
                               "auto (OpenVINO on CPUs): >= 2.0 at 256px")
    return {"bench": "batch_predict", "figures": figures, "ratio": round(ratio, 3),
            "goal": f">=0.9 ({RATIO_SIZE}px)"}


def _measure(model: str, manifest: str, blobs: list[bytes], out: Path,
             engine: str) -> dict[str, Any]:
    """One rayseg run with ``engine`` between two plain-loop timings (torch eager, as a user's
    own loop would be), with the memory/CPU sampler running."""
    from pipelines.predict.predict import PredictConfig, run_predict

    plain_before, plain_cpu_before = _plain(model, blobs)
    sampler = _Sampler()
    sampler.start()
    summary = run_predict(PredictConfig(model=model, input=manifest, out=str(out),
                                        batch_size=BATCH, rows_per_file=512, progress=False,
                                        engine=engine),
                          log=lambda _: None)
    sampler.stop()
    plain_after, plain_cpu_after = _plain(model, blobs)
    if summary["predicted"] != len(blobs) or summary["duplicates"] or summary["missing"]:
        raise RuntimeError(f"batch_predict: run incomplete: {summary}")
    plain, plain_cpu = (plain_before + plain_after) / 2, (plain_cpu_before + plain_cpu_after) / 2
    rayseg_cpu = sampler.cpu_seconds / len(blobs) * 1000
    return {"rayseg_images_per_s": round(len(blobs) / summary["seconds"], 2),
            "rayseg_seconds": summary["seconds"],
            "plain_images_per_s": round(plain, 2),
            "plain_before_after": f"{plain_before:.1f}/{plain_after:.1f}",
            "rayseg_cpu_ms_per_image": round(rayseg_cpu, 1),
            "plain_cpu_ms_per_image": round(plain_cpu, 1),
            "cpu_ratio": round(plain_cpu / rayseg_cpu, 3),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "peak_pss_mb": round(sampler.peak_pss / 2**20, 1),
            "pss_before_run_mb": round(sampler.start_pss / 2**20, 1),
            "peak_rss_sum_mb": round(sampler.peak_rss / 2**20, 1),
            "processes": sampler.processes}


def _plain(model_dir: str, blobs: list[bytes], limit: int = 128) -> tuple[float, float]:
    """``model(x)`` over the decoded tensors of (up to ``limit`` of) the same images:
    (images per second, CPU milliseconds per image of this process)."""
    import torch

    from pipelines.storage import fetch_artifact
    from seg_core.artifact import load_artifact
    from seg_core.codecs import decode_image

    model = load_artifact(fetch_artifact(model_dir)).model.eval()
    x = torch.stack([torch.from_numpy(decode_image(b).copy()).permute(2, 0, 1).float() / 255
                     for b in blobs[:limit]])  # N x 3 x H x W, decoded before timing
    best = (0.0, 0.0)
    for layout in (torch.contiguous_format, torch.channels_last):  # the faster one counts
        model, x = model.to(memory_format=layout), x.contiguous(memory_format=layout)
        with torch.inference_mode():
            model(x[:BATCH])  # warm-up
            started, cpu = time.perf_counter(), time.process_time()
            for i in range(0, len(x), BATCH):
                model(x[i:i + BATCH])
            cpu = time.process_time() - cpu
        rate = len(x) / (time.perf_counter() - started)
        if rate > best[0]:
            best = (rate, cpu / len(x) * 1000)
    return best


def _setup(tmp: Path, size: int, counts: list[int], loose: int) -> tuple[str, dict, list[bytes]]:
    """Artifact, shards of each count and ``loose`` loose objects of ``size``^2 images on S3.

    Returns (model URI, {(layout, n): input URI}, image bytes).
    """
    import pyarrow.fs as pafs
    import torch

    from pipelines.pack import pack
    from pipelines.storage import copy_dir_from_local, resolve_options, write_bytes
    from seg_core.artifact import save_artifact
    from seg_core.config import MaskSpec, ModelConfig, Preprocessing
    from seg_core.model import UNet
    from seg_core.sample_data import render_sample

    bucket = f"bench{size}"
    pafs.S3FileSystem(**resolve_options(), allow_bucket_creation=True).create_dir(bucket)
    torch.manual_seed(0)
    unet = UNet(ModelConfig(in_channels=3, num_classes=3, depth=4, base_width=16))
    local = save_artifact(tmp / "model", unet, name="bench", version="1",
                          mask_spec=MaskSpec(num_classes=3),
                          preprocessing=Preprocessing(tile_size=size))
    model = copy_dir_from_local(local, f"s3://{bucket}/model")
    distinct = [_png(render_sample(i, size=(size, size), seed=1)[0]) for i in range(32)]
    blobs = [distinct[i % len(distinct)] for i in range(max(counts))]
    (tmp / "images").mkdir(parents=True)
    for i, blob in enumerate(blobs):
        (tmp / "images" / f"{i:05d}.png").write_bytes(blob)
    inputs = {}
    for n in counts:
        manifest = tmp / f"manifest-{n}.csv"
        manifest.write_text("image,mask\n" + "".join(f"images/{i:05d}.png,\n" for i in range(n)))
        inputs["shards", n] = pack(str(manifest), f"s3://{bucket}/shards-{n}", shard_mb=16).out_uri
    if loose:
        for i, blob in enumerate(blobs[:loose]):
            write_bytes(f"s3://{bucket}/images/{i:05d}.png", blob)
        rows = "".join(f"images/{i:05d}.png,\n" for i in range(loose))
        inputs["loose", loose] = f"s3://{bucket}/manifest-{loose}.csv"
        write_bytes(inputs["loose", loose], ("image,mask\n" + rows).encode())
    return model, inputs, blobs


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class _Sampler:
    """Peak summed PSS/RSS and CPU time of this process and its descendants, polled in a thread.

    CPU time is the growth of each process's utime + stime while sampled; a process that exits
    between two samples loses at most ``interval_s`` of it.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_pss = self.peak_rss = self.start_pss = 0
        self.processes = 0
        self.cpu_seconds = 0.0
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> None:
        self._sample(baseline=True)  # processes alive now count from here, later ones from 0
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(memory=False)
        self.cpu_seconds = sum(self._last[p] - self._first[p] for p in self._last)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self, memory: bool = True, baseline: bool = False) -> None:
        pids = _tree(os.getpid())
        pss = rss = 0
        for pid in pids:
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self._first.setdefault(pid, cpu if baseline else 0.0)
                self._last[pid] = cpu
            if memory:
                pss_kb, rss_kb = _memory_kb(pid)
                pss, rss = pss + pss_kb * 1024, rss + rss_kb * 1024
        if baseline:
            self.start_pss = pss
        if pss > self.peak_pss:
            self.peak_pss, self.processes = pss, len(pids)
        self.peak_rss = max(self.peak_rss, rss)


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process in seconds, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> list[int]:
    """``root`` and every descendant, from the parent ids in ``/proc/<pid>/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process exited while we looked
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB, zeros if it is gone."""
    values = {"Pss:": 0, "Rss:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                key = line.split(maxsplit=1)[0]
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values["Pss:"], values["Rss:"]
