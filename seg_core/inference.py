"""The one pre/post-processing path, shared by validation, batch prediction and Serve.

``image (H x W x C array) -> prepare_image -> tiled model -> probabilities -> Prediction``.

Keeping all three callers on this module is what guarantees parity: the numbers reported at
validation are the numbers a client gets from the endpoint for the same bytes.

- Multi-class: softmax over K; ``mask`` = argmax (uint8 H x W), ``confidence`` = max probability,
  ``entropy`` = Shannon entropy / log K, in [0, 1].
- Multi-label: independent sigmoids; ``mask`` = ``p >= 0.5`` (uint8 K x H x W),
  ``confidence`` = the least certain class decision ``min_k max(p_k, 1 - p_k)``,
  ``entropy`` = mean binary entropy / log 2, in [0, 1].

Tiles are blended in probability space (a convex combination keeps them valid probabilities),
and so are the flip test-time augmentations.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seg_core.artifact import Artifact
from seg_core.codecs import encode_png
from seg_core.config import MaskSpec, Preprocessing
from seg_core.errors import InputError
from seg_core.tiling import sliding_window_many

# ITU-R BT.601 luma, the same weights PIL uses for RGB -> L.
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
# Flip dims of a C x H x W tensor used for test-time augmentation (each is its own inverse).
_TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,))


@dataclass(frozen=True)
class Prediction:
    """Model output for one image, at the input's H x W (CPU NumPy arrays)."""

    probs: np.ndarray       # K x H x W float32
    mask: np.ndarray        # H x W uint8 class ids, or K x H x W uint8 {0, 1} (multi-label)
    confidence: np.ndarray  # H x W float32 in [0, 1]
    entropy: np.ndarray     # H x W float32 in [0, 1]


def prepare_image(image: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """H x W x C (or H x W) uint8/uint16/bool/float array -> normalised float32 C x H' x W'.

    Steps: scale by the dtype's range (floats are taken as already in [0, 1]); drop alpha;
    grey <-> RGB to ``pre.channels``; bilinear resize (antialiased when shrinking, as
    ``transforms.Resize``) to ``pre.resize`` if set;
    ``(x - mean) / std``.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise InputError("bad_channels", f"expected an H x W x C image with C in 1..4, got "
                         f"shape {arr.shape}", hint="pass grey, grey+alpha, RGB or RGBA pixels")
    x = torch.from_numpy(_to_unit_float(arr)).permute(2, 0, 1)  # C x H x W
    if x.shape[0] in (2, 4):  # drop alpha
        x = x[:-1]
    if pre.channels == 1 and x.shape[0] == 3:
        x = (x * _LUMA).sum(dim=0, keepdim=True)
    elif pre.channels == 3 and x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    if pre.resize is not None and tuple(x.shape[-2:]) != tuple(pre.resize):
        shrinking = pre.resize[0] < x.shape[1] or pre.resize[1] < x.shape[2]  # as transforms.Resize
        x = F.interpolate(x[None], size=tuple(pre.resize), mode="bilinear", align_corners=False,
                          antialias=shrinking)[0]
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(-1, 1, 1)
    return ((x - mean) / std).contiguous()


def _to_unit_float(arr: np.ndarray) -> np.ndarray:
    """Pixels scaled to [0, 1] float32 by their dtype's range."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == np.bool_ or arr.dtype.kind == "f":
        return arr.astype(np.float32)
    raise InputError("unsupported_format", f"pixel type {arr.dtype} is not supported",
                     hint="pass uint8, uint16 or float images in [0, 1]")


class Segmenter:
    """Loads nothing itself: wraps an :class:`Artifact` (or a live model) for prediction.

    ``device`` is where the model runs; stitching and post-processing stay on the CPU.  The model
    is moved to ``device`` and put in eval mode (training loops call ``model.train()`` again).
    """

    def __init__(self, artifact: Artifact, device: str | torch.device = "cpu", tta: bool = False,
                 batch_size: int = 4, channels_last: bool = True) -> None:
        self._init(artifact.model, artifact.mask_spec, artifact.preprocessing, device, tta,
                   batch_size, channels_last)

    @classmethod
    def from_model(cls, model: nn.Module, mask_spec: MaskSpec, preprocessing: Preprocessing, *,
                   device: str | torch.device = "cpu", tta: bool = False,
                   batch_size: int = 4, channels_last: bool = False) -> "Segmenter":
        """A segmenter around a model in memory (validation during training uses this).

        ``channels_last`` defaults to off here: it re-lays the caller's parameters in place.
        """
        segmenter = cls.__new__(cls)
        segmenter._init(model, mask_spec, preprocessing, device, tta, batch_size, channels_last)
        return segmenter

    def _init(self, model: nn.Module, mask_spec: MaskSpec, preprocessing: Preprocessing,
              device: str | torch.device, tta: bool, batch_size: int,
              channels_last: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"Segmenter: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        # NHWC convolutions: 1.1-1.8x faster inference than NCHW on the CPUs measured here
        # (README, benchmarks), and the layout GPUs want for bf16 tensor cores.
        self.channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=memory_format).eval()
        self.mask_spec = mask_spec
        self.preprocessing = preprocessing
        _warn_if_tile_exceeds_training(preprocessing)
        self.tta = tta
        self.batch_size = batch_size

    def predict(self, image: np.ndarray) -> Prediction:
        """Prediction for one H x W x C image, returned at the same H x W."""
        return self.predict_batch([image])[0]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predictions for images of any (mixed) sizes, in order, from shared forwards.

        The windows of all images go through the model together, ``batch_size`` per forward,
        so eight small images of one size cost one forward with ``batch_size=8``, not eight
        (windows of different shapes never share a forward: see ``seg_core.tiling``).  With
        ``preprocessing.resize`` every image has the same shape after resizing.  Each image is
        stitched, resized back and post-processed on its own, exactly as a batch of one; only
        the forward's batch composition differs, which moves probabilities by float rounding
        at most.  (On the CPUs measured here, 4 tiles of 256^2 per forward ran 1.27x faster per
        image than 16: larger batches only pay on GPUs.)
        """
        if not images:
            return []
        sizes = [np.asarray(image).shape[:2] for image in images]
        inputs = [prepare_image(image, self.preprocessing) for image in images]  # C x h x w
        flips = _TTA_FLIPS if self.tta else ((),)
        summed: list[torch.Tensor] = []
        for dims in flips:  # average in probability space, each flip undone before adding
            outputs = self._tiled_probs([x.flip(dims) if dims else x for x in inputs])
            outputs = [out.flip(dims) if dims else out for out in outputs]
            summed = outputs if not summed else [a + b for a, b in zip(summed, outputs)]
        predictions = []
        for probs, (height, width) in zip(summed, sizes):
            probs = probs / len(flips)  # K x h x w
            if tuple(probs.shape[-2:]) != (height, width):
                probs = F.interpolate(probs[None], size=(height, width), mode="bilinear",
                                      align_corners=False)[0]
            predictions.append(_finish(probs.float().clamp_(0.0, 1.0), self.mask_spec.multilabel))
        return predictions

    def predict_each(self, images: Sequence[np.ndarray],
                     catch: tuple[type[BaseException], ...] = (InputError,)
                     ) -> list[Prediction | BaseException]:
        """:meth:`predict_batch`, except that an image raising one of ``catch`` gets that
        exception in its slot while the others are still predicted (then one at a time)."""
        try:
            return list(self.predict_batch(images))
        except catch:
            pass
        results: list[Prediction | BaseException] = []
        for image in images:
            try:
                results.append(self.predict(image))
            except catch as error:
                results.append(error)
        return results

    def _tiled_probs(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Probabilities K x h x w per input, on the CPU; tiles run on ``self.device``."""
        pre = self.preprocessing
        return sliding_window_many(self._predict_tiles, inputs, tile=pre.inference_window(),
                                   overlap=pre.tile_overlap, num_out=self.mask_spec.num_classes,
                                   batch_size=self.batch_size, blend="gaussian",
                                   device=self.device)

    def _predict_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """N x C x h x w windows on ``self.device`` -> N x K x h x w probabilities (same device)."""
        tiles = tiles.float()
        if self.channels_last:
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        logits = self.model(tiles)
        return torch.sigmoid(logits) if self.mask_spec.multilabel else logits.softmax(dim=1)


def _warn_if_tile_exceeds_training(pre: Preprocessing) -> None:
    """Say why a ``tile_size`` larger than what training saw is clipped (it is never used)."""
    geometry, tile = pre.training_geometry(), pre.tile_hw
    if geometry and tile and (tile[0] > geometry[0] or tile[1] > geometry[1]):
        window = pre.inference_window()
        warnings.warn(f"tile_size {tile[0]}x{tile[1]} is larger than the {geometry[0]}x"
                      f"{geometry[1]} inputs the network saw in training; inference uses "
                      f"{window[0]}x{window[1]} windows instead, because a larger window moves "
                      f"the image borders and changes the masks", stacklevel=3)


def _finish(probs: torch.Tensor, multilabel: bool) -> Prediction:
    """K x H x W probabilities -> Prediction with mask, confidence and normalised entropy."""
    num_classes = probs.shape[0]
    plogp = torch.special.xlogy(probs, probs)  # 0 log 0 = 0
    if multilabel:
        mask = (probs >= 0.5).to(torch.uint8)
        confidence = torch.maximum(probs, 1 - probs).amin(dim=0)
        binary = -(plogp + torch.special.xlogy(1 - probs, 1 - probs))  # K x H x W, nats
        entropy = binary.mean(dim=0) / math.log(2)
    else:
        confidence, mask = probs.max(dim=0)
        mask = mask.to(torch.uint8)
        entropy = -plogp.sum(dim=0) / math.log(num_classes) if num_classes > 1 else \
            torch.zeros_like(confidence)
    return Prediction(probs=probs.numpy(), mask=mask.numpy(),
                      confidence=confidence.numpy().astype(np.float32),
                      entropy=entropy.clamp(0.0, 1.0).numpy().astype(np.float32))


def encode_prediction(pred: Prediction, spec: MaskSpec,
                      with_confidence: bool = True) -> dict[str, Any]:
    """Serialisable view of a prediction (for Parquet rows and HTTP responses).

    - ``mask_png``: class ids as a grey PNG; for multi-label, a bit field (bit k = class k;
      uint16 PNG when K > 8).
    - ``class_mask_pngs``: one binary PNG (0/255) per class, in class order.
    - ``class_pixel_counts``: pixels per class (list of int, length K).
    - ``mean_confidence``: float; ``confidence_png``: confidence * 255 as uint8 PNG, or None.
    - ``class_mean_confidence``: per class (length K).  Multi-label: the mean over all pixels
      of how sure class k's own on/off decision is, ``max(p_k, 1 - p_k)``.  Multi-class: the
      mean confidence over the pixels assigned to class k (None where it has none).
    """
    k = spec.num_classes
    if spec.multilabel:
        planes = pred.mask.astype(bool)  # K x H x W
        weights = (1 << np.arange(k, dtype=np.int64)).reshape(k, 1, 1)
        ids = (planes * weights).sum(axis=0).astype(np.uint16 if k > 8 else np.uint8)
    else:
        ids = pred.mask
        planes = ids[None] == np.arange(k, dtype=ids.dtype).reshape(k, 1, 1)
    if spec.multilabel:
        decided = np.maximum(pred.probs, 1.0 - pred.probs).reshape(k, -1)
        class_confidence: list[float | None] = [float(v) for v in decided.mean(axis=1)]
    else:
        sums = np.bincount(ids.ravel(), weights=pred.confidence.ravel(), minlength=k)[:k]
        counts = np.bincount(ids.ravel(), minlength=k)[:k]
        class_confidence = [float(s / n) if n else None for s, n in zip(sums, counts)]
    confidence_png = None
    if with_confidence:
        confidence_png = encode_png(np.rint(pred.confidence * 255).astype(np.uint8))
    return {
        "mask_png": encode_png(ids),
        "class_mask_pngs": [encode_png(plane.astype(np.uint8) * 255) for plane in planes],
        "class_pixel_counts": [int(n) for n in planes.reshape(k, -1).sum(axis=1)],
        "mean_confidence": float(pred.confidence.mean()) if pred.confidence.size else 0.0,
        "class_mean_confidence": class_confidence,
        "confidence_png": confidence_png,
    }
