"""``batch_predict``: ``rayseg predict`` images/s against a plain ``model(x)`` loop, and peak memory.

Everything runs in this process and one run:

- a moto S3 server on 127.0.0.1:<free port> holding N PNG images (``SIZE`` x ``SIZE``, textured
  scenes from :mod:`seg_core.sample_data`) packed into Parquet shards by ``rayseg pack`` (the
  layout rayseg recommends for bulk jobs), the first ``n_small`` also as loose objects, and a
  random-init U-Net artifact;
- **rayseg**: :func:`pipelines.predict.run_predict`, wall time from planning to the last
  committed file (S3 reads, decode, tiled inference, PNG encode, Parquet commits, the actor
  pool's start-up included), over the shards at ``n_small`` and ``n_large`` images and over the
  loose objects at ``n_small``;
- **plain**: the same PNG bytes decoded into one float tensor beforehand (not timed), then
  ``model(x)`` in batches of the same size under ``inference_mode`` with torch's default threads,
  timed just before and just after each rayseg run (their mean is the baseline, so drift on a
  shared machine cancels out);
- **memory**: peak of the summed PSS (proportional set size, so the object store's shared pages
  count once) of this process and all its descendants, i.e. the driver plus the local Ray
  cluster it started (GCS, raylet, workers, actors), sampled every 0.2 s during each run.  Linux
  only (reads ``/proc``).  The moto server is a thread of this process, so it is included.

``ratio`` is rayseg / plain images per second over the shards at ``n_large``; goal >= 0.9.  The
memory goal (peak at ``n_large`` / peak at ``n_small`` <= 1.1) is reported in ``figures``.
Loose objects on moto cost two requests each (HEAD + GET) to a pure-Python server that shares the
same cores, which is why they are reported separately.
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

SIZE = 128
BATCH = 8


def run(quick: bool = False) -> dict[str, Any]:
    n_small, n_large = (250, 1000) if quick else (1000, 4000)
    with _moto(), tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        from pipelines.raycluster import ensure_ray

        ensure_ray()
        model, inputs, blobs = _setup(Path(tmp), n_small, n_large)
        figures: dict[str, Any] = {"image_size": SIZE, "batch_size": BATCH,
                                   "model": "UNet depth 4, base width 16, 3 classes",
                                   "torch_threads_plain": _torch_threads()}
        for label, n in (("shards", n_small), ("shards", n_large), ("loose", n_small)):
            result = _measure(model, inputs[label, n], blobs[:n], Path(tmp) / f"out-{label}-{n}")
            figures.update({f"{key}_{label}_{n}": value for key, value in result.items()})
        key = f"images_per_s_shards_{n_large}"
        ratio = figures[f"rayseg_{key}"] / figures[f"plain_{key}"]
        figures["ratio_loose_objects"] = round(
            figures[f"rayseg_images_per_s_loose_{n_small}"]
            / figures[f"plain_images_per_s_loose_{n_small}"], 3)
        figures["memory_ratio_large_over_small"] = round(
            figures[f"peak_pss_mb_shards_{n_large}"] / figures[f"peak_pss_mb_shards_{n_small}"], 3)
        figures["memory_goal"] = "<= 1.1 (peak summed PSS, driver + local Ray cluster)"
    return {"bench": "batch_predict", "figures": figures, "ratio": round(ratio, 3),
            "goal": ">=0.9"}


def _measure(model: str, manifest: str, blobs: list[bytes], out: Path) -> dict[str, Any]:
    """One rayseg run between two plain-loop timings, with the memory sampler running."""
    from pipelines.predict import PredictConfig, run_predict

    plain_before = _plain_images_per_s(model, blobs)
    sampler = _PeakMemory()
    sampler.start()
    summary = run_predict(PredictConfig(model=model, input=manifest, out=str(out),
                                        batch_size=BATCH, rows_per_file=512, progress=False),
                          log=lambda _: None)
    sampler.stop()
    plain_after = _plain_images_per_s(model, blobs)
    if summary["predicted"] != len(blobs) or summary["duplicates"] or summary["missing"]:
        raise RuntimeError(f"batch_predict: run incomplete: {summary}")
    plain = (plain_before + plain_after) / 2
    return {"rayseg_images_per_s": round(len(blobs) / summary["seconds"], 2),
            "rayseg_seconds": summary["seconds"],
            "plain_images_per_s": round(plain, 2),
            "plain_before_after": f"{plain_before:.1f}/{plain_after:.1f}",
            "peak_pss_mb": round(sampler.peak_pss / 2**20, 1),
            "peak_rss_sum_mb": round(sampler.peak_rss / 2**20, 1),
            "processes": sampler.processes}


def _plain_images_per_s(model_dir: str, blobs: list[bytes], limit: int = 256) -> float:
    """``model(x)`` over the decoded tensors of (up to ``limit`` of) the same images."""
    import torch

    from pipelines.predict import local_artifact
    from seg_core.artifact import load_artifact
    from seg_core.codecs import decode_image

    model = load_artifact(local_artifact(model_dir)).model.eval()
    x = torch.stack([torch.from_numpy(decode_image(b).copy()).permute(2, 0, 1).float() / 255
                     for b in blobs[:limit]])  # N x 3 x H x W, decoded before timing
    with torch.inference_mode():
        model(x[:BATCH])  # warm-up
        started = time.perf_counter()
        for i in range(0, len(x), BATCH):
            model(x[i:i + BATCH])
    return len(x) / (time.perf_counter() - started)


def _setup(tmp: Path, n_small: int, n_large: int) -> tuple[str, dict, list[bytes]]:
    """Model, shards of n_small and n_large images and n_small loose objects, all on moto S3.

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

    pafs.S3FileSystem(**resolve_options(), allow_bucket_creation=True).create_dir("bench")
    torch.manual_seed(0)
    unet = UNet(ModelConfig(in_channels=3, num_classes=3, depth=4, base_width=16))
    local = save_artifact(tmp / "model", unet, name="bench", version="1",
                          mask_spec=MaskSpec(num_classes=3),
                          preprocessing=Preprocessing(tile_size=SIZE))
    model = copy_dir_from_local(local, "s3://bench/model")
    distinct = [_png(render_sample(i, size=(SIZE, SIZE), seed=1)[0]) for i in range(32)]
    blobs = [distinct[i % len(distinct)] for i in range(n_large)]
    (tmp / "images").mkdir()
    for i, blob in enumerate(blobs):
        (tmp / "images" / f"{i:05d}.png").write_bytes(blob)
    inputs = {}
    for n in (n_small, n_large):
        manifest = tmp / f"manifest-{n}.csv"
        manifest.write_text("image,mask\n" + "".join(f"images/{i:05d}.png,\n" for i in range(n)))
        inputs["shards", n] = pack(str(manifest), f"s3://bench/shards-{n}", shard_mb=16).out_uri
    for i, blob in enumerate(blobs[:n_small]):
        write_bytes(f"s3://bench/images/{i:05d}.png", blob)
    rows = "".join(f"images/{i:05d}.png,\n" for i in range(n_small))
    inputs["loose", n_small] = f"s3://bench/manifest-{n_small}.csv"
    write_bytes(inputs["loose", n_small], ("image,mask\n" + rows).encode())
    return model, inputs, blobs


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class _moto:
    """moto's S3 server on loopback, with the AWS variables pointing at it (restored on exit)."""

    def __enter__(self) -> str:  # the endpoint URL
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "AWS_EC2_METADATA_DISABLED", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
        self.saved = {name: os.environ.get(name) for name in names}
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                          AWS_ENDPOINT_URL=endpoint)
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        return endpoint

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.server.stop()


class _PeakMemory:
    """Peak summed PSS and RSS of this process and its descendants, polled in a thread."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak_pss = self.peak_rss = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            pids = _tree(os.getpid())
            pss = rss = 0
            for pid in pids:
                pss_kb, rss_kb = _memory_kb(pid)
                pss, rss = pss + pss_kb * 1024, rss + rss_kb * 1024
            if pss > self.peak_pss:
                self.peak_pss, self.processes = pss, len(pids)
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(self.interval_s)


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
