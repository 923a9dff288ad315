"""Choosing what to label next: per-image uncertainty, a cheap image embedding, and a ranking
that keeps near-duplicates out of one labelling batch.

- :func:`uncertainty_score` turns one prediction into a number, higher = less sure:
  ``entropy`` (the mean normalised entropy, in [0, 1]), ``margin`` (the mean of
  ``1 - (p1 - p2)``, the two most likely classes; multi-label: ``1 - |2p - 1|`` per class), or
  ``tta`` (the disagreement of predictions under symmetries of the square, from
  :func:`tta_masks`).
- ``balanced_entropy`` is a score of an image *within a pool*: :func:`class_entropy` splits each
  image's pixel entropy over the classes by their probabilities, and :func:`balanced_scores`
  weighs each class's part by the inverse of its share of the pool's predicted pixels
  (median-frequency weights, the ones ``class_weights: auto`` gives training), so an unsure
  small object of a rare class is not drowned by the long, mildly unsure edges of the common
  ones (class-balanced acquisition, as in Cai et al., "Revisiting Superpixels for Active
  Learning in Semantic Segmentation with Realistic Annotation Costs", CVPR 2021).
- :func:`embedding`: the U-Net's bottleneck features (the deepest encoder stage), averaged
  over the image and L2-normalised: no second network, one forward per inference window.
- :func:`rank`: indices by descending score, skipping any image whose embedding lies within
  cosine distance ``min_distance`` of one already picked, so that ten copies of one confusing
  image do not fill a batch of ten.

Why: labelling budget goes furthest on images the model is unsure about and that differ from
each other (uncertainty plus diversity, as in core-set and BADGE-style selection, with a greedy
threshold instead of a clustering).

Limits: ``entropy``, ``margin`` and ``tta`` are means over pixels, so a small uncertain object
in a large confident image scores low (``balanced_entropy`` answers that for rare classes, not
for a small object of a common one); the embedding comes from the torch network
(``segmenter.model``) whatever engine the segmenter predicts with, and it sees every window at
once only through the average (a near-duplicate of one tile of a large image is not recognised
as one).  The TTA symmetries are
the 8 of the square (flips and 90-degree rotations) for a square image and the 4 flips
(identity, horizontal, vertical, both) otherwise; the network is not trained to be invariant to
them, so part of the disagreement is the network's own orientation bias, the same for every
image, and scores compare images, not models.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from seg_core.config import ScoreKind
from seg_core.explain import inference_windows
from seg_core.inference import Prediction, Segmenter, prepare_image


# A symmetry of the square as (quarter turns, mirror first): the image is mirrored left-right
# when ``mirror``, then turned ``k`` quarter turns.  The 4 flips keep any H x W; all 8 need H == W.
Symmetry = tuple[int, bool]
FLIPS: tuple[Symmetry, ...] = ((0, False), (0, True), (2, True), (2, False))
SQUARE: tuple[Symmetry, ...] = tuple((k, mirror) for k in range(4) for mirror in (False, True))


def uncertainty_score(prediction_or_probs: Prediction | np.ndarray, *, by: ScoreKind = "entropy",
                      multilabel: bool | None = None) -> float:
    """One image's uncertainty, higher = less sure.

    ``prediction_or_probs``:

    - for ``entropy`` and ``margin``: a :class:`Prediction` (``entropy`` needs its ``entropy``
      or ``probs`` field, ``margin`` its ``probs``) or K x H x W probabilities;
    - for ``tta``: T x H x W (or T x K x H x W multi-label) integer masks, one per symmetry, in
      the image's own orientation (:func:`tta_masks`).

    ``multilabel`` says how K x H x W probabilities are read (independent sigmoids rather than a
    softmax); a Prediction says it itself (a K x H x W mask), and None means multi-class.
    """
    if by == "tta":
        return _disagreement(np.asarray(prediction_or_probs))
    if by == "balanced_entropy":
        raise ValueError("uncertainty_score: balanced_entropy scores an image within a pool: "
                         "take class_entropy of each image, then balanced_scores of them all")
    if by not in ("entropy", "margin"):
        raise ValueError(f"uncertainty_score: by must be 'entropy', 'margin' or 'tta', got {by!r}")
    if isinstance(prediction_or_probs, Prediction):
        pred = prediction_or_probs
        multilabel = pred.mask.ndim == 3
        if by == "entropy" and pred.entropy is not None:
            return float(pred.entropy.mean())
        if pred.probs is None:
            raise ValueError(f"uncertainty_score: by={by!r} needs the prediction's probs; "
                             f"predict with fields including 'probs'")
        probs = pred.probs
    else:
        probs = np.asarray(prediction_or_probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError(f"uncertainty_score: expected K x H x W probabilities, got shape "
                         f"{probs.shape}")
    probs = np.clip(probs.astype(np.float64), 0.0, 1.0)
    if by == "entropy":
        return float(_entropy(probs, bool(multilabel)).mean())
    if multilabel:
        return float((1.0 - np.abs(2.0 * probs - 1.0)).mean())
    if probs.shape[0] < 2:
        return 0.0
    top2 = np.partition(probs, -2, axis=0)[-2:]   # 2 x H x W: runner-up, most likely
    return float((1.0 - (top2[1] - top2[0])).mean())


def class_entropy(prediction_or_probs: Prediction | np.ndarray, *,
                  multilabel: bool | None = None) -> np.ndarray:
    """2 x K float64 for one image: row 0, per class, the mean over pixels of the pixel's
    normalised entropy times the class's probability there (the pixel's doubt, shared out over
    the classes in play); row 1, per class, the mean probability (the class's predicted share
    of the image).  Rows of many images go to :func:`balanced_scores`.

    Multi-label: the pixel's doubt is the mean binary entropy over the classes, as in
    :func:`uncertainty_score`.  Needs probabilities (a Prediction predicted with ``probs``).
    """
    if isinstance(prediction_or_probs, Prediction):
        if prediction_or_probs.probs is None:
            raise ValueError("class_entropy: needs the prediction's probs; predict with fields "
                             "including 'probs'")
        multilabel = prediction_or_probs.mask.ndim == 3
        probs = prediction_or_probs.probs
    else:
        probs = prediction_or_probs
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    if probs.ndim != 3:
        raise ValueError(f"class_entropy: expected K x H x W probabilities, got shape "
                         f"{probs.shape}")
    doubt = _entropy(probs, bool(multilabel))                   # H x W
    flat = probs.reshape(len(probs), -1)
    return np.stack([flat @ doubt.reshape(-1) / flat.shape[1], flat.mean(axis=1)])


def balanced_scores(parts: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """``balanced_entropy`` of N images from their :func:`class_entropy` rows (N x 2 x K): per
    image, the sum over classes of its class doubt times the class's weight,
    ``median(f) / f_c`` where ``f_c`` is the class's predicted share averaged over the N images
    (each image counts the same, whatever its size; a class no image predicts weighs 0).
    Higher = less sure; the scores rank images of this pool against each other, not across
    pools."""
    parts = np.asarray(parts, dtype=np.float64)
    if parts.ndim != 3 or parts.shape[1] != 2:
        raise ValueError(f"balanced_scores: expected N x 2 x K class_entropy rows, got shape "
                         f"{parts.shape}")
    if not len(parts):
        return np.zeros(0)
    mass = parts[:, 1].sum(axis=0)
    share = mass / max(float(mass.sum()), 1e-300)
    present = share > 0
    weights = np.zeros_like(share)
    if present.any():
        weights[present] = np.median(share[present]) / share[present]
    return parts[:, 0] @ weights


def symmetries(height: int, width: int) -> tuple[Symmetry, ...]:
    """The symmetries :func:`tta_masks` uses for an ``height x width`` image: 8 if square, else 4."""
    return SQUARE if height == width else FLIPS


def tta_masks(segmenter: Segmenter, image: np.ndarray) -> np.ndarray:
    """The segmenter's masks of ``image`` under each of :func:`symmetries`, each turned back to
    the image's orientation: T x H x W (multi-label T x K x H x W) uint8.  One
    :meth:`Segmenter.predict_batch` (the transformed images share forwards)."""
    arr = np.asarray(image)
    group = symmetries(*arr.shape[:2])
    moved = [np.ascontiguousarray(_apply(arr, g)) for g in group]
    masks = [_undo(p.mask, g) for p, g in
             zip(segmenter.predict_batch(moved, fields=frozenset({"mask"})), group)]
    return np.stack(masks)


def tta_disagreement(segmenter: Segmenter, image: np.ndarray) -> float:
    """Mean over pixels of the fraction of symmetries whose class differs from the majority
    (0: all agree; at most ``1 - 1/T``): ``uncertainty_score(tta_masks(...), by="tta")``."""
    return uncertainty_score(tta_masks(segmenter, image), by="tta")


def embedding(segmenter: Segmenter, image: np.ndarray) -> np.ndarray:
    """A D float32 unit vector for ``image``: the deepest encoder stage's output (the U-Net's
    bottleneck, ``segmenter.model.encoder[-1]``) averaged over positions, over the inference
    windows (weighted by window area), then L2-normalised.  D is the bottleneck width."""
    model = segmenter.model
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.ModuleList) or len(encoder) == 0:
        raise ValueError(f"embedding: expected a seg_core U-Net with an encoder, got "
                         f"{type(model).__name__}")
    pooled: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        pooled.append(output.float().mean(dim=(-2, -1))[0].cpu())   # D

    x = prepare_image(image, segmenter.preprocessing)   # C x h x w
    windows = inference_windows(*x.shape[-2:], segmenter.preprocessing)
    hook = encoder[-1].register_forward_hook(keep)
    try:
        with torch.inference_mode():
            for y0, x0, h, w in windows:
                model(x[None, :, y0:y0 + h, x0:x0 + w].to(segmenter.device))
    finally:
        hook.remove()
    areas = torch.tensor([h * w for _, _, h, w in windows], dtype=torch.float32)
    vector = (torch.stack(pooled) * areas[:, None]).sum(dim=0) / areas.sum()
    return (vector / vector.norm().clamp_min(1e-12)).numpy().astype(np.float32)


def rank(scores: Sequence[float] | np.ndarray, embeddings: np.ndarray, top: int, *,
         min_distance: float = 1e-3) -> list[int]:
    """Up to ``top`` indices to label, by descending score (ties: lower index first).

    Greedy: walk the images from the most uncertain down and pick one unless its cosine
    distance (``1 - cosine similarity`` of the embeddings) to an image already picked is below
    ``min_distance``: such a near-duplicate is skipped, not deferred.  Fewer than ``top`` come
    back when the rest are near-duplicates.

    The default, 1e-3 (similarity above 0.999), is small because the embedding's features are
    non-negative (pooled after a ReLU), so all images share a large common direction.  On the
    tests' synthetic scenes (tiny U-Net, tests/seg_core/test_explain.py) an image and its copy
    were 0 apart, a copy with noise of 3 grey levels 5e-5, shifted 2 pixels 3e-4, mirrored 7e-4;
    different scenes of the same two shapes 2e-3 to 0.11.  The margin is narrow and depends on
    the model and the data: look at the pool's nearest-neighbour distances before trusting it;
    a larger threshold trades uncertainty for diversity.
    """
    scores = np.asarray(scores, dtype=np.float64)
    vectors = np.asarray(embeddings, dtype=np.float64)
    if scores.ndim != 1 or vectors.ndim != 2 or len(scores) != len(vectors):
        raise ValueError(f"rank: expected N scores and N x D embeddings, got shapes "
                         f"{scores.shape} and {vectors.shape}")
    if top < 0 or not 0.0 <= min_distance <= 2.0 or math.isnan(min_distance):
        raise ValueError(f"rank: need top >= 0 and 0 <= min_distance <= 2, got top={top}, "
                         f"min_distance={min_distance}")
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    picked: list[int] = []
    for index in np.argsort(-scores, kind="stable"):
        if len(picked) == top:
            break
        if picked and (1.0 - vectors[picked] @ vectors[index]).min() < min_distance:
            continue   # a near-duplicate of an image already picked
        picked.append(int(index))
    return picked


def _entropy(probs: np.ndarray, multilabel: bool) -> np.ndarray:
    """H x W entropy in [0, 1] of K x H x W probabilities, as the segmenter normalises it."""
    def plogp(p: np.ndarray) -> np.ndarray:
        return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)

    if multilabel:
        binary = -(plogp(probs) + plogp(1.0 - probs))
        return binary.mean(axis=0) / math.log(2)
    if probs.shape[0] < 2:
        return np.zeros(probs.shape[1:])
    return np.clip(-plogp(probs).sum(axis=0) / math.log(probs.shape[0]), 0.0, 1.0)


def _disagreement(masks: np.ndarray) -> float:
    """Mean over positions of ``1 - (votes for the most common label) / T`` for T x ... masks."""
    if masks.ndim < 3 or masks.shape[0] < 1:
        raise ValueError(f"uncertainty_score: by='tta' expects T x H x W masks, got shape "
                         f"{masks.shape}")
    majority = np.zeros(masks.shape[1:], dtype=np.int64)
    for label in np.unique(masks):
        np.maximum(majority, (masks == label).sum(axis=0), out=majority)
    return float((1.0 - majority / masks.shape[0]).mean())


def _apply(image: np.ndarray, g: Symmetry) -> np.ndarray:
    """H x W [x C] image moved by ``g``: mirror left-right, then ``k`` quarter turns."""
    turns, mirror = g
    moved = np.flip(image, axis=1) if mirror else image
    return np.rot90(moved, turns, axes=(0, 1))


def _undo(mask: np.ndarray, g: Symmetry) -> np.ndarray:
    """A [K x] H x W mask of a moved image, back in the image's orientation."""
    turns, mirror = g
    back = np.rot90(mask, -turns, axes=(-2, -1))
    return np.flip(back, axis=-1) if mirror else back
