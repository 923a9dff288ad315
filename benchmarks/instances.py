"""``instances``: objects from a U-Net's mask, watershed and a boundary class against connected
components, on touching discs.

The data is :func:`seg_core.sample_data.touching_discs` rendered by
:func:`~seg_core.sample_data.render_discs`: 96x128 RGB images (``--quick``: 48x64) where most
discs touch or overlap a neighbour a little, each disc its own brightness, darker towards its
rim; 64 train and 16 val images.  Two small U-Nets (:class:`seg_core.model.UNet`, same width,
depth, loss, optimiser, schedule, steps, flips and seed) are trained with a plain loop of
:func:`seg_core.engine.train_step`: one on foreground/background, one on the 3-class
:func:`seg_core.instances.boundary_target` (background, interior, boundary).  Val images are
predicted with :class:`seg_core.inference.Segmenter` and cut into objects:

- ``none``, ``components``, ``watershed``: :func:`seg_core.instances.label_instances` on the
  2-class model's mask;
- ``boundary``: ``components`` of the 3-class model's interior, grown over its boundary
  (``boundary_watershed``: its ``watershed``, for interiors the model let touch).

Each is scored against the true instances with the Data Science Bowl mean AP and panoptic
quality (:func:`seg_core.instances.aggregate_instance_metrics`: mAP the mean over images, PQ
from the summed counts).  ``oracle_*`` runs every route on the true masks (the true semantic
mask; the boundary target of the true instances): the ceiling of the post-processing alone.
The baseline is ``components``, what a U-Net user gets without instance work; ``ratio`` =
watershed mAP / components mAP, the gain of the route that needs no retraining
(``boundary_over_components`` is the retrained route's).  ``--quick`` is a smoke run of a few
seconds whose figures are noise.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from benchmarks import Context
from benchmarks.common import result, torch_threads
from seg_core.config import MaskSpec, ModelConfig, Preprocessing
from seg_core.engine import build_optimizer, build_scheduler, train_step
from seg_core.inference import Segmenter, prepare_image
from seg_core.instances import (aggregate_instance_metrics, boundary_target, instance_metrics,
                                label_instances)
from seg_core.losses import build_loss
from seg_core.model import UNet
from seg_core.sample_data import render_discs, touching_discs

METHODS = ("none", "components", "watershed")
BOUNDARY = 2   # the 3-class model's boundary class


def make_split(count: int, size: tuple[int, int], first_seed: int,
               radius: tuple[float, float], discs: int) -> list[dict[str, np.ndarray]]:
    """``count`` samples: ``image`` (H x W x 3 uint8), ``mask`` (0/1) and ``labels``."""
    samples = []
    for seed in range(first_seed, first_seed + count):
        mask, labels = touching_discs(size, n=discs, radius=radius, seed=seed)
        samples.append({"image": render_discs(labels, seed), "mask": mask, "labels": labels})
    return samples


def train_model(samples: list[dict[str, np.ndarray]], targets: Sequence[np.ndarray],
                classes: int, pre: Preprocessing, *, steps: int, batch: int,
                width: int) -> UNet:
    """A U-Net trained on (image, target) for ``steps`` AdamW steps of random flipped batches."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = UNet(ModelConfig(in_channels=3, num_classes=classes, depth=3, base_width=width))
    loss_fn = build_loss("dice_ce", num_classes=classes)
    optimizer = build_optimizer(model, lr=3e-3)
    scheduler = build_scheduler(optimizer, total_steps=steps, warmup_steps=max(1, steps // 20))
    images = torch.stack([prepare_image(s["image"], pre) for s in samples])   # N,3,H,W
    masks = torch.from_numpy(np.stack(targets)).long()                         # N,H,W
    for _ in range(steps):
        pick = torch.from_numpy(rng.choice(len(samples), batch, replace=False))
        x, y = images[pick], masks[pick]
        for dim in (-1, -2):
            if rng.random() < 0.5:
                x, y = x.flip(dim), y.flip(dim)
        train_step(model, {"image": x, "mask": y}, loss_fn, optimizer, scheduler=scheduler)
    return model


def predict(model: UNet, classes: int, pre: Preprocessing,
            samples: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The val masks, through the segmenter that batch predict and serve run."""
    segmenter = Segmenter.from_model(model, MaskSpec(classes), pre)
    return [segmenter.predict(s["image"], fields=frozenset({"mask", "confidence"})).mask
            for s in samples]


def score(truths: list[np.ndarray], masks: list[np.ndarray], *, method: str,
          boundary_class: int | None = None) -> dict[str, Any]:
    """The aggregate instance metrics of ``method`` over the images, and its ms per image."""
    started = time.perf_counter()
    preds = [label_instances(m, method=method, boundary_class=boundary_class) for m in masks]
    ms = 1000 * (time.perf_counter() - started) / len(masks)
    found = aggregate_instance_metrics([instance_metrics(t, p) for t, p in zip(truths, preds)])
    return {**found, "ms_per_image": ms}


def foreground_iou(truths: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Pixel IoU of predicted foreground (any class but 0) with the true foreground."""
    inter = sum(int(((t > 0) & (m > 0)).sum()) for t, m in zip(truths, masks))
    union = sum(int(((t > 0) | (m > 0)).sum()) for t, m in zip(truths, masks))
    return inter / union if union else 1.0


def run(ctx: Context) -> dict[str, Any]:
    quick = ctx.quick
    size, radius, discs = ((48, 64), (4.0, 7.0), 5) if quick else ((96, 128), (6.0, 10.0), 14)
    n_train, n_val = (8, 4) if quick else (64, 16)
    steps, batch, width = (40, 4, 8) if quick else (300, 8, 16)
    train = make_split(n_train, size, 0, radius, discs)
    val = make_split(n_val, size, 10_000, radius, discs)
    truths = [s["labels"] for s in val]
    pre = Preprocessing(channels=3, train_size=size)

    # tiny convolutions run several times faster on one thread than on a contended pool
    with torch_threads(1 if quick else torch.get_num_threads()):
        started = time.perf_counter()
        two = train_model(train, [s["mask"] for s in train], 2, pre, steps=steps, batch=batch,
                          width=width)
        three = train_model(train, [boundary_target(s["labels"]) for s in train], 3, pre,
                            steps=steps, batch=batch, width=width)
        train_s = time.perf_counter() - started
        threads = torch.get_num_threads()
        fg_masks, boundary_masks = predict(two, 2, pre, val), predict(three, 3, pre, val)

    runs = {m: score(truths, fg_masks, method=m) for m in METHODS}
    runs["boundary"] = score(truths, boundary_masks, method="components",
                             boundary_class=BOUNDARY)
    runs["boundary_watershed"] = score(truths, boundary_masks, method="watershed",
                                       boundary_class=BOUNDARY)
    oracle = {m: score(truths, [s["mask"] for s in val], method=m) for m in METHODS}
    oracle["boundary"] = score(truths, [boundary_target(t) for t in truths],
                               method="components", boundary_class=BOUNDARY)

    figures: dict[str, Any] = {}
    for name, found in runs.items():
        for key in ("map", "pq", "precision", "recall"):
            figures[f"{name}_{key}"] = round(found[key], 4)
        figures[f"{name}_splits_merges"] = [found["splits"], found["merges"]]
        figures[f"{name}_ms_per_image"] = round(found["ms_per_image"], 2)
    for name, found in oracle.items():
        figures[f"oracle_{name}_map"] = round(found["map"], 4)
        figures[f"oracle_{name}_pq"] = round(found["pq"], 4)
    figures.update({
        "boundary_over_components": round(runs["boundary"]["map"] / runs["components"]["map"], 3)
        if runs["components"]["map"] else None,
        "fg_iou_2class": round(foreground_iou(truths, fg_masks), 4),
        "fg_iou_3class": round(foreground_iou(truths, boundary_masks), 4),
        "val_objects": runs["components"]["truth_objects"],
        "touching_share_val": round(touching_share(truths), 3),
        "size": list(size), "train_val_images": [n_train, n_val], "steps": steps,
        "batch": batch, "base_width": width, "train_s": round(train_s, 1),
        "threads": threads,
    })
    return result("instances", figures, ("watershed_map", "/", "components_map"),
                  ">=2 (watershed / components DSB mAP on a U-Net's masks of touching discs)")


def touching_share(truths: list[np.ndarray]) -> float:
    """The share of true objects that touch another (what connected components merge)."""
    touching = total = 0
    for labels in truths:
        ids = np.unique(labels[labels > 0])
        total += ids.size
        right = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
        down = (labels[1:] != labels[:-1]) & (labels[1:] > 0) & (labels[:-1] > 0)
        touching += np.unique(np.concatenate([labels[:, 1:][right], labels[:, :-1][right],
                                              labels[1:][down], labels[:-1][down]])).size
    return touching / total if total else 0.0
