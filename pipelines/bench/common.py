"""Small shared helpers for benchmarks: device choice, timing, peak memory."""
from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import torch


def bench_device() -> tuple[torch.device, torch.dtype | None]:
    """CUDA with bf16 autocast when a GPU is present, else CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int,
                     repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation.

    Alternating (a, b, a, b, ...) rather than (a, a, ..., b, b, ...) means a burst of load from
    elsewhere on the machine hits both sides of a comparison alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
