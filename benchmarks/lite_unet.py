"""``lite_unet``: the lite U-Net (``model.arch: lite``) against the base U-Net, same run.

For the base-16, depth-4 model of ``jobs/configs/train_isbi.yaml`` (1 input channel, 2
classes) in both architectures: parameters, GFLOPs of one forward at 256² and 512²
(:func:`seg_core.model.conv_macs`, convolutions only), CPU inference images/s through
``seg_core.inference.Segmenter`` (the code batch predict and serve run: channels_last,
BatchNorms folded into the convolutions; 256² and 512² images) and training images/s of ``seg_core.engine.train_step`` (batch 8 at 256²),
interleaved so both models see the same machine state.  The baseline is the base U-Net.

``ratio`` is lite over base inference images/s at 512²; the goal (issue 19) is >= 2 with >= 3x
fewer FLOPs.  ISBI membrane Dice in a fixed budget comes from ``quality_isbi`` with
``RAYSEG_ISBI_ARCH=lite``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks import Context
from benchmarks.common import result, time_interleaved
from seg_core.config import MaskSpec, ModelConfig, Preprocessing
from seg_core.engine import build_optimizer, train_step
from seg_core.inference import Segmenter
from seg_core.losses import build_loss
from seg_core.model import UNet, conv_macs

ARCHS = ("unet", "lite")


def _config(arch: str) -> ModelConfig:
    return ModelConfig(in_channels=1, num_classes=2, depth=4, base_width=16, arch=arch)


def inference_seconds(size: int, repeats: int) -> dict[str, float]:
    """Seconds per ``Segmenter.predict`` of one ``size``² grey image, per architecture."""
    image = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
    pre = Preprocessing(channels=1, mean=(0.5,), std=(0.25,), train_size=(256, 256))
    calls = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        segmenter = Segmenter.from_model(UNet(_config(arch)).eval(), MaskSpec(2), pre,
                                         channels_last=True, fold_norms=True)
        calls[arch] = lambda s=segmenter: s.predict(image)
    return time_interleaved(calls, torch.device("cpu"), warmup=2, repeats=repeats)


def training_seconds(batch_size: int, size: int, repeats: int) -> dict[str, float]:
    """Seconds per ``train_step`` (forward, loss, backward, AdamW), per architecture."""
    x = torch.randn(batch_size, 1, size, size).contiguous(memory_format=torch.channels_last)
    batch = {"image": x, "mask": torch.randint(0, 2, (batch_size, size, size))}
    loss_fn = build_loss("dice_ce", num_classes=2)
    steps = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = UNet(_config(arch)).to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, lr=1e-3, weight_decay=1e-4)
        steps[arch] = lambda m=model, o=optimizer: train_step(m, batch, loss_fn, o)
    return time_interleaved(steps, torch.device("cpu"), warmup=2, repeats=repeats)


def run(ctx: Context) -> dict[str, Any]:
    quick = ctx.quick
    repeats = 2 if quick else 10
    sizes = (64,) if quick else (256, 512)
    figures: dict[str, Any] = {"threads": torch.get_num_threads()}
    for arch in ARCHS:
        model = UNet(_config(arch))
        figures[f"{arch}_params"] = sum(p.numel() for p in model.parameters())
        for size in (256, 512):
            figures[f"{arch}_gflops_{size}"] = round(2 * conv_macs(model, size, size) / 1e9, 3)
    for size in sizes:
        seconds = inference_seconds(size, repeats)
        for arch in ARCHS:
            figures[f"{arch}_infer_images_per_s_{size}"] = round(1 / seconds[arch], 2)
    batch = 2 if quick else 8
    seconds = training_seconds(batch, 64 if quick else 256, max(2, repeats // 2))
    for arch in ARCHS:
        figures[f"{arch}_train_images_per_s"] = round(batch / seconds[arch], 2)
    figures["flops_ratio_256"] = round(figures["unet_gflops_256"] / figures["lite_gflops_256"], 2)
    size = sizes[-1]
    return result("lite_unet", figures, (f"lite_infer_images_per_s_{size}", "/",
                                         f"unet_infer_images_per_s_{size}"),
                  f">=2.0 (lite / base inference images/s at {size}², >=3x fewer FLOPs)")
