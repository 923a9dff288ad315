"""From a fingerprint (:mod:`pipelines.plan.fingerprint`) to a training plan: a ``TrainConfig``
fragment and one sentence per decision.  Pure rules, no Ray, no I/O.

The rules, in order:

1. **Geometry.**  Images whose sizes vary (the largest side over 1.25 x the smallest) or that
   are large (a side over :data:`LARGE_SIDE`) train on random crops of :data:`TARGET_SIDE`
   (smaller when the 10% quantile's short side is smaller), padded where an image is smaller;
   inference tiles at the crop.  Images of one size with more than 1.5 x
   :data:`TARGET_SIDE`\\ ² pixels are resized, aspect kept, to about that many pixels; smaller
   ones train at full size.  Sides are multiples of 16.
2. **Normalisation.**  The data's own per-channel mean and std, and its channel count.
3. **Batch size.**  On GPU workers about :data:`BATCH_PIXELS_GPU` pixels per batch, between 2
   and 16; on CPU workers about :data:`BATCH_PIXELS_CPU`, between 2 and 8: a CPU step costs
   about the same per image at any batch (a base-16 U-Net at 256²: 135 ms an image at batch 4,
   167 ms at batch 8 on the 2-core box), so smaller batches give more steps in the same time.
4. **Flips.**  Off where the fingerprint finds a class whose share differs 2x between the top
   and bottom thirds (vertical flips and rot90) or the left and right thirds (horizontal flips
   and rot90): sky above road, for instance.
5. **Rare classes.**  A class under :data:`RARE_SHARE` of the pixels turns on automatic class
   weights (multi-label: positive weights) with a Dice term in the loss.
6. **Model.**  Depth 4 when the shorter training side keeps at least :data:`MIN_BOTTOM` pixels
   at the bottom of the U (96 px and up), else 3; base width 16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

TARGET_SIDE = 256       # crops and resizes aim at about this many pixels a side
LARGE_SIDE = 600        # a side above it is large: crop rather than train whole
VARY_RATIO = 1.25       # sides that differ more than this vary
BATCH_PIXELS_GPU = 8 * 256 * 256
BATCH_PIXELS_CPU = 4 * 256 * 256
MIN_BOTTOM = 6          # pixels the shorter side keeps after the U-Net's last down-sampling
RARE_SHARE = 0.02


@dataclass
class Plan:
    """``config``: a ``TrainConfig`` fragment (nested dicts); ``reasons``: why, in order;
    ``keys``: the dotted keys each reason decided (empty for a reason that sets nothing)."""

    config: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    keys: list[tuple[str, ...]] = field(default_factory=list)

    def set(self, dotted: str, value: Any, reason: str | None = None) -> None:
        """Set ``dotted`` to ``value``; ``reason`` None: it belongs to the previous reason."""
        node = self.config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        if reason is None:
            self.keys[-1] += (dotted,)
        else:
            self.reasons.append(reason)
            self.keys.append((dotted,))

    def note(self, reason: str) -> None:
        """A decision that keeps the defaults (it sets no key)."""
        self.reasons.append(reason)
        self.keys.append(())


def _down16(side: float) -> int:
    return max(16, int(side) // 16 * 16)


def plan_from(fingerprint: dict[str, Any], *, gpu: bool = False) -> Plan:
    """The plan for the dataset ``fingerprint`` describes (rules in the module docstring), for
    GPU workers when ``gpu``, else CPU workers."""
    if not fingerprint.get("images"):
        raise ValueError("the fingerprint counts no usable image/mask pair: nothing to plan "
                         "from (see validate's report and quarantine)")
    plan = Plan()
    side = _geometry(plan, fingerprint["sizes"])
    _normalisation(plan, fingerprint)
    pixels, most = (BATCH_PIXELS_GPU, 16) if gpu else (BATCH_PIXELS_CPU, 8)
    batch = min(most, max(2, round(pixels / (side[0] * side[1]))))
    plan.set("batch_size", batch, f"batch {batch}: about {pixels // 65536} x 256² pixels a batch "
                                  f"at {side[0]}x{side[1]}, at most {most}, on "
                                  f"{'GPU' if gpu else 'CPU'} workers")
    _flips(plan, fingerprint["position"])
    _rare(plan, fingerprint)
    depth = 4 if min(side) >= MIN_BOTTOM * 2 ** 4 else 3
    plan.set("model.depth", depth, f"depth {depth}: training sides {side[0]}x{side[1]}")
    plan.set("model.base_width", 16, "base width 16: the default U-Net")
    return plan


def _geometry(plan: Plan, sizes: dict[str, Any]) -> tuple[int, int]:
    """Crop, resize or full size; returns the training H x W."""
    (h_min, w_min), (h_max, w_max) = sizes["min"], sizes["max"]
    span = f"{min(h_min, w_min)}-{max(h_max, w_max)} px"
    varies = max(h_max / h_min, w_max / w_min) > VARY_RATIO
    large = max(h_max, w_max) > LARGE_SIDE
    if varies or large:
        short = min(sizes["p10"])
        crop = _down16(min(TARGET_SIDE, short))
        why = "vary" if varies else "are large"
        if varies and large:
            why = "vary and are large"
        plan.set("augment.crop", crop, f"crop {crop}: images are {span} and {why}")
        plan.set("preprocessing.tile_size", crop, f"tile {crop}: inference tiles at the crop")
        return crop, crop
    height, width = sizes["median"]
    if height * width > 1.5 * TARGET_SIDE ** 2:
        scale = math.sqrt(TARGET_SIDE ** 2 / (height * width))
        resize = [_down16(height * scale + 8), _down16(width * scale + 8)]
        plan.set("preprocessing.resize", resize,
                 f"resize {resize[0]}x{resize[1]}: images are all about {height}x{width}; "
                 f"{scale:.2f}x keeps the aspect at about {TARGET_SIDE}² pixels")
        return resize[0], resize[1]
    plan.note(f"full size: images are all about {height}x{width}")
    return height, width


def _normalisation(plan: Plan, fingerprint: dict[str, Any]) -> None:
    mean, std = fingerprint["mean"], [max(s, 1e-3) for s in fingerprint["std"]]
    channels = 3 if len(mean) >= 3 else 1   # alpha is dropped: RGBA -> 3, grey + alpha -> 1
    mean, std = mean[:channels], std[:channels]
    plan.set("preprocessing.channels", channels, f"{channels} channel(s): the data's own")
    plan.set("model.in_channels", channels)
    plan.set("preprocessing.mean", mean, f"normalise by the data's mean {_fmt(mean)} and std "
                                         f"{_fmt(std)}")
    plan.set("preprocessing.std", std)


def _flips(plan: Plan, position: dict[str, Any]) -> None:
    vertical, horizontal = position["vertical_classes"], position["horizontal_classes"]
    if vertical:
        plan.set("augment.vflip", False, f"no vertical flips: {', '.join(vertical)} differ "
                                         f"between the top and bottom of the images")
    if horizontal:
        plan.set("augment.hflip", False, f"no horizontal flips: {', '.join(horizontal)} differ "
                                         f"between the left and right of the images")
    if vertical or horizontal:
        plan.set("augment.rot90", False, "no rot90: the classes depend on position")
    else:
        plan.note("flips and rot90 on: no class depends on its position")


def _rare(plan: Plan, fingerprint: dict[str, Any]) -> None:
    names, shares = fingerprint["class_names"], fingerprint["class_share"]
    rare = [f"{n} {s:.1%}" for n, s in zip(names, shares) if s < RARE_SHARE]
    multilabel = fingerprint.get("multilabel", False)
    if not rare:
        plan.note(f"no class weights: every class has {RARE_SHARE:.0%} of the pixels or more")
        return
    key, loss = ("pos_weight", "bce_dice") if multilabel else ("class_weights", "dice_ce")
    plan.set(key, "auto", f"{key} auto: rare classes ({', '.join(rare)} of the pixels)")
    plan.set("loss", loss, f"loss {loss}: its Dice term weighs small classes like large ones")


def _fmt(values: list[float]) -> str:
    return "/".join(f"{v:.3f}" for v in values)
