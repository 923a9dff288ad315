"""What one run of the check measures, its goals, and small device helpers."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.common import peak_rss_mb

GOALS = {"mfu": 0.35, "pixel_accuracy": 0.939, "inference_ratio_512": 0.9,
         "bf16_agreement": 0.995}
PRE = dict(channels=1, mean=(0.5,), std=(0.2,), tile_overlap=0.25)

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by a part of
# the name torch reports.  MFU is given against this and against the bf16 GEMM ceiling the
# check measures on the device itself (``gemm_ceiling``).
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0,
                         "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1,
                         "L4": 121.0, "A10": 125.0, "B200": 2250.0}


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the device sizes, or tiny ones for the CPU rehearsal."""

    side: int = 512                       # training and 512 inference side
    widths: tuple[int, ...] = (32, 64)
    probe_batches: tuple[int, ...] = (8, 16, 32, 64)
    memory_share: float = 0.6             # largest probed batch whose peak stays under this
    warmup: int = 3
    repeats: int = 10
    compile_backend: str = "inductor"
    gemm_side: int = 8192                 # the bf16 GEMM ceiling's matrices
    isbi_width: int = 32
    isbi_batch: int = 8
    isbi_budget_s: float = 240.0
    isbi_min_steps: int = 0               # CPU: at least this many, however slow the box
    isbi_crop: tuple[int, int] | None = None   # CPU: train on crops of the slices
    infer_images: int = 48                # 512^2 images per timed predict_batch
    mosaic: int = 4                       # big image = mosaic x mosaic slices (2048^2)
    big_images: int = 2
    timed_calls: int = 3


CPU_SIZES = Sizes(side=64, widths=(8,), probe_batches=(2, 4), memory_share=1.0, warmup=1,
                  repeats=2, compile_backend="aot_eager", gemm_side=512, isbi_width=8,
                  isbi_batch=4, isbi_budget_s=12.0, isbi_min_steps=80, isbi_crop=(64, 96),
                  infer_images=4, mosaic=2, big_images=1, timed_calls=1)


def say(message: str) -> None:
    print(f"[gpu-check] {message}", flush=True)


def datasheet_tflops(name: str) -> float | None:
    """The dense bf16 datasheet peak of the device called ``name``, if known."""
    for part, tflops in DATASHEET_BF16_TFLOPS.items():
        if part in name:
            return tflops
    return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(peak_rss_mb() * 2**20)   # the CPU rehearsal: the process's peak RSS


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
