"""Part 3: ``Segmenter.predict_batch`` against a plain loop over the same network on the device.

The plain loop runs the same network as the Segmenter does (BatchNorm folded into the
convolutions, channels_last, the same autocast): uint8 arrays to the device, normalise,
``model(x)``, argmax of the logits, masks back to the host.  So the ratio is what tiling,
stitching and post-processing cost, not a difference of networks.  The Segmenter returns what
``rayseg predict`` and the endpoint ask of it (``row_fields``: the mask and its confidence
map, computed on the device and copied back), more than the plain loop's mask alone.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import time_fn
from benchmarks.gpu_check.sizes import GOALS, Sizes, say
from seg_core.artifact import load_artifact
from seg_core.inference import Segmenter, row_fields
from seg_core.model import UNet, fold_batchnorm


def plain_masks(model: torch.nn.Module, arrays: list[np.ndarray], batch: int,
                device: torch.device, amp: torch.dtype | None) -> list[np.ndarray]:
    """uint8 arrays to the device, normalise, ``model(x)`` under ``amp`` autocast, argmax of
    the logits, masks back to the host; ``batch`` images per forward (whole images, no tiles)."""
    masks = []
    with torch.inference_mode():
        for start in range(0, len(arrays), batch):
            x = torch.from_numpy(np.stack(arrays[start:start + batch])).to(device)
            x = ((x.float()[:, None] / 255.0 - 0.5) / 0.2).contiguous(
                memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x)
            masks.extend(logits.argmax(1).to(torch.uint8).cpu().numpy())
    return masks


def per_second(fn: Callable[[], Any], count: int, device: torch.device, calls: int) -> float:
    """Images per second of ``fn`` (which handles ``count`` images), after one warm call."""
    return count / time_fn(fn, device, warmup=1, repeats=calls)


def inference(artifact_dir: Path, model: UNet, val: list, sizes: Sizes,
              device: torch.device) -> dict[str, Any]:
    segmenter = Segmenter(load_artifact(artifact_dir), device=device, engine="torch")   # bf16 on CUDA, auto batch
    plain = fold_batchnorm(copy.deepcopy(model).eval()).to(device,
                                                           memory_format=torch.channels_last)
    side = segmenter.preprocessing.inference_window()
    small = [val[i % len(val)][0][:side[0], :side[1]].copy() for i in range(sizes.infer_images)]
    amp = segmenter.amp_dtype    # bf16 on the GPU; the CPU rehearsal compares fp32 with fp32
    rates = {"segmenter": 0.0, "plain": 0.0}
    fields = row_fields(segmenter.mask_spec)   # what predict and serve rows need
    calls = {"segmenter": lambda: segmenter.predict_batch(small, fields=fields),
             "plain": lambda: plain_masks(plain, small, segmenter.batch_size, device, amp)}
    for name in ("segmenter", "plain", "plain", "segmenter"):   # alternating, best of two
        rates[name] = max(rates[name], per_second(calls[name], len(small), device,
                                                  sizes.timed_calls))
    agree = np.mean([np.mean(p.mask == q) for p, q in
                     zip(segmenter.predict_batch(small[:4], fields=fields),
                         plain_masks(plain, small[:4], 4, device, amp))])
    tiles = [val[i % len(val)][0][:side[0], :side[1]] for i in range(sizes.mosaic ** 2)]
    rows = [np.concatenate(tiles[r * sizes.mosaic:(r + 1) * sizes.mosaic], axis=1)
            for r in range(sizes.mosaic)]
    big = [np.concatenate(rows, axis=0)] * sizes.big_images
    big_seg = per_second(lambda: segmenter.predict_batch(big, fields=fields), len(big), device,
                         sizes.timed_calls)
    big_plain = per_second(lambda: plain_masks(plain, big, 1, device, amp), len(big), device,
                           sizes.timed_calls)
    figures = {
        "side": list(side), "tiles_per_forward": segmenter.batch_size,
        "segmenter_fields": sorted(fields),
        "amp": str(segmenter.amp_dtype), "images_512": len(small),
        "segmenter_images_per_s_512": round(rates["segmenter"], 1),
        "plain_images_per_s_512": round(rates["plain"], 1),
        "ratio_512": round(rates["segmenter"] / rates["plain"], 3),
        "goal_ratio_512": GOALS["inference_ratio_512"],
        "plain_side": "the same folded network, channels_last, same autocast, argmax of logits",
        "mask_agreement_with_plain_512": round(float(agree), 5),
        "big_side": list(big[0].shape), "big_images": len(big),
        "segmenter_images_per_s_big": round(big_seg, 2),
        "plain_whole_image_images_per_s_big": round(big_plain, 2),
        "tiled_overhead_big": round(big_plain / big_seg, 3),
    }
    say(f"inference: {figures}")
    return figures
