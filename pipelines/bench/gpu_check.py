"""``make gpu-check``: the GPU path of ``seg_core``, proven on one device, with no Ray and no network.

The Ray layer's GPU work all runs through ``seg_core``: the Ray Train workers call
``seg_core.engine.train_step``, the predict actors and the Serve replicas call
``seg_core.inference.Segmenter``.  This check runs exactly that code with nothing but torch and
the project's pure dependencies, so it runs on a lent GPU machine that has no Ray.  Four parts:

1. **Training throughput and MFU.**  ``train_step`` at 512x512, bf16 autocast, channels_last, for
   base widths 32 and 64 at the largest batch a memory probe finds under 60% of the device.
   Images/s, achieved TFLOP/s (forward + backward FLOPs from ``torch.utils.flop_counter``), MFU
   against the 790 TFLOP/s bf16 peak measured on H200s, peak memory.  Fused AdamW and then
   ``torch.compile`` are tried and kept only where faster; the choice is recorded.
2. **ISBI 2012 at full 512x512.**  A base-32 U-Net trained from scratch on the 24 train slices for
   a fixed wall budget (240 s), with the U-Net paper's augmentation on the GPU (the 8 symmetries
   of the square and ``seg_core.transforms.elastic_deform``: 3x3 grid, 10 px), then the 6 val
   slices scored with the real ``Segmenter`` in fp32 and bf16.
3. **Inference.**  ``Segmenter.predict_batch`` images/s at 512x512 and on 2048x2048 mosaics
   (tiled), bf16, against a plain bf16 ``model(x)`` loop on the same uint8 arrays in the same
   run.  Both sides pay the host-to-device copy and bring their masks back to the host.
4. **Correctness on the device.**  bf16 against fp32 masks; a checkpoint and an artifact saved on
   the device and restored on the CPU (and back) give identical fp32 logits; the CUDA (and CPU)
   generator states survive a ``torch.save`` / ``torch.load(weights_only=True)`` round trip.

``GPU_CHECK_CPU=1`` (or ``--cpu``) runs the same script on the CPU with tiny sizes and generated
membrane images, in well under 2 minutes: ``make test`` does that so the script never rots.
Results go to ``$OUT`` (else ``rayseg_work/gpu_check/``): ``gpu_check.json`` and a Markdown table
``gpu_check.md``; one JSON line and the table are printed as well.  The ISBI slices are read from
``--data``, ``$GPU_CHECK_DATA``, ``.gpu_check_data/isbi2012_em_membrane`` (``make gpu-check-data``
copies them there, an ignored folder that can travel to a device machine) or
``../shared/data/isbi2012_em_membrane``.  Exit status 1 when a correctness check fails.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.bench.common import peak_rss_mb, synchronize, time_fn
from seg_core.artifact import load_artifact, save_artifact
from seg_core.codecs import decode_image
from seg_core.config import MaskSpec, ModelConfig, Preprocessing
from seg_core.engine import WarmupDecay, build_optimizer, rng_state, set_rng_state, train_step
from seg_core.inference import Segmenter, prepare_image
from seg_core.losses import build_loss
from seg_core.metrics import compute_metrics, mask_counts
from seg_core.model import UNet
from seg_core.transforms import elastic_deform, random_dihedral

REPO = Path(__file__).resolve().parents[2]
PEAK_BF16_TFLOPS = 790.0          # dense bf16 matmul rate measured on the lent H200s
GOALS = {"mfu": 0.35, "pixel_accuracy": 0.939, "inference_ratio_512": 0.9, "bf16_agreement": 0.995}
MASK = MaskSpec(num_classes=2, class_names=("membrane", "cell"), mask_values=(0, 255),
                ignore_index=255)
MEMBRANE = 0
PRE = dict(channels=1, mean=(0.5,), std=(0.2,), tile_overlap=0.25)


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
                  repeats=2, compile_backend="aot_eager", isbi_width=8, isbi_batch=4,
                  isbi_budget_s=12.0, isbi_min_steps=80, isbi_crop=(64, 96), infer_images=4, mosaic=2,
                  big_images=1, timed_calls=1)


def say(message: str) -> None:
    print(f"[gpu-check] {message}", flush=True)


# ------------------------------------------------------------------------------------ data


def find_data(explicit: str | None) -> Path | None:
    """The ISBI folder (holding ``manifest.csv``), first of: ``explicit``, ``$GPU_CHECK_DATA``,
    ``.gpu_check_data/isbi2012_em_membrane``, ``../shared/data/isbi2012_em_membrane``."""
    candidates = [explicit, os.environ.get("GPU_CHECK_DATA"),
                  REPO / ".gpu_check_data" / "isbi2012_em_membrane",
                  REPO.parent / "shared" / "data" / "isbi2012_em_membrane"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "manifest.csv").is_file():
            return Path(candidate)
    return None


def load_slices(root: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """``{"train": [...], "val": [...]}`` of (grey uint8 H x W image, class-id mask) from the
    manifest's fixed split; mask value 0 (membrane) is class 0, 255 (cell) class 1."""
    split: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "val": []}
    with open(root / "manifest.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            image = decode_image((root / row["image"]).read_bytes(), source=row["image"])[..., 0]
            mask = decode_image((root / row["mask"]).read_bytes(), source=row["mask"])[..., 0]
            split.setdefault(row["split"], []).append((image, (mask > 127).astype(np.uint8)))
    if not split["train"] or not split["val"]:
        raise SystemExit(f"{root}/manifest.csv: needs train and val rows")
    return split


def synthetic_membranes(count: int, height: int, width: int, seed: int
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """EM-like stand-ins for the CPU rehearsal: Voronoi cells of uneven size and brightness,
    dark membranes 1-2 px wide between them (the minority class, as in ISBI), dark organelles
    inside cells that are not membrane, noise and a brightness gradient across the frame
    (position-dependent), on a non-square frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pairs = []
    for _ in range(count):
        seeds = rng.uniform((0, 0), (height, width), size=(int(rng.integers(8, 16)), 2))
        distance = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        nearest = np.sort(np.sqrt(distance), axis=-1)
        cell = distance.argmin(-1)
        membrane = (nearest[..., 1] - nearest[..., 0]) < rng.uniform(1.0, 2.5)
        shade = rng.uniform(140, 220, size=len(seeds))[cell] + 30 * xx / width
        image = np.where(membrane, 50.0, shade)
        for y, x, r in rng.uniform((0, 0, 1.5), (height, width, 4.0), size=(6, 3)):
            blob = (yy - y) ** 2 + (xx - x) ** 2 < r * r
            image[blob & ~membrane] = 75.0    # dark, but labelled cell
        image += rng.normal(0, 25, size=(height, width))
        pairs.append((np.clip(image, 0, 255).astype(np.uint8), (~membrane).astype(np.uint8)))
    return pairs


# --------------------------------------------------------------------------- 1. throughput


def unet(width: int, device: torch.device) -> UNet:
    config = ModelConfig(in_channels=1, num_classes=2, depth=4, base_width=width)
    return UNet(config).to(device, memory_format=torch.channels_last)


def step_runner(width: int, batch: int, sizes: Sizes, device: torch.device, *, fused: bool | None,
                compiled: bool) -> tuple[Callable[[], dict[str, float]], UNet]:
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
    return (lambda: train_step(runner, data, loss_fn, optimizer, amp_dtype=torch.bfloat16,
                               clip_grad=1.0)), model


def step_flops(width: int, batch: int, sizes: Sizes, device: torch.device) -> float:
    """Forward + backward FLOPs of one step, from torch's flop counter (convolutions, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    step, _ = step_runner(width, batch, sizes, device, fused=None, compiled=False)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def time_steps(step: Callable[[], Any], device: torch.device, sizes: Sizes) -> dict[str, float]:
    """First-call seconds (compilation included) and median seconds per step after warmup."""
    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    return {"first_s": first,
            "step_s": time_fn(step, device, warmup=sizes.warmup, repeats=sizes.repeats)}


def probe_batch(width: int, sizes: Sizes, device: torch.device) -> tuple[int, list[dict]]:
    """The largest batch of ``sizes.probe_batches`` whose eager step peaks under
    ``sizes.memory_share`` of the device's memory (all of them on a CPU)."""
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    chosen, seen = sizes.probe_batches[0], []
    for batch in sizes.probe_batches:
        try:
            reset_peak(device)
            step, _ = step_runner(width, batch, sizes, device, fused=None, compiled=False)
            step()
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


def train_throughput(sizes: Sizes, device: torch.device, deadline: float) -> dict[str, Any]:
    """Per width: eager with torch's default AdamW, eager with fused AdamW, then the faster of
    those compiled; the fastest is kept.  Compilation is skipped when ``deadline`` has passed."""
    rows, best = [], {}
    for width in sizes.widths:
        batch, probe = probe_batch(width, sizes, device)
        flops = step_flops(width, batch, sizes, device)
        say(f"width {width}: batch {batch} (probe {probe}), {flops / batch / 1e9:.1f} "
            f"GFLOP per image (fwd + bwd)")
        variants = [("eager", None, False), ("eager + fused AdamW", True, False)]
        results: dict[str, dict[str, Any]] = {}
        for name, fused, compiled in variants:
            results[name] = measure(width, batch, sizes, device, flops, name, fused, compiled)
            rows.append(results[name])
        faster_fused = results["eager + fused AdamW"]["images_per_s"] > \
            results["eager"]["images_per_s"]
        compiled_name = "compiled" + (" + fused AdamW" if faster_fused else "")
        if time.perf_counter() < deadline:
            try:
                results[compiled_name] = measure(width, batch, sizes, device, flops,
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
                            "mfu": winner["mfu"], "compile": "compiled" in winner["variant"],
                            "fused_adamw": "fused" in winner["variant"], "batch": batch}
    top = max(best.values(), key=lambda b: b["mfu"] or 0.0)
    return {"rows": rows, "best": best, "best_mfu": top["mfu"],
            "goal_mfu": GOALS["mfu"], "peak_tflops": PEAK_BF16_TFLOPS}


def measure(width: int, batch: int, sizes: Sizes, device: torch.device, flops: float, name: str,
            fused: bool | None, compiled: bool) -> dict[str, Any]:
    reset_peak(device)
    step, _ = step_runner(width, batch, sizes, device, fused=fused, compiled=compiled)
    timing = time_steps(step, device, sizes)
    tflops = flops / timing["step_s"] / 1e12
    row = {"width": width, "batch": batch, "variant": name,
           "images_per_s": round(batch / timing["step_s"], 1),
           "tflops": round(tflops, 2),
           "mfu": round(tflops / PEAK_BF16_TFLOPS, 4) if device.type == "cuda" else None,
           "peak_gib": round(peak_bytes(device) / 2**30, 2),
           "first_step_s": round(timing["first_s"], 1)}
    release(device)
    say(f"  {name:<28} {row['images_per_s']:>9} img/s  {row['tflops']:>7} TFLOP/s  "
        f"MFU {row['mfu']}  peak {row['peak_gib']} GiB  first step {row['first_step_s']} s")
    return row


# ------------------------------------------------------------------------------- 2. ISBI


def to_device_set(pairs: list[tuple[np.ndarray, np.ndarray]], pre: Preprocessing,
                  device: torch.device, crop: tuple[int, int] | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised N x 1 x H x W images (through ``prepare_image``, as inference does) and
    N x H x W masks, on the device; ``crop`` takes the top-left corner (CPU rehearsal)."""
    if crop is not None:
        pairs = [(image[:crop[0], :crop[1]], mask[:crop[0], :crop[1]]) for image, mask in pairs]
    images = torch.stack([prepare_image(image, pre) for image, _ in pairs]).to(device)
    masks = torch.stack([torch.from_numpy(mask).long() for _, mask in pairs]).to(device)
    return images, masks


def train_isbi(data: dict[str, list], sizes: Sizes, device: torch.device,
               choice: dict[str, Any]) -> tuple[UNet, dict[str, Any]]:
    """Train from scratch for ``sizes.isbi_budget_s`` of wall time: AdamW (fused if that won),
    bf16, channels_last, LR warmup then cosine over the wall budget, each batch turned /
    mirrored and elastically deformed on the device.  Eager even where compiling won part 1:
    another batch size would compile again, and the check has 8 minutes in all."""
    pre = Preprocessing(**PRE)
    images, masks = to_device_set(data["train"], pre, device, sizes.isbi_crop)
    torch.manual_seed(0)
    model = unet(sizes.isbi_width, device)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=1e-4,
                                fused=True if choice.get("fused_adamw") else None)
    loss_fn = build_loss("dice_ce", num_classes=2)
    schedule = WarmupDecay(total_steps=10_000, warmup_steps=200, schedule="cosine")
    generator = torch.Generator(device=device).manual_seed(0)
    n, batch = len(images), min(sizes.isbi_batch, len(images))
    steps, losses, started = 0, [], None
    first_s = 0.0
    while True:
        order = torch.randperm(n, generator=generator, device=device)
        for start in range(0, n - batch + 1, batch):
            now = time.perf_counter()
            progress = 0.0 if started is None else (now - started) / sizes.isbi_budget_s
            if sizes.isbi_min_steps:   # the budget and the step floor must both be spent
                progress = min(progress, steps / sizes.isbi_min_steps)
            if progress >= 1.0:
                break
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * schedule(int(progress * schedule.total_steps))
            pick = order[start:start + batch]
            x, y = random_dihedral(images[pick], masks[pick], generator=generator)
            x, y = elastic_deform(x, y, sigma_px=10.0, generator=generator)
            x = x.contiguous(memory_format=torch.channels_last)
            losses.append(train_step(model, {"image": x, "mask": y}, loss_fn, optimizer,
                                     amp_dtype=torch.bfloat16, clip_grad=1.0)["loss"])
            steps += 1
            if started is None:     # the budget starts after the first (compiling) step
                first_s = time.perf_counter() - now
                started = time.perf_counter()
        else:
            continue
        break
    synchronize(device)
    wall = time.perf_counter() - (started or time.perf_counter())
    say(f"ISBI: {steps} steps of {batch} in {wall:.0f} s (first step {first_s:.1f} s), "
        f"loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}")
    return model, {"steps": steps, "batch": batch, "images_seen": steps * batch,
                   "epochs": round(steps * batch / n, 1), "train_s": round(wall, 1),
                   "first_step_s": round(first_s, 1), "budget_s": sizes.isbi_budget_s,
                   "width": sizes.isbi_width, "final_loss": round(float(np.mean(losses[-20:])), 4),
                   "augmentation": "8 square symmetries + elastic (3x3 grid, 10 px), on device",
                   "train_size": list(images.shape[-2:]), "compiled": False,
                   "fused_adamw": bool(choice.get("fused_adamw"))}


def score(segmenter: Segmenter, pairs: list[tuple[np.ndarray, np.ndarray]]
          ) -> tuple[dict[str, float], list[np.ndarray]]:
    """Pixel accuracy and membrane Dice of ``segmenter`` on ``pairs``, and the masks."""
    predictions = segmenter.predict_batch([image for image, _ in pairs])
    counts = [mask_counts(p.mask, mask, MASK) for p, (_, mask) in zip(predictions, pairs)]
    summed = {k: sum(c[k] for c in counts) for k in ("tp", "fp", "fn", "tn")}
    metrics = compute_metrics(**summed)
    return ({"pixel_accuracy": round(float(metrics["pixel_accuracy"]), 4),
             "membrane_dice": round(float(metrics["per_class"]["dice"][MEMBRANE]), 4)},
            [p.mask for p in predictions])


# -------------------------------------------------------------------------- 3. inference


def plain_masks(model: UNet, arrays: list[np.ndarray], batch: int, device: torch.device,
                amp: torch.dtype | None) -> list[np.ndarray]:
    """The baseline: uint8 arrays to the device, normalise, ``model(x)`` under ``amp`` autocast
    (bf16 on the GPU), argmax, masks back to the host; ``batch`` images per forward (one whole
    image each, no tiles)."""
    masks = []
    with torch.inference_mode():
        for start in range(0, len(arrays), batch):
            x = torch.from_numpy(np.stack(arrays[start:start + batch])).to(device)
            x = ((x.float()[:, None] / 255.0 - 0.5) / 0.2).contiguous(
                memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x)
            masks.extend(logits.float().softmax(1).argmax(1).to(torch.uint8).cpu().numpy())
    return masks


def per_second(fn: Callable[[], Any], count: int, device: torch.device, calls: int) -> float:
    """Images per second of ``fn`` (which handles ``count`` images), after one warm call."""
    return count / time_fn(fn, device, warmup=1, repeats=calls)


def inference(artifact_dir: Path, model: UNet, val: list, sizes: Sizes,
              device: torch.device) -> dict[str, Any]:
    segmenter = Segmenter(load_artifact(artifact_dir), device=device)   # bf16 on CUDA, auto batch
    plain = copy.deepcopy(model).eval()
    side = segmenter.preprocessing.inference_window()
    small = [val[i % len(val)][0][:side[0], :side[1]].copy() for i in range(sizes.infer_images)]
    seg_rate = per_second(lambda: segmenter.predict_batch(small), len(small), device,
                          sizes.timed_calls)
    amp = segmenter.amp_dtype    # bf16 on the GPU; the CPU rehearsal compares fp32 with fp32
    plain_rate = per_second(lambda: plain_masks(plain, small, segmenter.batch_size, device, amp),
                            len(small), device, sizes.timed_calls)
    agree = np.mean([np.mean(p.mask == q) for p, q in
                     zip(segmenter.predict_batch(small[:4]),
                         plain_masks(plain, small[:4], 4, device, amp))])
    tiles = [val[i % len(val)][0][:side[0], :side[1]] for i in range(sizes.mosaic ** 2)]
    rows = [np.concatenate(tiles[r * sizes.mosaic:(r + 1) * sizes.mosaic], axis=1)
            for r in range(sizes.mosaic)]
    big = [np.concatenate(rows, axis=0)] * sizes.big_images
    big_seg = per_second(lambda: segmenter.predict_batch(big), len(big), device, sizes.timed_calls)
    big_plain = per_second(lambda: plain_masks(plain, big, 1, device, amp), len(big), device,
                           sizes.timed_calls)
    figures = {
        "side": list(side), "tiles_per_forward": segmenter.batch_size,
        "amp": str(segmenter.amp_dtype), "images_512": len(small),
        "segmenter_images_per_s_512": round(seg_rate, 1),
        "plain_images_per_s_512": round(plain_rate, 1),
        "ratio_512": round(seg_rate / plain_rate, 3), "goal_ratio_512": GOALS["inference_ratio_512"],
        "mask_agreement_with_plain_512": round(float(agree), 5),
        "big_side": list(big[0].shape), "big_images": len(big),
        "segmenter_images_per_s_big": round(big_seg, 2),
        "plain_whole_image_images_per_s_big": round(big_plain, 2),
        "tiled_overhead_big": round(big_plain / big_seg, 3),
    }
    say(f"inference: {figures}")
    return figures


# ------------------------------------------------------------------------ 4. correctness


def round_trip(model: UNet, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Checkpoint and artifact saved where the model trained, restored on the CPU and back;
    generator states through torch.save / torch.load(weights_only=True)."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    probe = torch.randn(2, 1, sizes.side, sizes.side, generator=torch.Generator().manual_seed(5))
    model = model.eval()

    def logits(net: torch.nn.Module, where: torch.device) -> torch.Tensor:
        """fp32 logits on ``where``, in one memory layout for all (NCHW and channels_last
        kernels round differently, and the artifact loads in NCHW)."""
        with torch.inference_mode():
            net = net.to(where, memory_format=torch.contiguous_format)
            return net(probe.to(where)).float().cpu()

    on_device = logits(model, device)
    on_cpu = logits(copy.deepcopy(model), torch.device("cpu"))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "rng": rng_state()}, buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
    restored = UNet(model.config)
    restored.load_state_dict(state["model"])
    checkpoint_cpu = torch.equal(logits(restored.eval(), torch.device("cpu")), on_cpu)
    back = io.BytesIO()
    torch.save({"model": restored.state_dict()}, back)       # saved on the CPU, loaded on device
    again = UNet(model.config)
    again.load_state_dict(torch.load(io.BytesIO(back.getvalue()), map_location=device,
                                     weights_only=True)["model"])
    checkpoint_back = torch.equal(logits(again.eval(), device), on_device)
    with tempfile.TemporaryDirectory() as directory:
        save_artifact(directory, model, name="gpu-check", version="rt", mask_spec=MASK,
                      preprocessing=Preprocessing(**PRE))
        artifact_cpu = torch.equal(logits(load_artifact(directory).model, torch.device("cpu")),
                                   on_cpu)

    saved = rng_state()
    draws = draw_all(device)
    blob = io.BytesIO()
    torch.save({"rng": saved}, blob)
    set_rng_state(torch.load(io.BytesIO(blob.getvalue()), map_location="cpu",
                             weights_only=True)["rng"])
    redrawn = draw_all(device)
    rng_ok = {name: redrawn[name] == value for name, value in draws.items()}
    return {"checkpoint_device_to_cpu_identical": checkpoint_cpu,
            "checkpoint_cpu_to_device_identical": checkpoint_back,
            "artifact_device_to_cpu_identical": artifact_cpu,
            "rng_round_trip": rng_ok,
            "cuda_rng_checked": "cuda" in draws}


def draw_all(device: torch.device) -> dict[str, Any]:
    import random

    draws = {"python": random.random(), "numpy": float(np.random.rand()),
             "torch": torch.rand(3).tolist()}
    if device.type == "cuda":
        draws["cuda"] = torch.rand(3, device=device).tolist()
    return draws


# ------------------------------------------------------------------------------ driver


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


def run(cpu: bool, data_dir: str | None, isbi_seconds: float | None) -> dict[str, Any]:
    started = time.perf_counter()
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device here; set GPU_CHECK_CPU=1 (or --cpu) to "
                         "rehearse the check on the CPU with tiny sizes")
    device = torch.device("cpu" if cpu else "cuda")
    sizes = CPU_SIZES if cpu else Sizes()
    if isbi_seconds:
        sizes = Sizes(**{**asdict(sizes), "isbi_budget_s": isbi_seconds})
    torch.backends.cudnn.benchmark = not cpu
    root = find_data(data_dir) if (data_dir or not cpu) else None
    if root is None and not cpu:
        raise SystemExit("gpu-check: the ISBI 2012 slices were not found; run `make "
                         "gpu-check-data` (copies ../shared/data/isbi2012_em_membrane into "
                         ".gpu_check_data/, which a device call can carry) or pass --data")
    data = load_slices(root) if root else {
        "train": synthetic_membranes(8, 64, 96, seed=1), "val": synthetic_membranes(3, 64, 96, 2)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    say(f"device {name or 'cpu'}, torch {torch.__version__}, data "
        f"{root or 'generated membranes'} ({len(data['train'])} train / {len(data['val'])} val)")

    say("1/4 training throughput")
    compile_deadline = started + (120 if not cpu else 60)   # no compiling after this
    throughput = train_throughput(sizes, device, compile_deadline)

    say("2/4 ISBI 2012 from scratch")
    model, isbi = train_isbi(data, sizes, device, throughput["best"][str(sizes.isbi_width)])
    train_hw = tuple(isbi["train_size"])
    with tempfile.TemporaryDirectory() as directory:
        pre = Preprocessing(**PRE, train_size=train_hw)
        save_artifact(directory, model, name="gpu-check-isbi", version="1", mask_spec=MASK,
                      preprocessing=pre)
        artifact = load_artifact(directory)
        fp32, fp32_masks = score(Segmenter(artifact, device=device, amp_dtype=None), data["val"])
        bf16, bf16_masks = score(Segmenter(artifact, device=device, amp_dtype=torch.bfloat16),
                                 data["val"])
        agreement = float(np.mean([np.mean(a == b) for a, b in zip(fp32_masks, bf16_masks)]))
        isbi.update({"fp32": fp32, "bf16": bf16, "goal_pixel_accuracy": GOALS["pixel_accuracy"]})
        say(f"ISBI val: fp32 {fp32}, bf16 {bf16}, bf16/fp32 mask agreement {agreement:.5f}")

        say("3/4 inference")
        infer = inference(Path(directory), model, data["val"], sizes, device)

    say("4/4 correctness")
    correct = round_trip(model, sizes, device)
    correct.update({"bf16_fp32_mask_agreement": round(agreement, 5),
                    "goal_bf16_agreement": GOALS["bf16_agreement"]})
    say(f"correctness: {correct}")

    best_mfu = throughput["best_mfu"]
    goals = {
        "mfu >= 0.35": None if best_mfu is None else best_mfu >= GOALS["mfu"],
        "pixel_accuracy >= 0.939": isbi["bf16"]["pixel_accuracy"] >= GOALS["pixel_accuracy"],
        "inference ratio 512 >= 0.9": infer["ratio_512"] >= GOALS["inference_ratio_512"],
        "bf16 agreement >= 0.995": agreement >= GOALS["bf16_agreement"],
        "round trips identical": all([correct["checkpoint_device_to_cpu_identical"],
                                      correct["checkpoint_cpu_to_device_identical"],
                                      correct["artifact_device_to_cpu_identical"],
                                      *correct["rng_round_trip"].values()]),
    }
    return {"check": "gpu_check", "mode": "cpu rehearsal" if cpu else "device",
            "device": name or "cpu", "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": str(root) if root else "generated membranes",
            "wall_s": round(time.perf_counter() - started, 1),
            "training": throughput, "isbi": isbi, "inference": infer, "correctness": correct,
            "goals": goals}


def table(result: dict[str, Any]) -> str:
    """The Markdown report: one table per part, goals last."""
    lines = [f"# gpu-check: {result['device']} ({result['mode']}), torch {result['torch']}, "
             f"{result['date']}, {result['wall_s']} s", "",
             "| width | batch | variant | images/s | TFLOP/s | MFU | peak GiB | first step s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["training"]["rows"]:
        if "error" in row:
            lines.append(f"| {row['width']} | {row['batch']} | {row['variant']} | "
                         f"{row['error']} | | | | |")
        else:
            lines.append(f"| {row['width']} | {row['batch']} | {row['variant']} | "
                         f"{row['images_per_s']} | {row['tflops']} | {row['mfu']} | "
                         f"{row['peak_gib']} | {row['first_step_s']} |")
    isbi, infer = result["isbi"], result["inference"]
    lines += ["", "| ISBI val (6 slices, full resolution) | pixel accuracy | membrane Dice |",
              "|---|---|---|",
              f"| fp32 Segmenter | {isbi['fp32']['pixel_accuracy']} | "
              f"{isbi['fp32']['membrane_dice']} |",
              f"| bf16 Segmenter | {isbi['bf16']['pixel_accuracy']} | "
              f"{isbi['bf16']['membrane_dice']} |",
              "", f"Trained {isbi['steps']} steps of {isbi['batch']} ({isbi['epochs']} epochs) in "
              f"{isbi['train_s']} s, width {isbi['width']}, {isbi['augmentation']}.", "",
              "| inference | Segmenter images/s | plain model(x) images/s | ratio |",
              "|---|---|---|---|",
              f"| {infer['side'][0]}x{infer['side'][1]} | "
              f"{infer['segmenter_images_per_s_512']} | {infer['plain_images_per_s_512']} | "
              f"{infer['ratio_512']} |",
              f"| {infer['big_side'][0]}x{infer['big_side'][1]} tiled vs one whole-image forward "
              f"| {infer['segmenter_images_per_s_big']} | "
              f"{infer['plain_whole_image_images_per_s_big']} | "
              f"{round(1 / infer['tiled_overhead_big'], 3)} |", "",
              "| goal | met |", "|---|---|"]
    lines += [f"| {goal} | {'n/a (no GPU)' if met is None else ('yes' if met else 'no')} |"
              for goal, met in result["goals"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make gpu-check", description=__doc__.split("\n\n")[0] + " Runs training "
        "throughput and MFU, ISBI 2012 at 512x512, Segmenter inference against a plain loop, "
        "and GPU correctness checks; writes gpu_check.json and gpu_check.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  make gpu-check-data && make gpu-check        # on a GPU machine\n"
               "  GPU_CHECK_CPU=1 make gpu-check                  # rehearsal on the CPU (~1 min)")
    parser.add_argument("--cpu", action="store_true", default=os.environ.get("GPU_CHECK_CPU") == "1",
                        help="run on the CPU with tiny sizes and generated data (GPU_CHECK_CPU=1)")
    parser.add_argument("--data", default=None,
                        help="ISBI folder with manifest.csv (default: $GPU_CHECK_DATA, "
                             ".gpu_check_data/isbi2012_em_membrane, ../shared/data/...)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "rayseg_work" /
                                                                     "gpu_check"),
                        help="folder for gpu_check.json and gpu_check.md (default: $OUT, else "
                             "rayseg_work/gpu_check)")
    parser.add_argument("--isbi-seconds", type=float, default=None,
                        help="ISBI training budget in seconds (default 240; 12 on the CPU)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args.cpu, args.data, args.isbi_seconds)
    report = table(result)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(report)
    print(json.dumps(result, separators=(",", ":")))
    print(report)
    say(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if result["goals"]["round trips identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
