"""``ingest``: decoded image+mask pairs per second from S3, rayseg against plain code, per layout.

moto's S3 server runs in a process of its own on 127.0.0.1 for every path.  The same pairs are
stored twice: as loose objects (one per image and per mask, with a manifest) and, after
``rayseg pack``, as Parquet shards.  Four paths end with decoded numpy image and mask arrays in
this process:

- ``rayseg_loose``: Ray Data (``ingest.read_pairs`` of the manifest: fetch tasks with 16 I/O
  threads each, decode fused into them, batches to the driver);
- ``plain_loose``: a thread pool of the same 16 threads, each GETting an image and its mask
  with boto3 and decoding both with PIL (which releases the GIL while it decodes);
- ``rayseg_shards``: Ray Data over the shards (same decode, same consumer);
- ``plain_shards``: pyarrow reads the same shard files (its own threads), then the thread pool
  decodes the rows.

Every path runs once untimed (worker start-up, imports), then all are timed in alternating
rounds and the median is kept.  ``ratio`` = rayseg shards / plain shards pairs per second
(the layout rayseg recommends for training); ``loose_ratio`` = rayseg loose / plain loose.
Memory: the peak PSS of the whole process tree while each path ran.
"""
from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from benchmarks import Context
from benchmarks.common import TreeSampler, create_bucket, moto_process, peak_rss_mb, result
from seg_core.config import MaskSpec

THREADS = 16   # ingest's I/O threads per fetch task (pipelines.ingest._FETCH_THREADS)
_SPEC = MaskSpec(num_classes=3)


def run(ctx: Context) -> dict[str, Any]:
    """quick: 48 pairs of 64 x 64, one round; else 384 of 256 x 256, three rounds."""
    n, size, rounds = (48, 64, 1) if ctx.quick else (384, 256, 3)
    with moto_process() as endpoint:
        from pipelines.raycluster import ensure_ray

        ensure_ray()
        manifest, shards, total_mb = _prepare(n, size)
        paths = {"rayseg_loose": lambda: _consume(_ray_pipeline(manifest)),
                 "plain_loose": lambda: _plain_loose(manifest, endpoint),
                 "rayseg_shards": lambda: _consume(_ray_pipeline(shards)),
                 "plain_shards": lambda: _plain_shards(shards)}
        timed = _interleaved(paths, rounds=rounds, pairs=n)
    figures: dict[str, Any] = {
        "pairs": n, "image_size": size, "dataset_mb": round(total_mb, 1), "rounds": rounds,
        **{f"{name}_pairs_per_s": round(n / t["seconds"], 1) for name, t in timed.items()},
        **{f"{name}_tree_pss_peak_mb": t["tree_pss_mb"] for name, t in timed.items()},
        "driver_peak_rss_mb": round(peak_rss_mb(), 1), "io_threads": THREADS,
        "cpus": os.cpu_count(),
    }
    figures["loose_ratio"] = round(figures["rayseg_loose_pairs_per_s"]
                                   / figures["plain_loose_pairs_per_s"], 3)
    return result("ingest", figures, ("rayseg_shards_pairs_per_s", "/",
                                      "plain_shards_pairs_per_s"),
                  ">=0.9 (shards: Ray Data / pyarrow + thread pool; loose_ratio beside it)")


# ----------------------------------------------------------------------------------- the paths


def _ray_pipeline(source: str):
    from pipelines.ingest import read_pairs
    from pipelines.train.data import prepare_batch

    # Same CPU share for read and decode, so Ray fuses them into one task per block.
    return read_pairs(source, rows_per_block=32, num_cpus=1).map_batches(
        prepare_batch, batch_format="numpy", num_cpus=1,
        fn_kwargs={"mask_spec": _SPEC, "preprocessing": None})


def _consume(dataset) -> int:
    pairs = 0
    for batch in dataset.iter_batches(batch_size=32, batch_format="numpy"):
        if batch["image"][0].ndim != 3 or batch["mask"][0].ndim != 2:
            raise RuntimeError("ingest bench: Ray Data gave undecoded rows")
        pairs += len(batch["id"])
    return pairs


def _decode_pair(image_bytes: bytes, mask_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
    mask = np.asarray(Image.open(io.BytesIO(mask_bytes)))
    if image.ndim != 3 or mask.ndim != 2:
        raise RuntimeError("ingest bench: the plain decode gave the wrong shapes")
    return image, mask


def _plain_loose(manifest: str, endpoint: str) -> int:
    """List the manifest, then a thread pool GETs each image and mask and decodes them."""
    import csv

    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)   # boto3 clients are thread-safe
    bucket, key = manifest[len("s3://"):].split("/", 1)
    root = key.rsplit("/", 1)[0]
    text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()

    def one(row: dict[str, str]) -> int:
        image = s3.get_object(Bucket=bucket, Key=f"{root}/{row['image']}")["Body"].read()
        mask = s3.get_object(Bucket=bucket, Key=f"{root}/{row['mask']}")["Body"].read()
        _decode_pair(image, mask)
        return 1

    with ThreadPoolExecutor(THREADS) as pool:
        return sum(pool.map(one, csv.DictReader(io.StringIO(text))))


def _plain_shards(shards: str) -> int:
    """pyarrow reads the shard files (with its own threads); the thread pool decodes the rows."""
    import pyarrow.dataset as pads

    from pipelines.storage import filesystem_for

    fs, path = filesystem_for(shards)
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    pairs = 0
    with ThreadPoolExecutor(THREADS) as pool:
        for batch in dataset.to_batches(columns=["image_bytes", "mask_bytes"]):
            images, masks = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            pairs += len(list(pool.map(_decode_pair, images, masks)))
    return pairs


# --------------------------------------------------------------------------------- plumbing


def _prepare(n: int, size: int) -> tuple[str, str, float]:
    """Generate ``n`` pairs, upload them, pack them; returns (manifest, shards, dataset MB)."""
    from pipelines import storage
    from pipelines.pack import pack
    from seg_core.sample_data import generate_sample_dataset

    create_bucket("bench")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_sample_dataset(tmp, n=n, size=(size, size), num_classes=3, seed=0)
        files = [p for p in manifest.parent.rglob("*") if p.is_file()]
        total_mb = sum(p.stat().st_size for p in files) / 2**20
        with ThreadPoolExecutor(8) as pool:   # upload in parallel; setup is not measured
            list(pool.map(lambda p: storage.write_bytes(
                f"s3://bench/loose/{p.relative_to(manifest.parent)}", p.read_bytes()), files))
    # ~8 shards: enough blocks for every core, few objects.
    pack("s3://bench/loose/manifest.csv", "s3://bench/shards", shard_mb=max(total_mb / 8, 0.01))
    return "s3://bench/loose/manifest.csv", "s3://bench/shards", total_mb


def _interleaved(paths: dict[str, Callable[[], int]], *, rounds: int,
                 pairs: int) -> dict[str, dict]:
    """Median seconds per path over ``rounds`` alternating rounds (after one untimed round), and
    the peak PSS of the process tree seen while each path ran."""
    for name, fn in paths.items():
        if fn() != pairs:                       # worker start-up, imports, moto warm-up
            raise RuntimeError(f"ingest bench: {name} did not read all {pairs} pairs")
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    peak = dict.fromkeys(paths, 0.0)
    for _ in range(rounds):
        for name, fn in paths.items():
            with TreeSampler(interval_s=0.2) as sampler:
                started = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - started)
            peak[name] = max(peak[name], sampler.peak_pss_mb)
    return {name: {"seconds": statistics.median(s), "tree_pss_mb": peak[name]}
            for name, s in seconds.items()}
