"""Part 1: ``train_step`` throughput at 512x512 and its MFU, against two ceilings.

MFU is reported against the dense bf16 peak of the device's datasheet and against a bf16 GEMM
ceiling the check measures on the device at start (a large square matmul: what this device and
driver actually deliver), so that neither a marketing figure nor a slow part hides the other.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from benchmarks.common import synchronize, time_fn
from benchmarks.gpu_check.sizes import GOALS, Sizes, peak_bytes, release, reset_peak, say
from seg_core.config import ModelConfig
from seg_core.engine import build_optimizer, train_step
from seg_core.losses import build_loss
from seg_core.model import UNet


def unet(width: int, device: torch.device) -> UNet:
    config = ModelConfig(in_channels=1, num_classes=2, depth=4, base_width=width)
    return UNet(config).to(device, memory_format=torch.channels_last)


def gemm_ceiling(sizes: Sizes, device: torch.device) -> float:
    """TFLOP/s of a ``gemm_side``-square bf16 matmul on ``device`` (median of the repeats)."""
    n = sizes.gemm_side
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = time_fn(lambda: torch.mm(a, b), device, warmup=sizes.warmup,
                      repeats=max(sizes.repeats, 5))
    del a, b
    release(device)
    return 2 * n**3 / seconds / 1e12


def step_runner(width: int, batch: int, sizes: Sizes, device: torch.device, *, fused: bool | None,
                compiled: bool) -> Callable[[], dict[str, float]]:
    """One seg_core training step on a fixed random batch, as used for timing."""
    torch.manual_seed(0)
    model = unet(width, device)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=1e-4, fused=fused)
    loss_fn = build_loss("dice_ce", num_classes=2)
    runner = torch.compile(model, backend=sizes.compile_backend) if compiled else model
    images = torch.randn(batch, 1, sizes.side, sizes.side, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, 2, (batch, sizes.side, sizes.side), device=device)
    data = {"image": images, "mask": masks}
    return lambda: train_step(runner, data, loss_fn, optimizer, amp_dtype=torch.bfloat16,
                              clip_grad=1.0)


def step_flops(width: int, batch: int, sizes: Sizes, device: torch.device) -> float:
    """Forward + backward FLOPs of one step, from torch's flop counter (convolutions, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    step = step_runner(width, batch, sizes, device, fused=None, compiled=False)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def probe_batch(width: int, sizes: Sizes, device: torch.device) -> tuple[int, list[dict]]:
    """The largest batch of ``sizes.probe_batches`` whose eager step peaks under
    ``sizes.memory_share`` of the device's memory (all of them on a CPU)."""
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    chosen, seen = sizes.probe_batches[0], []
    for batch in sizes.probe_batches:
        try:
            reset_peak(device)
            step_runner(width, batch, sizes, device, fused=None, compiled=False)()
            synchronize(device)
        except torch.OutOfMemoryError:
            seen.append({"batch": batch, "peak_gib": None, "fits": False})
            break
        finally:
            release(device)
        peak = peak_bytes(device)
        fits = device.type != "cuda" or peak < sizes.memory_share * total
        seen.append({"batch": batch, "peak_gib": round(peak / 2**30, 2), "fits": fits})
        if not fits:
            break
        chosen = batch
    return chosen, seen


def train_throughput(sizes: Sizes, device: torch.device, deadline: float,
                     peaks: dict[str, float | None]) -> dict[str, Any]:
    """Per width: eager with torch's default AdamW, eager with fused AdamW, then the faster of
    those compiled; the fastest is kept.  Compilation is skipped once ``deadline`` has passed.
    ``peaks``: ``{"datasheet": TFLOP/s or None, "gemm": TFLOP/s}`` for the two MFUs."""
    rows, best = [], {}
    for width in sizes.widths:
        batch, probe = probe_batch(width, sizes, device)
        flops = step_flops(width, batch, sizes, device)
        say(f"width {width}: batch {batch} (probe {probe}), {flops / batch / 1e9:.1f} "
            f"GFLOP per image (fwd + bwd)")
        results: dict[str, dict[str, Any]] = {}
        for name, fused in (("eager", None), ("eager + fused AdamW", True)):
            results[name] = measure(width, batch, sizes, device, flops, peaks, name, fused, False)
            rows.append(results[name])
        faster_fused = results["eager + fused AdamW"]["images_per_s"] > \
            results["eager"]["images_per_s"]
        compiled_name = "compiled" + (" + fused AdamW" if faster_fused else "")
        if time.perf_counter() < deadline:
            try:
                results[compiled_name] = measure(width, batch, sizes, device, flops, peaks,
                                                 compiled_name, True if faster_fused else None,
                                                 True)
            except Exception as error:  # noqa: BLE001 - a compiler failure is a finding
                results[compiled_name] = {"width": width, "batch": batch, "variant": compiled_name,
                                          "error": f"{type(error).__name__}: {error}"[:300]}
            rows.append(results[compiled_name])
        else:
            rows.append({"width": width, "batch": batch, "variant": compiled_name,
                         "error": "skipped: the check's time for compilation was spent"})
        timed = [r for r in results.values() if "images_per_s" in r]
        winner = max(timed, key=lambda r: r["images_per_s"])
        best[str(width)] = {"variant": winner["variant"], "images_per_s": winner["images_per_s"],
                            "tflops": winner["tflops"], "mfu_datasheet": winner["mfu_datasheet"],
                            "mfu_gemm": winner["mfu_gemm"],
                            "compile": "compiled" in winner["variant"],
                            "fused_adamw": "fused" in winner["variant"], "batch": batch}
    top = max(best.values(), key=lambda b: b["tflops"])
    return {"rows": rows, "best": best, "best_tflops": top["tflops"],
            "best_mfu_datasheet": top["mfu_datasheet"], "best_mfu_gemm": top["mfu_gemm"],
            "goal_mfu": GOALS["mfu"], "datasheet_bf16_tflops": peaks["datasheet"],
            "gemm_ceiling_bf16_tflops": float(f"{peaks['gemm']:.4g}")}


def measure(width: int, batch: int, sizes: Sizes, device: torch.device, flops: float,
            peaks: dict[str, float | None], name: str, fused: bool | None,
            compiled: bool) -> dict[str, Any]:
    reset_peak(device)
    step = step_runner(width, batch, sizes, device, fused=fused, compiled=compiled)
    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    step_s = time_fn(step, device, warmup=sizes.warmup, repeats=sizes.repeats)
    tflops = flops / step_s / 1e12
    datasheet = peaks["datasheet"]
    row = {"width": width, "batch": batch, "variant": name,
           "images_per_s": round(batch / step_s, 1), "tflops": float(f"{tflops:.4g}"),
           "mfu_datasheet": round(tflops / datasheet, 4) if datasheet else None,
           "mfu_gemm": round(tflops / peaks["gemm"], 4),
           "peak_gib": round(peak_bytes(device) / 2**30, 2), "first_step_s": round(first, 1)}
    release(device)
    say(f"  {name:<28} {row['images_per_s']:>9} img/s  {row['tflops']:>8} TFLOP/s  "
        f"MFU {row['mfu_datasheet']} (datasheet) {row['mfu_gemm']} (GEMM)  "
        f"peak {row['peak_gib']} GiB  first step {row['first_step_s']} s")
    return row
