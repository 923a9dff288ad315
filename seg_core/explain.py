"""Attribution maps for segmentation: which input pixels made the network call a region class c.

:func:`explain` returns an H x W float32 map at the input's resolution from one of three Captum
methods:

- ``gradcam``: Grad-CAM (``captum.attr.LayerGradCam``) on :func:`gradcam_layer`, the last
  decoder stage before the 1x1 head, ReLU applied, so the map is >= 0.
- ``occlusion``: the target's drop when an ``occlusion_window`` square (``OCCLUSION_WINDOW``,
  4 pixels, moved by ``OCCLUSION_STRIDE``, 2) is set to the baseline (``captum.attr.Occlusion``),
  summed over channels.
- ``integrated_gradients``: ``captum.attr.IntegratedGradients`` from the baseline in
  ``IG_STEPS`` steps, summed over channels (signed).

What is explained (as in Captum's segmentation tutorial) is one scalar per image: the sum of
class c's logits over the pixels the segmenter predicts as c (its own ``predict``, mask
post-processing included), or over ``region`` when the caller gives one.  The mask is computed
once, before attribution, and held fixed in a wrapper module (:class:`RegionScore`), so a
perturbed input is scored on the same pixels.  The baseline of occlusion and integrated
gradients is the image's per-channel mean (after normalisation): "no information" for this
image, and what a deletion test replaces pixels with.

The input goes through the prediction path's geometry: :func:`prepare_image` (channels, resize,
normalisation), then the segmenter's inference windows (:func:`inference_windows`: the same
tile, overlap and clipping as ``seg_core.tiling``).  Each window is explained on its own (the
U-Net pads it to its size multiple and crops back, as in prediction, so the map is cropped to
the window too) with the target restricted to the window's part of the region; the window maps
are blended with the same Gaussian weights the probabilities are stitched with, and a resized
input's map is resized back (bilinear) to the input's H x W.

Limits:

- Only torch can be differentiated: the map always comes from ``segmenter.model`` (the folded
  torch network the segmenter predicts with) in float32, even when the segmenter runs
  OpenVINO or ONNX Runtime (which agree with it to float rounding; their INT8 variants only
  approximately, so the map explains the float network, not the quantised one).  The
  segmenter's TTA, autocast and calibration do not enter the map (the region it predicts does).
- At the last decoder stage Grad-CAM is, up to a positive factor, ``ReLU(logit_c - bias_c)``:
  the head is a linear 1x1 convolution, so the channel weights are the head's weights times
  the region's share of the window.  It says where the network votes for c, sharply, not which
  input made it vote; occlusion and integrated gradients measure the input's effect instead.
- A window whose part of the region is empty contributes zeros.  A class predicted nowhere
  (and no ``region``) raises ``ValueError``: there is nothing to explain.
- Occlusion costs about ``(h / stride) * (w / stride)`` forwards per window (16k for a 256 x 256
  window at stride 2: minutes on a CPU) and integrated gradients ``IG_STEPS`` forwards and
  backwards: meant for a few images, not for a dataset.
- Faithfulness is measured, not promised (tests/seg_core/test_explain.py).  Occlusion and
  integrated gradients pass the model-randomisation test on signed maps only: their absolute
  values are dominated by the input's distance from the baseline near the region, and a
  re-initialised network's ``|map|`` ranks pixels almost as the trained one's does (Spearman
  0.80 and 0.94 on average there, against 0.05 and 0.06 signed).

Captum (and the matplotlib its ``captum.attr`` imports) is imported when a map is made, not
when ``seg_core`` is.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seg_core.config import ExplainMethod, Preprocessing
from seg_core.inference import Segmenter, prepare_image
from seg_core.inference.budget import _size_multiple
from seg_core.tiling import blend_weights, padded_side, tile_shape, tile_starts, window_stride

Method = ExplainMethod   # declared once, in seg_core.config
METHODS: tuple[str, ...] = ("gradcam", "occlusion", "integrated_gradients")

# Occluded square side and step, pixels of the prepared input.  Small on purpose: a window the
# size of the objects makes the map the region's footprint blurred by the window, which any
# network whose receptive field covers it reproduces (tests/seg_core/test_explain.py: with 8/4
# a re-initialised U-Net's map reached Spearman 0.54 with the trained one's, with 16/8 0.91;
# with 4/2 at most 0.39 over three re-initialisations).
OCCLUSION_WINDOW = 4
OCCLUSION_STRIDE = 2    # half the window: each pixel is scored by up to four occlusions
IG_STEPS = 32           # Gauss-Legendre steps from the baseline to the image
_PERTURBATIONS_PER_EVAL = 32

Window = tuple[int, int, int, int]   # (y, x, height, width) in the prepared input


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM reads: ``model.decoder[-1]``, the last decoder stage of the U-Net
    (:class:`~seg_core.model.DecoderStage`) and of the lite U-Net
    (:class:`~seg_core.model.LiteDecoderStage`): full resolution, ``base_width`` channels, the
    features the 1x1 head turns into logits."""
    decoder = getattr(model, "decoder", None)
    if not isinstance(decoder, nn.ModuleList) or len(decoder) == 0:
        raise ValueError(f"gradcam_layer: expected a seg_core U-Net with a decoder, got "
                         f"{type(model).__name__}")
    return decoder[-1]


class RegionScore(nn.Module):
    """``model``'s logits of ``target_class`` summed over a fixed ``region``: one scalar per
    batch item, the quantity an attribution explains (N x C x h x w -> N)."""

    def __init__(self, model: nn.Module, target_class: int, region: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.target_class = target_class
        self.register_buffer("region", region.float())   # h x w, 1 inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)   # N x K x h x w
        return (logits[:, self.target_class] * self.region).sum(dim=(-2, -1))


def inference_windows(height: int, width: int, pre: Preprocessing) -> list[Window]:
    """The windows prediction cuts from a prepared ``height x width`` input, in
    :func:`seg_core.tiling.sliding_window`'s geometry (``pre.inference_window()`` clipped to the
    input, ``pre.tile_overlap``, the last window shifted back to the border)."""
    tile_h, tile_w = tile_shape(pre.inference_window())
    window_h, window_w = min(tile_h, height), min(tile_w, width)
    rows = tile_starts(height, window_h, window_stride(window_h, pre.tile_overlap))
    cols = tile_starts(width, window_w, window_stride(window_w, pre.tile_overlap))
    return [(y, x, window_h, window_w) for y in rows for x in cols]


def explain(segmenter: Segmenter, image: np.ndarray, target_class: int, *,
            method: Method = "gradcam", region: np.ndarray | None = None,
            normalise: bool = True, occlusion_window: int = OCCLUSION_WINDOW,
            occlusion_stride: int = OCCLUSION_STRIDE) -> np.ndarray:
    """An H x W float32 attribution map of ``target_class`` for an H x W x C ``image``.

    The target is the sum of the class's logits over the pixels ``segmenter`` predicts as the
    class, or over ``region`` (a boolean H x W mask) when given.  ``normalise`` divides the map
    by its largest absolute value, so Grad-CAM is in [0, 1] and the signed methods in [-1, 1]
    (an all-zero map stays zero); ``normalise=False`` returns the blended raw attributions
    (logit units for occlusion and integrated gradients).  ``occlusion_window`` and
    ``occlusion_stride`` (pixels of the prepared input) apply to ``occlusion`` only.  See the
    module docstring for the geometry, the baseline and the limits.
    """
    if method not in METHODS:
        raise ValueError(f"explain: method must be one of {METHODS}, got {method!r}")
    if not 1 <= occlusion_stride <= occlusion_window:
        raise ValueError(f"explain: need 1 <= occlusion_stride <= occlusion_window, got "
                         f"{occlusion_stride} and {occlusion_window}")
    height, width = np.shape(image)[:2]
    mask = target_region(segmenter, image, target_class, region)
    x = prepare_image(image, segmenter.preprocessing)   # C x h x w
    region_t = _to_prepared(mask, x.shape[-2:])
    baseline = x.mean(dim=(-2, -1), keepdim=True)        # C x 1 x 1, the image mean
    total = torch.zeros(x.shape[-2:], dtype=torch.float64)
    weight = torch.zeros_like(total)
    for y0, x0, h, w in inference_windows(*x.shape[-2:], segmenter.preprocessing):
        weights = blend_weights((h, w), "gaussian")
        window_region = region_t[y0:y0 + h, x0:x0 + w]
        if window_region.any():
            window = x[None, :, y0:y0 + h, x0:x0 + w]
            attr = _attribute(method, segmenter, window, target_class, window_region, baseline,
                              (occlusion_window, occlusion_stride))
            total[y0:y0 + h, x0:x0 + w] += attr.double().cpu() * weights
        weight[y0:y0 + h, x0:x0 + w] += weights
    attribution = (total / weight).float()
    if tuple(attribution.shape) != (height, width):   # resize preprocessing: back to the input
        attribution = F.interpolate(attribution[None, None], size=(height, width),
                                    mode="bilinear", align_corners=False)[0, 0]
    out = attribution.numpy()
    if normalise and (peak := float(np.abs(out).max())) > 0:
        out = out / peak
    return out.astype(np.float32)


def class_score(segmenter: Segmenter, image: np.ndarray, target_class: int,
                region: np.ndarray) -> float:
    """The target :func:`explain` explains, for ``image`` and a fixed boolean H x W ``region``:
    class logits summed over the region, per inference window, summed over windows (an image
    of one window: exactly the explained scalar).  Deletion tests score perturbed images with it."""
    mask = target_region(segmenter, image, target_class, region)
    x = prepare_image(image, segmenter.preprocessing)
    region_t = _to_prepared(mask, x.shape[-2:])
    model = segmenter.model
    score = 0.0
    with torch.inference_mode():
        for y0, x0, h, w in inference_windows(*x.shape[-2:], segmenter.preprocessing):
            scorer = RegionScore(model, target_class, region_t[y0:y0 + h, x0:x0 + w])
            window = x[None, :, y0:y0 + h, x0:x0 + w].to(segmenter.device)
            score += float(scorer.to(segmenter.device)(window.float())[0])
    return score


def target_region(segmenter: Segmenter, image: np.ndarray, target_class: int,
                  region: np.ndarray | None = None) -> np.ndarray:
    """The boolean H x W mask the target sums over: ``region`` checked, or the pixels the
    segmenter predicts as ``target_class`` (multi-label: the class's own plane)."""
    num_classes = segmenter.mask_spec.num_classes
    if not 0 <= int(target_class) < num_classes:
        raise ValueError(f"explain: target_class must be in 0..{num_classes - 1}, got "
                         f"{target_class}")
    shape = tuple(np.shape(image)[:2])
    if region is not None:
        region = np.asarray(region)
        if region.shape != shape or region.dtype != np.bool_:
            raise ValueError(f"explain: region must be a boolean H x W mask of shape {shape}, "
                             f"got {region.dtype} {region.shape}")
        return region
    mask = segmenter.predict(image, fields=frozenset({"mask"})).mask
    predicted = mask[target_class] == 1 if mask.ndim == 3 else mask == target_class
    if not predicted.any():
        raise ValueError(f"explain: class {target_class} is predicted nowhere in this image; "
                         f"pass region= (a boolean H x W mask) to explain its logits there")
    return predicted


def _to_prepared(mask: np.ndarray, size: torch.Size) -> torch.Tensor:
    """The H x W region at the prepared input's h x w (nearest neighbour, as masks are resized)."""
    region = torch.from_numpy(np.ascontiguousarray(mask))
    if tuple(region.shape) != tuple(size):
        region = F.interpolate(region[None, None].float(), size=tuple(size),
                               mode="nearest")[0, 0] > 0.5
    return region


def _attribute(method: Method, segmenter: Segmenter, window: torch.Tensor, target_class: int,
               region: torch.Tensor, baseline: torch.Tensor,
               occlusion: tuple[int, int]) -> torch.Tensor:
    """One window's h x w map (1 x C x h x w ``window``, on the CPU) for ``method``;
    ``occlusion`` is the occluded square's (side, stride)."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion

    device, model = segmenter.device, segmenter.model
    scorer = RegionScore(model, target_class, region).to(device)
    window = window.to(device).float()
    channels, height, width = window.shape[1:]
    with torch.enable_grad():
        if method == "gradcam":
            cam = LayerGradCam(scorer, gradcam_layer(model)).attribute(
                window, relu_attributions=True)   # 1 x 1 x h' x w', h' x w' the padded window
            multiple = _size_multiple(model)
            padded = (padded_side(height, multiple), padded_side(width, multiple))
            cam = LayerAttribution.interpolate(cam, padded, "bilinear")
            return cam[0, 0, :height, :width].detach()
        baselines = baseline.to(device)[None].expand_as(window).contiguous()
        if method == "occlusion":
            side = min(occlusion[0], height, width)
            stride = min(occlusion[1], side)
            attr = Occlusion(scorer).attribute(
                window, sliding_window_shapes=(channels, side, side),
                strides=(channels, stride, stride), baselines=baselines,
                perturbations_per_eval=_PERTURBATIONS_PER_EVAL)
        else:
            attr = IntegratedGradients(scorer).attribute(
                window, baselines=baselines, n_steps=IG_STEPS, internal_batch_size=IG_STEPS)
    return attr[0].sum(dim=0).detach()   # h x w, summed over channels


def map_png(attribution: np.ndarray, method: Method) -> bytes:
    """A normalised map as the 8-bit PNG every surface shows (``POST /v1/explain``, ``rayseg
    explain``, the page): Grad-CAM's 0..1 as 0..255; the signed methods' -1..1 with 0 at 128."""
    from seg_core.codecs import encode_png

    scaled = attribution if method == "gradcam" else (attribution + 1.0) / 2.0
    return encode_png(np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8))
