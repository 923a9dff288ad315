"""``ingest``: decoded image+mask pairs per second from a local S3, three paths side by side.

- ``loose``: one object per image and per mask, through Ray Data (``ingest.read_pairs`` of the
  manifest -> decode tasks -> batches on the driver);
- ``shards``: the same pairs after ``rayseg pack``, through Ray Data (same decode, same consumer);
- ``plain``: a single-process loop: boto3 ``get_object`` for each image and mask, PIL decode.

Every path ends with decoded numpy image and mask arrays in the driver.  The S3 server is moto
in this process on 127.0.0.1 (a free port); it competes for the same cores, as a co-located MinIO
would.  Every path runs once untimed (worker start-up, imports), then the paths are timed in
alternating rounds and the median is kept.  ``ratio`` = shards / plain pairs per second.  Memory: the driver's peak RSS and the peak PSS of the whole process
tree (driver + Ray workers + moto) sampled during each timed run.
"""
from __future__ import annotations

import io
import os
import resource
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from pipelines.storage import local_s3_server
from seg_core.config import MaskSpec

GOAL = ">=1.8"
_SPEC = MaskSpec(num_classes=3)
def run(quick: bool = False) -> dict[str, Any]:
    """Measure the three paths; quick: 96 pairs of 128 x 128 once, else 384 of 256 x 256, 3 rounds."""
    n, size, rounds = (96, 128, 1) if quick else (384, 256, 3)
    with local_s3_server(credentials="bench") as endpoint:
        from pipelines.raycluster import ensure_ray

        ensure_ray()
        manifest, shards, total_mb = _prepare(n, size)
        paths = {"loose": lambda: _consume(_ray_pipeline(manifest)),
                 "shards": lambda: _consume(_ray_pipeline(shards)),
                 "plain": lambda: _plain_loop(manifest, endpoint)}
        timed = _interleaved(paths, rounds=rounds)
    rate = {name: round(n / t["seconds"], 1) for name, t in timed.items()}
    figures = {
        "pairs": n, "image_size": size, "dataset_mb": round(total_mb, 1), "rounds": rounds,
        **{f"{name}_pairs_per_s": value for name, value in rate.items()},
        "loose_vs_plain": round(timed["plain"]["seconds"] / timed["loose"]["seconds"], 3),
        **{f"{name}_tree_pss_peak_mb": t["tree_pss_mb"] for name, t in timed.items()},
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
    }
    return {"bench": "ingest", "figures": figures,
            "ratio": round(timed["plain"]["seconds"] / timed["shards"]["seconds"], 3),
            "goal": GOAL}


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
        assert batch["image"][0].ndim == 3 and batch["mask"][0].ndim == 2
        pairs += len(batch["id"])
    return pairs


def _plain_loop(manifest: str, endpoint: str) -> int:
    """The baseline a user writes first: list the manifest, GET each object, decode with PIL."""
    import csv

    import boto3
    from PIL import Image

    s3 = boto3.client("s3", endpoint_url=endpoint)
    bucket, key = manifest[len("s3://"):].split("/", 1)
    root = key.rsplit("/", 1)[0]
    text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    pairs = 0
    for row in csv.DictReader(io.StringIO(text)):
        image_bytes = s3.get_object(Bucket=bucket, Key=f"{root}/{row['image']}")["Body"].read()
        mask_bytes = s3.get_object(Bucket=bucket, Key=f"{root}/{row['mask']}")["Body"].read()
        image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
        mask = np.asarray(Image.open(io.BytesIO(mask_bytes)))
        assert image.ndim == 3 and mask.ndim == 2
        pairs += 1
    return pairs


# --------------------------------------------------------------------------------- plumbing


def _prepare(n: int, size: int) -> tuple[str, str, float]:
    """Generate ``n`` pairs, upload them, pack them; returns (manifest, shards, dataset MB)."""
    import pyarrow.fs as pafs

    from pipelines import storage
    from pipelines.pack import pack
    from seg_core.sample_data import generate_sample_dataset

    fs = pafs.S3FileSystem(**storage.resolve_options(), scheme="http", allow_bucket_creation=True)
    fs.create_dir("bench")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_sample_dataset(tmp, n=n, size=(size, size), num_classes=3, seed=0)
        files = [p for p in manifest.parent.rglob("*") if p.is_file()]
        total_mb = sum(p.stat().st_size for p in files) / 2**20
        with ThreadPoolExecutor(8) as pool:   # upload in parallel; setup is not measured
            list(pool.map(lambda p: storage.write_bytes(
                f"s3://bench/loose/{p.relative_to(manifest.parent)}", p.read_bytes()), files))
    # ~8 shards: enough blocks for every core, few objects.
    pack("s3://bench/loose/manifest.csv", "s3://bench/shards", shard_mb=max(total_mb / 8, 0.1))
    return "s3://bench/loose/manifest.csv", "s3://bench/shards", total_mb


def _interleaved(paths: dict[str, Callable[[], int]], *, rounds: int) -> dict[str, dict]:
    """Median seconds per path over ``rounds`` alternating rounds (after one untimed round), and
    the peak PSS of the process tree seen while each path ran.

    Alternating means a burst of load from elsewhere on a shared machine hits every path alike.
    """
    for fn in paths.values():
        fn()                                    # worker start-up, imports, moto warm-up
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    peak = dict.fromkeys(paths, 0.0)
    for _ in range(rounds):
        for name, fn in paths.items():
            sampler = _TreePss()
            sampler.start()
            started = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - started)
            sampler.stop()
            peak[name] = max(peak[name], round(sampler.peak_mb, 1))
    return {name: {"seconds": statistics.median(s), "tree_pss_mb": peak[name]}
            for name, s in seconds.items()}


class _TreePss(threading.Thread):
    """Samples the summed PSS of this process and all its descendants every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mb = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak_mb = max(self.peak_mb, _tree_pss_mb(os.getpid()))
            self._done.wait(0.2)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _tree_pss_mb(root: int) -> float:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total_kb, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                total_kb += next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total_kb / 1024
