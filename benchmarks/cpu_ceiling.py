"""``cpu_ceiling``: the fp32 GEMM rate of this machine, the roof the U-Net step is measured against.

torch's GEMM (the path U-Net convolutions lower to) is timed beside numpy's BLAS on the same
matrices; ``ratio`` is torch / numpy.  On a GPU it times a bf16 GEMM instead.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks import Context
from benchmarks.common import bench_device, result, time_fn


def gemm_gflops(n: int, *, device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of an n x n x n matrix multiply (2 n^3 flops)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_fn(lambda: torch.mm(a, b), device, warmup=2, repeats=repeats)
    return 2 * n**3 / seconds / 1e9


def numpy_gflops(n: int, *, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    seconds = time_fn(lambda: a @ b, torch.device("cpu"), warmup=2, repeats=repeats)
    return 2 * n**3 / seconds / 1e9


def measure_ceiling(quick: bool = False) -> dict[str, float]:
    """Best GEMM GFLOP/s over a few sizes (fp32 on CPU, bf16 on GPU)."""
    device, amp = bench_device()
    dtype = amp or torch.float32
    sizes = (128, 256) if quick else (1024, 2048)
    best = max(gemm_gflops(n, device=device, dtype=dtype) for n in sizes)
    return {"torch_gemm_gflops": best, "n": float(sizes[-1])}


def run(ctx: Context) -> dict[str, Any]:
    device, amp = bench_device()
    ceiling = measure_ceiling(ctx.quick)
    n = 256 if ctx.quick else 2048
    figures: dict[str, Any] = {
        "device": device.type,
        "dtype": str(amp or torch.float32).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch_gemm_gflops": round(ceiling["torch_gemm_gflops"], 2),
        "numpy_gemm_gflops": round(numpy_gflops(n), 2),   # fp32 on the host CPU
    }
    return result("cpu_ceiling", figures, ("torch_gemm_gflops", "/", "numpy_gemm_gflops"),
                  "info (torch / numpy fp32 GEMM on the CPU; bf16 torch GEMM on a GPU)")
