"""``unet_step``: one seg_core U-Net training step, as images/s and GFLOP/s.

FLOPs are counted with ``torch.utils.flop_counter`` (forward + backward) and the rate is reported
as a fraction of the ``cpu_ceiling`` GEMM rate measured in the same run, in NCHW and in
channels_last.  The baseline is plain PyTorch: the bare GEMM roof, and the same step written as a
plain loop with no seg_core code (``torch.optim.AdamW`` + ``F.cross_entropy``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import Context
from benchmarks.common import bench_device, result, time_interleaved
from benchmarks.cpu_ceiling import measure_ceiling
from seg_core.config import ModelConfig
from seg_core.engine import build_optimizer, train_step
from seg_core.losses import build_loss
from seg_core.model import UNet


def _batch(n: int, size: int, cfg: ModelConfig, device: torch.device, channels_last: bool):
    x = torch.randn(n, cfg.in_channels, size, size, device=device)
    y = torch.randint(0, cfg.num_classes, (n, size, size), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return {"image": x, "mask": y}


def step_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Forward + backward FLOPs of one step, counted by torch's flop counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss = F.cross_entropy(model(batch["image"]), batch["mask"])
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure_layout(cfg: ModelConfig, *, batch_size: int, size: int, channels_last: bool,
                   repeats: int) -> dict[str, float]:
    """Seconds per step for the seg_core step and the plain-PyTorch step, and the step FLOPs."""
    device, amp = bench_device()
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(cfg).to(device=device, memory_format=memory_format)
    batch = _batch(batch_size, size, cfg, device, channels_last)
    flops = step_flops(model, batch)

    optimizer = build_optimizer(model, lr=1e-3, weight_decay=1e-4)
    loss_fn = build_loss("ce", num_classes=cfg.num_classes)

    plain = UNet(cfg).to(device=device, memory_format=memory_format)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=1e-4)

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(plain(batch["image"]), batch["mask"])
        loss.backward()
        plain_opt.step()

    seconds = time_interleaved(
        {"seg": lambda: train_step(model, batch, loss_fn, optimizer, amp_dtype=amp), "plain": plain_step},
        device, warmup=2, repeats=repeats,
    )
    return {"seg_s": seconds["seg"], "plain_s": seconds["plain"], "flops": float(flops)}


def run(ctx: Context) -> dict[str, Any]:
    quick = ctx.quick
    device, amp = bench_device()
    cfg = ModelConfig(in_channels=3, num_classes=3, depth=4, base_width=16)
    batch_size, size = (2, 64) if quick else (8, 256)
    if device.type == "cuda":
        batch_size, size = 16, 512
    repeats = 2 if quick else 5
    ceiling = measure_ceiling(quick)["torch_gemm_gflops"]
    figures: dict[str, Any] = {"device": device.type, "batch": batch_size, "size": size,
                               "base_width": cfg.base_width, "ceiling_gflops": round(ceiling, 2)}
    fractions = {}
    for layout, channels_last in (("nchw", False), ("channels_last", True)):
        m = measure_layout(cfg, batch_size=batch_size, size=size, channels_last=channels_last,
                           repeats=repeats)
        gflops = m["flops"] / m["seg_s"] / 1e9
        fractions[layout] = gflops / ceiling
        figures[f"{layout}_images_per_s"] = round(batch_size / m["seg_s"], 2)
        figures[f"{layout}_gflops"] = round(gflops, 2)
        figures[f"{layout}_fraction_of_ceiling"] = round(fractions[layout], 3)
        figures[f"{layout}_plain_images_per_s"] = round(batch_size / m["plain_s"], 2)
        figures[f"{layout}_seg_over_plain_time"] = round(m["seg_s"] / m["plain_s"], 3)
    figures["step_gflop"] = round(m["flops"] / 1e9, 2)
    return result("unet_step", figures, ("channels_last_gflops", "/", "ceiling_gflops"),
                  ">=0.8 (channels_last step GFLOP/s / the GEMM ceiling; seg_core step vs a "
                  "plain PyTorch step beside it)")
