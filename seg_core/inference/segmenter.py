"""The :class:`Segmenter`: an artifact's network, tiled and checked against its memory budget,
image arrays in and :class:`Prediction` out; and the encoded row fields of a prediction."""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seg_core.artifact import Artifact
from seg_core.calibration import scale_probs
from seg_core.codecs import encode_png
from seg_core.config import MaskSpec, PostProcess, Preprocessing, oversized_tile
from seg_core.errors import InputError
from seg_core.inference.budget import (
    _allocation_failed,
    _groups,
    _mib,
    _size_multiple,
    activation_bytes,
    inference_bytes,
    tiles_per_forward,
)
from seg_core.inference.preprocessing import prepare_image
from seg_core.model import fold_batchnorm
from seg_core.pixels import as_hwc
from seg_core.postprocess import apply as apply_postprocess
from seg_core.runtimes import ENGINE_DIR, engine_runner, EngineKind, resolve_engine
from seg_core.tiling import forward_pixels, sliding_window_many

AmpSetting = torch.dtype | None | str   # a dtype, None (fp32), or "auto"


# Flip dims of a C x H x W tensor used for test-time augmentation (each is its own inverse).
_TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,))


# The fields a Prediction can carry.  ``mask`` and ``confidence`` are always there; ``probs``
# and ``entropy`` only when asked for (:meth:`Segmenter.predict_batch`'s ``fields``).
ALL_FIELDS = frozenset({"probs", "mask", "confidence", "entropy"})


def row_fields(spec: MaskSpec) -> frozenset[str]:
    """What :func:`encode_prediction` reads (the rows of predict and serve): mask and
    confidence, and for multi-label masks the per-class probabilities too."""
    return frozenset({"mask", "confidence"} | ({"probs"} if spec.multilabel else set()))


@dataclass(frozen=True)
class Prediction:
    """Model output for one image, at the input's H x W (CPU NumPy arrays).

    ``probs`` and ``entropy`` are None when the caller did not ask for them: on a GPU they are
    most of what crosses back to the host (K + 1 float32 planes against the mask's one byte).
    """

    probs: np.ndarray | None       # K x H x W float32
    mask: np.ndarray               # H x W uint8 class ids, or K x H x W uint8 {0, 1} (multi-label)
    confidence: np.ndarray         # H x W float32 in [0, 1]
    entropy: np.ndarray | None     # H x W float32 in [0, 1]


class Segmenter:
    """Loads nothing itself: wraps an :class:`Artifact` (or a live model) for prediction.

    ``device`` is where the model runs, and where the windows are stitched and post-processed:
    an image crosses to the device once, normalised, and its finished arrays come back.  The model
    is moved to ``device`` and put in eval mode (training loops call ``model.train()`` again).
    ``amp_dtype`` runs the torch forward under autocast: ``"auto"`` (the default) is bfloat16 on
    a CUDA device and float32 elsewhere; None is always float32.  ``batch_size`` is windows per
    forward; None sizes it with :func:`tiles_per_forward` when the segmenter is made (on a CPU
    about 64K pixels per torch thread: one 256^2 window a thread, more of smaller ones, at most
    32; from free memory on a GPU).
    Built from an artifact, it predicts with a copy whose BatchNorms are folded into the
    convolutions (:func:`seg_core.model.fold_batchnorm`); the artifact's model is left as it is.
    ``engine`` runs that copy with torch eager or a CPU graph engine (OpenVINO, ONNX Runtime,
    INT8: :mod:`seg_core.runtimes`); tiling, stitching and post-processing are the same for all.
    ``"auto"`` (the default, as in every config) resolves with
    :func:`seg_core.runtimes.resolve_engine`; an artifact held only in memory has no directory
    to cache a graph in, so ``auto`` runs it with torch.
    """

    def __init__(self, artifact: Artifact, device: str | torch.device = "cpu", tta: bool = False,
                 batch_size: int | None = None, channels_last: bool = True,
                 engine: EngineKind = "auto", amp_dtype: AmpSetting = "auto",
                 postprocess: PostProcess | None = None,
                 temperature: float | None = None) -> None:
        self._init(artifact.model, artifact.mask_spec, artifact.preprocessing, device, tta,
                   batch_size, channels_last, fold_norms=True, amp_dtype=amp_dtype)
        # confidence calibration fitted on val by training (seg_core.calibration); 1: none
        self.temperature = float(temperature if temperature is not None else
                                 (artifact.meta.get("calibration") or {}).get("temperature", 1.0))
        self.postprocess = (artifact.postprocess if postprocess is None
                            else postprocess).check(artifact.mask_spec.num_classes)
        if engine == "auto" and artifact.path is None:
            engine = "torch"   # a graph engine caches its graph in the artifact's directory
        self.engine = resolve_engine(engine, self.device, artifact.model_config.arch)
        if self.engine != "torch":
            if artifact.path is None:
                raise ValueError(f"Segmenter: engine {engine!r} caches its graph in the "
                                 f"artifact directory; load the artifact from one")
            self._runner = engine_runner(self.model, self.engine,
                                         cache_dir=artifact.path / ENGINE_DIR,
                                         key=artifact.weights_key, calibration_dir=artifact.path)

    @classmethod
    def from_model(cls, model: nn.Module, mask_spec: MaskSpec, preprocessing: Preprocessing, *,
                   device: str | torch.device = "cpu", tta: bool = False,
                   batch_size: int | None = None, channels_last: bool = False,
                   fold_norms: bool = False, amp_dtype: AmpSetting = "auto",
                   postprocess: PostProcess = PostProcess()) -> "Segmenter":
        """A segmenter around a model in memory (validation during training uses this).

        ``channels_last`` defaults to off here: it re-lays the caller's parameters in place.
        ``fold_norms`` predicts with a copy whose BatchNorms are folded into the convolutions, as
        a segmenter built from an artifact does; the caller's model is left as it is.
        """
        segmenter = cls.__new__(cls)
        segmenter._init(model, mask_spec, preprocessing, device, tta, batch_size, channels_last,
                        fold_norms=fold_norms, amp_dtype=amp_dtype)
        segmenter.postprocess = postprocess.check(mask_spec.num_classes)
        segmenter.temperature = 1.0
        return segmenter

    def _init(self, model: nn.Module, mask_spec: MaskSpec, preprocessing: Preprocessing,
              device: str | torch.device, tta: bool, batch_size: int | None,
              channels_last: bool, *, fold_norms: bool, amp_dtype: AmpSetting) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"Segmenter: batch_size must be >= 1, got {batch_size}")
        if fold_norms:   # a copy with its BatchNorms folded into the convolutions
            model = fold_batchnorm(copy.deepcopy(model))
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
        self.amp_dtype = resolve_amp(amp_dtype, self.device)
        self.batch_size = batch_size or tiles_per_forward(
            self.model, preprocessing.inference_window(), self.device, self.amp_dtype)
        self.engine = "torch"
        self._runner = self._torch_forward

    def predict(self, image: np.ndarray, *, fields: frozenset[str] = ALL_FIELDS) -> Prediction:
        """Prediction for one H x W x C image, returned at the same H x W."""
        return self.predict_batch([image], fields=fields)[0]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[np.ndarray], *,
                      fields: frozenset[str] = ALL_FIELDS) -> list[Prediction]:
        """Predictions for images of any (mixed) sizes, in order, from shared forwards.

        The windows of all images go through the model together, ``batch_size`` per forward,
        so eight small images of one size cost one forward with ``batch_size=8``, not eight
        (windows of different shapes never share a forward: see ``seg_core.tiling``).  With
        ``preprocessing.resize`` every image has the same shape after resizing.  Each image is
        stitched, resized back and post-processed on its own, exactly as a batch of one; only
        the forward's batch composition differs, which moves probabilities by float rounding
        at most.  (On the CPUs measured here, one 256^2 window per forward and thread ran faster
        per window than 4 or 8, and 512^2 windows 1.3x faster one at a time than four: large
        batches only pay on GPUs and for small windows, ``seg_core.inference.budget``.)

        Every image is checked against the budget first (:meth:`check_budget`), and images are
        worked on in consecutive groups whose estimates together fit
        ``preprocessing.max_inference_bytes``.  Raises :class:`InputError` (``too_large``) for
        an image over the budget, or when an allocation fails anyway.

        ``fields`` names the :class:`Prediction` fields wanted (default all); ``probs`` and
        ``entropy`` left out are None, and neither computed (entropy) nor copied to the host.
        """
        unknown = set(fields) - ALL_FIELDS
        if unknown:
            raise ValueError(f"Segmenter: unknown prediction fields {sorted(unknown)}; choose "
                             f"from {sorted(ALL_FIELDS)}")
        arrays = [as_hwc(image) for image in images]  # H x W x C
        needs = [self.check_budget(array.shape) for array in arrays]
        predictions: list[Prediction] = []
        for group in _groups(needs, self.preprocessing.max_inference_bytes):
            try:
                predictions.extend(self._predict_group([arrays[i] for i in group], fields))
            except (MemoryError, RuntimeError) as error:
                if not _allocation_failed(error):
                    raise
                raise self._out_of_memory([arrays[i].shape for i in group],
                                          sum(needs[i] for i in group)) from error
        return predictions

    def predict_each(self, images: Sequence[np.ndarray],
                     catch: tuple[type[BaseException], ...] = (InputError,), *,
                     fields: frozenset[str] = ALL_FIELDS) -> list[Prediction | BaseException]:
        """:meth:`predict_batch`, except that an image raising one of ``catch`` gets that
        exception in its slot while the others are still predicted (then one at a time).
        An image over the memory budget, or whose allocation fails, gets an :class:`InputError`
        (``too_large``) like any other bad image."""
        try:
            return list(self.predict_batch(images, fields=fields))
        except catch:
            pass
        results: list[Prediction | BaseException] = []
        for image in images:
            try:
                results.append(self.predict(image, fields=fields))
            except catch as error:
                results.append(error)
        return results

    def memory_estimate(self, shape: Sequence[int]) -> int:
        """Bytes that predicting one image of ``shape`` (H x W or H x W x C) allocates at its
        peak: see :func:`inference_bytes`.  On a GPU the forward's activations are device
        memory, sized by :func:`tiles_per_forward`, so they are not counted against the budget
        (an allocation that fails there is still a ``too_large`` :class:`InputError`)."""
        on_cpu = self.device.type == "cpu"
        return inference_bytes(shape, self.preprocessing, num_classes=self.mask_spec.num_classes,
                               multilabel=self.mask_spec.multilabel, tta=self.tta,
                               batch_size=self.batch_size,
                               activation_bytes=activation_bytes(self.model) if on_cpu else 0,
                               size_multiple=_size_multiple(self.model))

    def check_budget(self, shape: Sequence[int]) -> int:
        """The :meth:`memory_estimate` of an image of ``shape``, or :class:`InputError`
        (``too_large``) when it exceeds ``preprocessing.max_inference_bytes``, or when its
        padded windows cost the network more work than a ``max_pixels`` square image would.
        Nothing is allocated: this is arithmetic on the shape."""
        pre = self.preprocessing
        height, width = int(shape[0]), int(shape[1])
        need, limit = self.memory_estimate(shape), pre.max_inference_bytes
        classes = f"{self.mask_spec.num_classes} classes" + (", TTA" if self.tta else "")
        if need > limit:
            raise InputError("too_large", f"a {height}x{width} image needs about {_mib(need)} "
                             f"to segment ({classes}), over max_inference_bytes {_mib(limit)}",
                             hint="downscale or crop the image (memory grows with H x W x "
                                  "classes), or raise preprocessing.max_inference_bytes where "
                                  "the machine has the memory")
        window, multiple = pre.inference_window(), _size_multiple(self.model)
        work_h, work_w = pre.resize or (height, width)
        work = forward_pixels(work_h, work_w, window, pre.tile_overlap, multiple)
        side = math.isqrt(pre.max_pixels)
        allowed = forward_pixels(side, side, window, pre.tile_overlap, multiple)
        if work > allowed:
            raise InputError("too_large", f"a {height}x{width} image makes the network process "
                             f"{work:,} padded pixels (windows padded to multiples of "
                             f"{multiple}), more than a {side}x{side} image (max_pixels) would "
                             f"({allowed:,})", hint="crop or resample very thin images: a side "
                                                    f"below {multiple} pixels is padded up to it")
        return need

    def _predict_group(self, arrays: list[np.ndarray],
                       fields: frozenset[str] = ALL_FIELDS) -> list[Prediction]:
        """:meth:`predict_batch` on images already checked against the budget."""
        sizes = [array.shape[:2] for array in arrays]
        inputs = [prepare_image(array, self.preprocessing).to(self.device, non_blocking=True)
                  for array in arrays]  # C x h x w, on the device
        flips = _TTA_FLIPS if self.tta else ((),)
        summed: list[torch.Tensor | None] = []
        for dims in flips:  # average in probability space, each flip undone before adding
            outputs = self._tiled_probs([x.flip(dims) if dims else x for x in inputs])
            outputs = [out.flip(dims) if dims else out for out in outputs]
            summed = outputs if not summed else [a.add_(b) for a, b in zip(summed, outputs)]
            del outputs
        del inputs
        predictions = []
        for index, (height, width) in enumerate(sizes):
            probs, summed[index] = summed[index], None  # K x h x w; freed once finished
            if len(flips) > 1:
                probs.div_(len(flips))
            if tuple(probs.shape[-2:]) != (height, width):
                probs = F.interpolate(probs[None], size=(height, width), mode="bilinear",
                                      align_corners=False)[0]
            predictions.append(self.finish(probs.clamp_(0.0, 1.0), fields))
        return predictions

    def finish(self, probs: torch.Tensor, fields: frozenset[str] = ALL_FIELDS) -> Prediction:
        """K x H x W stitched probabilities at temperature 1 -> this segmenter's prediction:
        its temperature, then the mask, confidence and entropy, then its post-processing.

        Every prediction ends here.  ``probs`` may also be what an earlier :meth:`predict`
        returned (``fields`` with ``probs``, ``temperature`` 1 and no post-processing): the
        end of training fits both on such a pass and finishes the drift baseline from the
        same probabilities (:func:`pipelines.train.postprocess.fit_on_val`)."""
        if self.temperature != 1.0:   # the mask does not move; confidences do
            probs = scale_probs(probs, self.temperature, multilabel=self.mask_spec.multilabel)
        prediction = _finish(probs, self.mask_spec.multilabel, fields)
        if self.postprocess.active:   # on the host: the mask is there now (postprocess doc)
            prediction = dataclasses.replace(prediction, mask=apply_postprocess(
                prediction.mask, self.postprocess, multilabel=self.mask_spec.multilabel))
        return prediction

    def _out_of_memory(self, shapes: list[tuple[int, ...]], need: int) -> InputError:
        sizes = ", ".join(f"{shape[0]}x{shape[1]}" for shape in shapes)
        return InputError("too_large", f"ran out of memory segmenting {sizes} (estimated "
                          f"{_mib(need)}, within max_inference_bytes "
                          f"{_mib(self.preprocessing.max_inference_bytes)})",
                          hint="other work holds the memory: retry, give the worker more "
                               "memory, or lower preprocessing.max_inference_bytes so that "
                               "such images are refused before they start")

    def _tiled_probs(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Probabilities K x h x w per input; tiles run and are stitched on ``self.device``."""
        pre = self.preprocessing
        return sliding_window_many(self._predict_tiles, inputs, tile=pre.inference_window(),
                                   overlap=pre.tile_overlap, num_out=self.mask_spec.num_classes,
                                   batch_size=self.batch_size, blend="gaussian",
                                   device=self.device, stitch_device=self.device)

    def logits(self, tiles: torch.Tensor) -> torch.Tensor:
        """N x C x h x w prepared windows on ``self.device`` -> N x K x h x w float32 logits:
        the forward exactly as this segmenter runs it (its engine, its folded network, its
        layout and autocast), without tiling or post-processing."""
        return self._runner(tiles)

    def _predict_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """N x C x h x w windows on ``self.device`` -> N x K x h x w probabilities (same device)."""
        logits = self._runner(tiles)
        return torch.sigmoid(logits) if self.mask_spec.multilabel else logits.softmax(dim=1)

    def _torch_forward(self, tiles: torch.Tensor) -> torch.Tensor:
        tiles = tiles.float()
        if self.channels_last:
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = self.model(tiles)
        return logits.float()   # probabilities, the stitch and post-processing are float32


def resolve_amp(amp_dtype: AmpSetting, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp_dtype`` on ``device``: ``"auto"`` is bfloat16 on CUDA and
    None (float32) elsewhere; a dtype or None is taken as given."""
    if amp_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp_dtype is not None and not isinstance(amp_dtype, torch.dtype):
        raise ValueError(f"Segmenter: amp_dtype must be 'auto', None or a torch dtype, got "
                         f"{amp_dtype!r}")
    return amp_dtype


def _warn_if_tile_exceeds_training(pre: Preprocessing) -> None:
    """An artifact whose tile breaks the oversized-tile rule
    (:func:`seg_core.config.oversized_tile`, which refuses such a config): trained before the
    rule, or on native images all smaller than the tile.  Say so, and that its windows are
    clipped to the training geometry."""
    if (oversized := oversized_tile(pre)) is not None:
        window = pre.inference_window()
        warnings.warn(f"{oversized}. This artifact holds one (trained before the rule, or on "
                      f"images smaller than the tile): inference uses {window[0]}x{window[1]} "
                      f"windows", stacklevel=3)


def _finish(probs: torch.Tensor, multilabel: bool,
            fields: frozenset[str] = ALL_FIELDS) -> Prediction:
    """K x H x W probabilities (on any device) -> Prediction with mask, confidence and
    normalised entropy, computed where ``probs`` is and returned as CPU arrays; ``probs`` and
    ``entropy`` only when ``fields`` names them.

    Entropy and multi-label confidence go one class plane at a time, so the temporaries are
    a few H x W planes, never another K x H x W.  ``probs`` becomes the prediction's array.
    """
    num_classes = probs.shape[0]
    want_entropy = "entropy" in fields
    plane = torch.zeros(probs.shape[1:], dtype=torch.float32, device=probs.device)
    entropy = plane if want_entropy else None
    if multilabel:
        mask = (probs >= 0.5).to(torch.uint8)
        confidence = torch.ones_like(plane)
        for p in probs:
            q = 1 - p
            torch.minimum(confidence, torch.maximum(p, q), out=confidence)
            if entropy is not None:
                entropy -= torch.special.xlogy(p, p)  # 0 log 0 = 0; nats
                entropy -= torch.special.xlogy(q, q)
        if entropy is not None:
            entropy /= num_classes * math.log(2)
    else:
        confidence, mask = probs.max(dim=0)
        mask = mask.to(torch.uint8)
        if entropy is not None and num_classes > 1:
            for p in probs:
                entropy -= torch.special.xlogy(p, p)
            entropy /= math.log(num_classes)
    return Prediction(probs=probs.cpu().numpy() if "probs" in fields else None,
                      mask=mask.cpu().numpy(), confidence=confidence.cpu().numpy(),
                      entropy=None if entropy is None else entropy.clamp_(0.0, 1.0).cpu().numpy())


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
        if pred.probs is None:
            raise ValueError("encode_prediction: a multi-label prediction needs its probs "
                             "(predict with fields=row_fields(spec))")
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
