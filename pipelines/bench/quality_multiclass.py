"""``quality_multiclass``: multi-class mIoU, ``rayseg train`` + ``rayseg evaluate`` vs a plain loop.

The data is :mod:`seg_core.scene_data`: 200 street scenes of 120x184 (160 train / 40 val) with six
classes, two of them under 2% of the pixels, colour twins told apart by vertical position
(sky/water, wall/road) and void (255) boundaries and blobs.  It is generated into
``rayseg_work/bench_multiclass/`` (gitignored).

- **rayseg**: ``pipelines.train.train.train`` with the config a user would write (six named classes,
  ``ignore_index`` 255, base width 16, depth 4, ``dice_ce``, native size: no ``resize``, no
  up-down flips, everything else default), ``max_runtime_secs`` = the budget (240 s; 40 s with ``quick``;
  ``RAYSEG_MC_BUDGET_S`` overrides it) and the epochs (so the cosine) sized to the budget from a
  timed plain step.  Scored by ``pipelines.evaluate.evaluate.run_evaluate``, the code behind
  ``rayseg evaluate --model URI --manifest M --split val``, at full resolution.
  ``RAYSEG_MC_CLASS_WEIGHTS`` (``auto`` or ``w0,w1,...``) sets ``class_weights`` for this side only.
- **plain**: written here without rayseg's loop or inference: the same ``seg_core.model.UNet``,
  AdamW (same lr and weight decay), a per-step cosine over the same planned steps, the same
  loss, gradient clipping and flips, the same epochs and wall budget and torch threads, on the
  same train split held in memory.  Predictions are one forward per whole val image at native
  size, then argmax, scored by :func:`confusion` and :func:`scores` below.

Both sides score the same way: ignored pixels skipped, counts summed over all val pixels, and a
class absent from truth and prediction gets IoU nan and is left out of the mean.

Up-down flips are off on both sides: here the class depends on the height in the image, and the
README tells users with such data to turn them off.  ``quick`` is a smoke run
(about one epoch), so its ratio is noise.  On a shared machine both sides' step counts depend on
its load, which the figures record (``loadavg_*``, ``*_steps``).
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.config import TrainConfig, load_train_config
from seg_core.losses import build_loss
from seg_core.model import UNet
from seg_core.scene_data import CLASS_NAMES, IGNORE_INDEX, generate_scene_dataset

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "rayseg_work" / "bench_multiclass"
SIZE = (120, 184)
N_IMAGES, VAL_FRACTION = 200, 0.2
TIMED_STEPS = 5  # plain steps timed (after WARMUP_STEPS) to plan the epochs
WARMUP_STEPS = 2


@dataclass(frozen=True)
class Split:
    """One split in memory, preprocessed as rayseg does: images N,C,H,W float32, masks N,H,W."""

    images: np.ndarray
    masks: np.ndarray


@dataclass(frozen=True)
class PlainRun:
    """What the plain loop did."""

    model: UNet
    steps: int
    epochs: int  # epochs started
    seconds: float  # training loop wall time
    step_s: float  # median seconds per step after the warmup steps (robust to load bursts)


# --------------------------------------------------------------------------------- scoring


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int,
              ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``K x K`` int64 counts (row = truth, column = prediction) of pixels not ignored in truth."""
    if pred.shape != truth.shape:
        raise ValueError(f"confusion: prediction {pred.shape} and truth {truth.shape} differ")
    keep = truth != ignore_index
    index = truth[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray) -> dict[str, Any]:
    """Per-class IoU, mIoU (mean over classes present in truth or prediction), pixel accuracy.

    IoU = tp / (tp + fp + fn); a class with ``tp + fp + fn == 0`` is nan and not in the mean.
    """
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = ~np.isnan(iou)
    return {"iou": iou.tolist(), "miou": float(iou[present].mean()) if present.any() else math.nan,
            "pixel_accuracy": float(tp.sum() / max(matrix.sum(), 1))}


# ------------------------------------------------------------------------------ plain loop


def load_split(manifest: Path, split: str, cfg: TrainConfig) -> Split:
    """Decode the rows of ``split`` with PIL and normalise with ``cfg.preprocessing``.

    Masks are H x W class ids, or K x H x W {0, 1} when the mask column lists one file per
    class (``a.png;b.png``, multi-label).
    """
    with manifest.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == split]
    mean = np.asarray(cfg.preprocessing.mean, np.float32)[:, None, None]
    std = np.asarray(cfg.preprocessing.std, np.float32)[:, None, None]
    images = [(np.asarray(Image.open(manifest.parent / r["image"]).convert("RGB"), np.float32)
               .transpose(2, 0, 1) / 255.0 - mean) / std for r in rows]  # each C,H,W
    masks = [_read_mask(manifest.parent, r["mask"]) for r in rows]
    return Split(np.stack(images).astype(np.float32), np.stack(masks))


def _read_mask(root: Path, value: str) -> np.ndarray:
    parts = value.split(";")
    if len(parts) == 1:
        return np.asarray(Image.open(root / value), np.int64)
    return np.stack([np.asarray(Image.open(root / p)) > 0 for p in parts]).astype(np.uint8)


def flip(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, *, hflip: bool,
         vflip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each pair flipped left-right and/or up-down with probability 1/2 (images N,C,H,W)."""
    out_images, out_masks = [], []
    for image, mask in zip(images, masks):  # image C,H,W; mask H,W (or K,H,W multi-label)
        if hflip and rng.random() < 0.5:
            image, mask = image[..., ::-1], mask[..., ::-1]
        if vflip and rng.random() < 0.5:
            image, mask = image[..., ::-1, :], mask[..., ::-1, :]
        out_images.append(image)
        out_masks.append(mask)
    return np.ascontiguousarray(np.stack(out_images)), np.ascontiguousarray(np.stack(out_masks))


def train_plain(cfg: TrainConfig, train: Split, *, epochs: int, budget_s: float,
                max_steps: int | None = None, loss_fn: Any = None) -> PlainRun:
    """A plain PyTorch loop: shuffle, flip, forward, loss, backward, clip, AdamW, cosine step.

    Stops after ``epochs`` epochs, when ``budget_s`` seconds have passed (checked every step,
    as ``max_runtime_secs`` is), or after ``max_steps`` steps (used to time a step).
    ``loss_fn`` (logits, target) -> scalar defaults to ``cfg.loss`` from ``seg_core.losses``.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = UNet(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    steps_per_epoch = math.ceil(len(train.images) / cfg.batch_size)
    total = max_steps or epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    loss_fn = loss_fn or build_loss(cfg.loss, num_classes=cfg.model.num_classes,
                                    ignore_index=cfg.mask.ignore_index)
    model.train()
    step, epoch, started = 0, 0, time.perf_counter()
    durations: list[float] = []
    while epoch < epochs and step < total and time.perf_counter() - started < budget_s:
        order, epoch = rng.permutation(len(train.images)), epoch + 1
        for first in range(0, len(order), cfg.batch_size):
            step_started = time.perf_counter()
            index = order[first:first + cfg.batch_size]
            images, masks = flip(train.images[index], train.masks[index], rng,
                                 hflip=cfg.augment.hflip, vflip=cfg.augment.vflip)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(torch.from_numpy(images)), torch.from_numpy(masks))
            loss.backward()
            if cfg.optim.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            schedule.step()
            step += 1
            durations.append(time.perf_counter() - step_started)
            if step == total or time.perf_counter() - started >= budget_s:
                break
    timed = durations[WARMUP_STEPS:] or durations
    return PlainRun(model, step, epoch, time.perf_counter() - started, statistics.median(timed))


@torch.no_grad()
def predict_plain(model: UNet, images: np.ndarray) -> list[np.ndarray]:
    """Class ids H,W of each image: one forward of the whole image at native size, argmax."""
    model.eval()
    return [model(torch.from_numpy(image[None])).argmax(dim=1)[0].numpy() for image in images]


# ----------------------------------------------------------------------------- the benchmark


def plan_epochs(budget_s: float, steps_per_epoch: int, step_s: float, num_val: int) -> int:
    """Epochs whose steps, plus rayseg's per-epoch validation and checkpoint, fill the budget.

    Validation is priced at a quarter step per val image (one forward of a whole image is
    about a twelfth of a 4-image training step; a quarter leaves room for decode and stitching)
    plus 0.5 s for the checkpoint.  As in ``quality_isbi`` planning errs
    long: ``max_runtime_secs`` then stops the loop in the flat tail of the cosine.
    """
    per_epoch = steps_per_epoch * step_s + num_val * step_s / 4 + 0.5
    return max(1, int(budget_s / per_epoch))


def class_weights_override() -> list[str]:
    """``class_weights=...`` from ``RAYSEG_MC_CLASS_WEIGHTS`` (``auto`` or a comma list), if set."""
    raw = os.environ.get("RAYSEG_MC_CLASS_WEIGHTS", "").strip()
    if not raw:
        return []
    if raw == "auto":
        return ["class_weights=auto"]
    try:
        weights = [float(v) for v in raw.split(",")]
    except ValueError:
        raise ValueError(f"RAYSEG_MC_CLASS_WEIGHTS: expected 'auto' or {len(CLASS_NAMES)} "
                         f"comma-separated numbers, got {raw!r}") from None
    return [f"class_weights={weights}"]


def user_config(manifest: Path, extra: list[str]) -> TrainConfig:
    """The settings a user would write for this data, plus ``extra`` overrides."""
    k = len(CLASS_NAMES)
    return load_train_config(None, [
        f"data.manifest={manifest}", f"model.num_classes={k}", f"mask.num_classes={k}",
        f"mask.class_names=[{', '.join(CLASS_NAMES)}]", f"mask.ignore_index={IGNORE_INDEX}",
        "model.base_width=16", "model.depth=4", "model.in_channels=3",
        "preprocessing.channels=3", "loss=dice_ce",
        # sky/water and wall/road differ only by height in the image: no up-down flips
        "augment.vflip=false", *extra])


def run(quick: bool = False) -> dict[str, Any]:
    from pipelines.raycluster import ensure_ray

    load_start = os.getloadavg()
    budget = float(os.environ.get("RAYSEG_MC_BUDGET_S", 0)) or (40.0 if quick else 240.0)
    for stale in ("data", "eval"):
        shutil.rmtree(WORK / stale, ignore_errors=True)
    manifest = generate_scene_dataset(WORK / "data", n=N_IMAGES, size=SIZE, seed=0,
                                      val_fraction=VAL_FRACTION)
    threads = max(1, int(ensure_ray().get("CPU", 1)))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the plain side gets what the Ray worker gets
    try:
        base = user_config(manifest, [])
        train_split, val_split = (load_split(manifest, s, base) for s in ("train", "val"))
        step_s = train_plain(base, train_split, epochs=1, budget_s=math.inf,
                             max_steps=WARMUP_STEPS + TIMED_STEPS).step_s
        epochs = plan_epochs(budget, math.ceil(len(train_split.images) / base.batch_size),
                             step_s, len(val_split.images))
        ours = rayseg_side(manifest, epochs=epochs, budget_s=budget, threads=threads)
        plain = train_plain(base, train_split, epochs=epochs, budget_s=budget)
        predictions = predict_plain(plain.model, val_split.images)
    finally:
        torch.set_num_threads(previous_threads)
    k = len(CLASS_NAMES)
    plain_scores = scores(sum(confusion(p, t, k) for p, t in zip(predictions, val_split.masks)))
    ray_scores = ours["report"]["metrics"]["macro"]
    share = np.bincount(val_split.masks.ravel(), minlength=256) / val_split.masks.size
    ray_iou = [rounded(v) for v in ray_scores["per_class"]["iou"]]
    plain_iou = [rounded(v) for v in plain_scores["iou"]]
    print(class_table(share[:k] * 100, ray_iou, plain_iou), flush=True)
    result = ours["result"]
    figures = {
        "classes": list(CLASS_NAMES),
        "class_share_val_pct": [round(100 * float(s), 2) for s in share[:k]],
        "void_share_val_pct": round(100 * float(share[IGNORE_INDEX]), 2),
        "rayseg_miou": rounded(ray_scores["iou"]), "plain_miou": rounded(plain_scores["miou"]),
        "rayseg_pixel_accuracy": rounded(ray_scores["pixel_accuracy"]),
        "plain_pixel_accuracy": rounded(plain_scores["pixel_accuracy"]),
        "rayseg_iou": ray_iou, "plain_iou": plain_iou,
        "rayseg_train_val_miou": rounded(result.metrics["miou"]),
        "epochs_planned": epochs, "rayseg_epochs": len(result.history),
        "plain_epochs": plain.epochs, "rayseg_steps": result.history[-1]["step"],
        "plain_steps": plain.steps, "rayseg_stopped": result.stopped, "budget_s": budget,
        "rayseg_train_wall_s": ours["train_s"], "rayseg_evaluate_s": ours["evaluate_s"],
        "plain_train_s": round(plain.seconds, 1), "plain_step_s": round(step_s, 3),
        "threads": threads, "size": list(SIZE),
        "train_val_images": [len(train_split.images), len(val_split.images)],
        "class_weights": ours["class_weights"], "model": result.artifact_uri,
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }
    ratio = ray_scores["iou"] / plain_scores["miou"] if plain_scores["miou"] else math.nan
    return {"bench": "quality_multiclass", "figures": figures, "ratio": round(ratio, 3),
            "goal": ">=0.98"}


def rayseg_side(manifest: Path, *, epochs: int, budget_s: float, threads: int) -> dict[str, Any]:
    """``rayseg train`` with the user's settings, then ``rayseg evaluate --model --split val``.

    Returns the :class:`~pipelines.train.train.TrainResult`, the evaluate report, both wall times and
    the class weights used.
    """
    from pipelines.evaluate.evaluate import EvaluateConfig, run_evaluate
    from pipelines.train.train import train

    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = user_config(manifest, [
        f"epochs={epochs}", f"max_runtime_secs={budget_s}", "artifact_weights=last",
        f"scaling.torch_threads={threads}", f"version=bench-{stamp}", "log_every_steps=0",
        f"storage.storage_path={WORK}/ray_results", f"storage.models_uri={WORK}/models",
        *class_weights_override()])
    started = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - started
    # bootstrap and overlays only add intervals and pictures; the scores are the same
    report = run_evaluate(EvaluateConfig(manifest=str(manifest), out=str(WORK / "eval"),
                                         model=result.artifact_uri, split="val", bootstrap=0,
                                         overlays=0, progress=False))
    return {"result": result, "report": report, "train_s": round(train_s, 1),
            "evaluate_s": round(time.perf_counter() - started - train_s, 1),
            "class_weights": cfg.class_weights}


def class_table(share_pct: np.ndarray, rayseg_iou: list[float | None],
                plain_iou: list[float | None], names: tuple[str, ...] = CLASS_NAMES) -> str:
    """Fixed-width per-class table: class, share of val pixels, rayseg IoU, plain IoU."""
    def shown(value: float | None) -> str:
        return "   n/a" if value is None else f"{value:6.3f}"

    lines = [f"{'class':<10} {'val %':>7} {'rayseg IoU':>11} {'plain IoU':>10}", "-" * 41]
    for name, pct, ours, theirs in zip(names, share_pct, rayseg_iou, plain_iou):
        lines.append(f"{name:<10} {pct:7.2f} {shown(ours):>11} {shown(theirs):>10}")
    return "\n".join(lines)


def rounded(value: float | None) -> float | None:
    """Four decimals; nan (a class absent from truth and prediction) becomes None for JSON."""
    return None if value is None or math.isnan(value) else round(float(value), 4)
