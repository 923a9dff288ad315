"""Segmentation losses on logits, all built through :func:`build_loss`.

Shapes (``N`` batch, ``K`` classes):

- multi-class (``ce``, ``dice``, ``dice_ce``, ``focal``): ``logits`` float ``N,K,H,W``;
  ``target`` integer ``N,H,W`` with values in ``0..K-1`` or ``ignore_index``.  Softmax over ``K``.
- multi-label (``bce``, ``bce_dice``): ``logits`` float ``N,K,H,W``; ``target`` float or uint8
  ``N,K,H,W`` with values in ``{0, 1}``, or ``ignore_index`` for a pixel-channel to skip.  Each
  class is its own sigmoid channel, so classes may overlap.

Every loss returns a scalar.  Ignored pixels contribute nothing; a batch where every pixel is
ignored gives ``0`` (with a gradient path), not ``nan``.  ``class_weights`` (length ``K``) weight
each pixel by its target class for ``ce``/``focal`` (a weighted mean, as in
``F.cross_entropy(weight=...)``), each channel for ``bce``, and each class's term in the mean over
classes for the Dice parts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seg_core.config import LOSS_NAMES, MULTILABEL_LOSSES, LossName


class SegLoss(nn.Module):
    """Base class: validates shapes and labels, holds ``class_weights`` as a buffer."""

    multilabel: bool = False

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"loss: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if weights.numel() != num_classes or bool((weights < 0).any()):
                raise ValueError(
                    f"loss: class_weights must be {num_classes} non-negative numbers, got "
                    f"{weights.tolist()}"
                )
        self.register_buffer("class_weights", weights)

    def _check(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate inputs; return ``(valid, safe_target)`` where ignored labels are zeroed.

        ``valid`` is bool ``N,H,W`` (multi-class) or ``N,K,H,W`` (multi-label).
        """
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: expected logits N,{self.num_classes},H,W, got "
                f"{tuple(logits.shape)}"
            )
        n, k, h, w = logits.shape
        expected = (n, k, h, w) if self.multilabel else (n, h, w)
        if tuple(target.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: expected target of shape {expected} for logits "
                f"{tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        valid = target != self.ignore_index
        if self.multilabel:
            bad = valid & (target != 0) & (target != 1)
            allowed = f"0, 1 or ignore_index={self.ignore_index}"
        else:
            if target.is_floating_point():
                raise ValueError(
                    f"{type(self).__name__}: expected integer target, got {target.dtype}"
                )
            bad = valid & ((target < 0) | (target >= k))
            allowed = f"0..{k - 1} or ignore_index={self.ignore_index}"
        if bool(bad.any()):
            found = torch.unique(target[bad])[:5].tolist()
            raise ValueError(f"{type(self).__name__}: target values must be {allowed}, got {found}")
        safe = torch.where(valid, target, torch.zeros_like(target))
        # class ids as int64 whatever the stored type: a uint8 tensor used as an index is a
        # boolean mask to torch (the training cache keeps masks as uint8)
        return valid, (safe if self.multilabel else safe.long())

    def _weighted_mean(self, per_item: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum(w * x) / sum(w)``, or a zero that keeps the graph when ``sum(w) == 0``."""
        total = weights.sum()
        return (per_item * weights).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)

    def _pixel_weights(self, valid: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
        """Per-pixel weight: 0 where ignored, else the class weight of the target (or 1)."""
        weights = valid.float()
        if self.class_weights is not None:
            weights = weights * self.class_weights[safe]
        return weights

    def _class_mean(self, per_class: torch.Tensor) -> torch.Tensor:
        """Mean of a ``K`` vector, weighted by ``class_weights`` when given."""
        if self.class_weights is None:
            return per_class.mean()
        return self._weighted_mean(per_class, self.class_weights)


class CrossEntropyLoss(SegLoss):
    """Softmax cross-entropy, weighted mean over non-ignored pixels."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, safe = self._check(logits, target)
        per_pixel = F.cross_entropy(logits.float(), safe.long(), reduction="none")  # N,H,W
        return self._weighted_mean(per_pixel, self._pixel_weights(valid, safe))


class FocalLoss(SegLoss):
    """Softmax focal loss ``-(1 - p_t)**gamma * log p_t``; ``gamma=0`` equals cross-entropy."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        gamma: float = 2.0,
    ) -> None:
        super().__init__(num_classes, ignore_index, class_weights)
        if gamma < 0:
            raise ValueError(f"FocalLoss: gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, safe = self._check(logits, target)
        log_p = F.log_softmax(logits.float(), dim=1)
        log_pt = log_p.gather(1, safe.long().unsqueeze(1)).squeeze(1)  # N,H,W
        per_pixel = -((1.0 - log_pt.exp()) ** self.gamma) * log_pt
        return self._weighted_mean(per_pixel, self._pixel_weights(valid, safe))


class DiceLoss(SegLoss):
    """Soft Dice ``1 - (2|P.T| + s) / (|P| + |T| + s)`` per class over the whole batch, then
    the (weighted) mean over classes.  Softmax probabilities; sigmoid when ``multilabel``."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        smooth: float = 1.0,
        multilabel: bool = False,
    ) -> None:
        super().__init__(num_classes, ignore_index, class_weights)
        if smooth < 0:
            raise ValueError(f"DiceLoss: smooth must be >= 0, got {smooth}")
        self.smooth = smooth
        self.multilabel = multilabel

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, safe = self._check(logits, target)
        if self.multilabel:
            probs = logits.float().sigmoid()
            truth = safe.float()
            keep = valid.float()  # N,K,H,W
        else:
            probs = logits.float().softmax(dim=1)
            truth = F.one_hot(safe.long(), self.num_classes).permute(0, 3, 1, 2).float()
            keep = valid.unsqueeze(1).float()  # N,1,H,W
        probs, truth = probs * keep, truth * keep
        intersection = (probs * truth).sum(dim=(0, 2, 3))  # K
        cardinality = (probs + truth).sum(dim=(0, 2, 3))  # K
        dice = (2 * intersection + self.smooth) / (cardinality + self.smooth).clamp_min(1e-12)
        return self._class_mean(1.0 - dice)


class BCELoss(SegLoss):
    """Multi-label sigmoid binary cross-entropy, mean over non-ignored pixel-channels.

    ``pos_weight`` (length ``K``) multiplies the loss of each class's *positive* pixels, as in
    ``F.binary_cross_entropy_with_logits(pos_weight=...)``: a class that is on in 1% of the
    pixels gets its recall back with a weight near its negatives/positives ratio.
    """

    multilabel = True

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        pos_weight: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__(num_classes, ignore_index, class_weights)
        weights = None
        if pos_weight is not None:
            weights = torch.as_tensor(pos_weight, dtype=torch.float32).flatten()
            if weights.numel() != num_classes or bool((weights <= 0).any()):
                raise ValueError(f"loss: pos_weight must be {num_classes} positive numbers, got "
                                 f"{weights.tolist()}")
        self.register_buffer("pos_weight", weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, safe = self._check(logits, target)
        pos_weight = None if self.pos_weight is None else self.pos_weight.view(-1, 1, 1)
        per_item = F.binary_cross_entropy_with_logits(
            logits.float(), safe.float(), reduction="none", pos_weight=pos_weight
        )  # N,K,H,W
        weights = valid.float()
        if self.class_weights is not None:
            weights = weights * self.class_weights.view(1, -1, 1, 1)
        return self._weighted_mean(per_item, weights)


class SumLoss(nn.Module):
    """Sum of several losses on the same ``(logits, target)``, e.g. Dice + CE."""

    def __init__(self, *terms: SegLoss) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.multilabel = terms[0].multilabel

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        for term in self.terms:
            total = total + term(logits, target)
        return total


def median_frequency_weights(class_pixels: Sequence[int], max_weight: float = 10.0
                             ) -> tuple[float, ...]:
    """Median-frequency class weights (Eigen & Fergus 2015, SegNet): ``median(f) / f_k``.

    ``f_k`` is class ``k``'s share of the labelled pixels.  A class at the median gets 1, rarer
    classes more (capped at ``max_weight``, since a class at 0.1% would otherwise weigh hundreds
    of times more than the background and swamp the loss), commoner ones less (floored at
    ``1 / max_weight``).  A class with no pixels gets 1: there is nothing to weigh.
    """
    counts = torch.as_tensor(list(class_pixels), dtype=torch.float64)
    if counts.numel() < 1 or bool((counts < 0).any()) or max_weight < 1:
        raise ValueError(f"median_frequency_weights: expected non-negative pixel counts and "
                         f"max_weight >= 1, got {counts.tolist()} and {max_weight}")
    present = counts > 0
    if not bool(present.any()):
        return tuple(1.0 for _ in range(counts.numel()))
    share = counts / counts.sum()
    weights = torch.ones_like(share)
    # the lower median over present classes, as torch.median: deterministic, one of the shares
    weights[present] = (share[present].median() / share[present]).clamp(1 / max_weight,
                                                                        max_weight)
    return tuple(round(float(w), 6) for w in weights)


def positive_weights(on_pixels: Sequence[int], labelled_pixels: int, max_weight: float = 10.0
                     ) -> tuple[float, ...]:
    """Multi-label ``pos_weight``: negatives / positives per class, clipped to [1, max_weight].

    ``on_pixels[k]`` counts pixels where class k is on, ``labelled_pixels`` every non-ignored
    pixel.  A class on in half the pixels or more gets 1; one on in 1% gets ``max_weight``; a class
    never on gets 1 (there is nothing to up-weight).
    """
    on = torch.as_tensor(list(on_pixels), dtype=torch.float64)
    if bool((on < 0).any()) or bool((on > labelled_pixels).any()) or max_weight < 1:
        raise ValueError(f"positive_weights: expected 0 <= on_pixels <= labelled_pixels="
                         f"{labelled_pixels} and max_weight >= 1, got {on.tolist()}, {max_weight}")
    ratio = torch.where(on > 0, (labelled_pixels - on) / on.clamp_min(1), torch.ones_like(on))
    return tuple(round(float(w), 6) for w in ratio.clamp(1.0, max_weight))


def build_loss(
    name: LossName,
    *,
    num_classes: int,
    ignore_index: int = 255,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    focal_gamma: float = 2.0,
    dice_smooth: float = 1.0,
    pos_weight: Sequence[float] | torch.Tensor | None = None,
) -> nn.Module:
    """The loss called ``name``: a module ``(logits N,K,H,W, target) -> scalar``.

    ``bce`` and ``bce_dice`` are multi-label (target ``N,K,H,W``); the rest are multi-class
    (target ``N,H,W``).  The returned module's ``multilabel`` attribute says which.
    ``pos_weight`` (multi-label only) weighs each class's positive pixels in the BCE term.
    """
    if pos_weight is not None and name not in MULTILABEL_LOSSES:
        raise ValueError(f"build_loss: pos_weight is for the multi-label losses "
                         f"{list(MULTILABEL_LOSSES)}, got loss {name!r}")
    common = {
        "num_classes": num_classes,
        "ignore_index": ignore_index,
        "class_weights": class_weights,
    }
    if name == "ce":
        return CrossEntropyLoss(**common)
    if name == "focal":
        return FocalLoss(**common, gamma=focal_gamma)
    if name == "dice":
        return DiceLoss(**common, smooth=dice_smooth)
    if name == "dice_ce":
        return SumLoss(DiceLoss(**common, smooth=dice_smooth), CrossEntropyLoss(**common))
    if name == "bce":
        return BCELoss(**common, pos_weight=pos_weight)
    if name == "bce_dice":
        return SumLoss(BCELoss(**common, pos_weight=pos_weight),
                       DiceLoss(**common, smooth=dice_smooth, multilabel=True))
    raise ValueError(f"build_loss: expected one of {list(LOSS_NAMES)}, got {name!r}")
