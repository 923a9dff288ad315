"""Can a pixel's confidence be trusted?  Expected calibration error and temperature scaling.

A network trained with cross-entropy is usually over-confident: pixels it calls 95% sure are
right less often than that.  Temperature scaling (Guo et al., "On Calibration of Modern Neural
Networks", 2017) divides the logits by one number T, fitted on held-out data by minimising the
negative log-likelihood; the argmax, and so the mask, does not move.  Here it is applied to the
stitched probabilities, where it is exact per pixel: softmax(l / T) is ``p ** (1 / T)``
renormalised, and sigmoid(l / T) is ``sigmoid(logit(p) / T)``; where overlapping windows were
blended it acts on the blend.  :func:`fit_temperature` fits T on exactly that operation.

:func:`calibration_bins` bins pixel confidence (the max class probability; for multi-label the
confidence of each class's own on/off decision) against how often the mask is right there;
:func:`expected_calibration_error` is the pixel-weighted mean gap over the bins (ECE).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

BINS = 15                 # equal-width confidence bins of the ECE and the reliability diagram
SAMPLE_PIXELS = 20_000    # pixels per image the temperature is fitted on (a seeded sample)
T_RANGE = (0.05, 20.0)    # temperatures searched
LOG_T_TOLERANCE = 1e-4    # the search's final interval in log T


def scale_probs(probs: torch.Tensor, temperature: float, *, multilabel: bool) -> torch.Tensor:
    """K x ... probabilities at ``temperature`` (1: unchanged), as a new tensor."""
    if temperature == 1.0:
        return probs
    if multilabel:   # float32 tells 1 - 1e-7 from 1: the logit stays finite
        p = probs.clamp(1e-7, 1 - 1e-7)
        return torch.sigmoid(torch.log(p / (1 - p)) / temperature)
    # the smallest normal float: a probability that underflowed stays far below every other
    logits = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)) / temperature
    return logits.softmax(dim=0)


def calibration_bins(confidence: np.ndarray, correct: np.ndarray,
                     bins: int = BINS) -> dict[str, list[float]]:
    """Per equal-width confidence bin over [0, 1]: pixels, mean confidence, accuracy."""
    confidence = np.asarray(confidence, np.float64).ravel()
    correct = np.asarray(correct, bool).ravel()
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    right = np.bincount(index, weights=correct, minlength=bins)
    safe = np.maximum(counts, 1)
    return {"pixels": counts.astype(int).tolist(),
            "confidence": (conf_sum / safe).tolist(), "accuracy": (right / safe).tolist()}


def merge_bins(parts: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """The bins of several images (or batches) as one."""
    pixels = np.sum([p["pixels"] for p in parts], axis=0)
    safe = np.maximum(pixels, 1)
    conf = np.sum([np.multiply(p["confidence"], p["pixels"]) for p in parts], axis=0) / safe
    acc = np.sum([np.multiply(p["accuracy"], p["pixels"]) for p in parts], axis=0) / safe
    return {"pixels": pixels.astype(int).tolist(), "confidence": conf.tolist(),
            "accuracy": acc.tolist()}


def expected_calibration_error(bins: dict[str, list[float]]) -> float:
    """Sum over bins of (pixels share) x |accuracy - confidence|."""
    pixels = np.asarray(bins["pixels"], np.float64)
    if pixels.sum() == 0:
        return float("nan")
    gaps = np.abs(np.asarray(bins["accuracy"]) - np.asarray(bins["confidence"]))
    return float((pixels / pixels.sum() * gaps).sum())


def decisions(probs: np.ndarray, truth: np.ndarray, *, multilabel: bool,
              ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of every scored pixel decision of one image: the max probability
    and argmax == truth (multi-class), or per class ``max(p, 1 - p)`` and ``(p >= 0.5) ==
    truth`` (multi-label).  Pixels whose truth is ``ignore_index`` are left out."""
    if multilabel:
        valid = truth != ignore_index
        return np.maximum(probs, 1 - probs)[valid], ((probs >= 0.5) == (truth == 1))[valid]
    valid = truth != ignore_index
    return probs.max(axis=0)[valid], (probs.argmax(axis=0) == truth)[valid]


def sample_pixels(probs: np.ndarray, truth: np.ndarray, *, multilabel: bool,
                  ignore_index: int = 255, rng: np.random.Generator | None = None,
                  limit: int = SAMPLE_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` scored pixels of one image, seeded: (K x N probabilities, truth N or
    K x N), what :func:`fit_temperature` takes, so a fit holds a bounded sample per image."""
    rng = rng or np.random.default_rng(0)
    flat_p = probs.reshape(probs.shape[0], -1)
    flat_t = truth.reshape(truth.shape[0], -1) if multilabel else truth.reshape(-1)
    valid = (flat_t != ignore_index).all(axis=0) if multilabel else flat_t != ignore_index
    where = np.flatnonzero(valid)
    if where.size > limit:
        where = np.sort(rng.choice(where, limit, replace=False))
    return flat_p[:, where], (flat_t[:, where] if multilabel else flat_t[where])


def fit_temperature(samples: Sequence[tuple[np.ndarray, np.ndarray]], *,
                    multilabel: bool) -> dict[str, Any]:
    """The temperature that minimises the NLL of ``samples`` (from :func:`sample_pixels`), with
    the ECE and NLL before and after."""
    p = torch.from_numpy(np.concatenate([s[0] for s in samples], axis=1).astype(np.float32))
    t = torch.from_numpy(np.concatenate([s[1] for s in samples], axis=-1).astype(np.int64))

    def nll(temperature: float) -> float:
        scaled = scale_probs(p, temperature, multilabel=multilabel).clamp(1e-7, 1 - 1e-7)
        if multilabel:
            target = t.float()
            return float(-(target * scaled.log() + (1 - target) * (1 - scaled).log()).mean())
        return float(-scaled.gather(0, t[None]).log().mean())

    def ece(temperature: float) -> float:
        scaled = scale_probs(p, temperature, multilabel=multilabel).numpy()
        conf, right = decisions(scaled, t.numpy(), multilabel=multilabel)
        return expected_calibration_error(calibration_bins(conf, right))

    # golden-section search on log T (the NLL is unimodal in T for a fixed set of logits),
    # until log T is known to LOG_T_TOLERANCE: T to about 1e-4 relative, the precision it is
    # recorded with (25 evaluations of the NLL instead of 42, each a pass over every pixel)
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(math.exp(a)), nll(math.exp(b))
    while hi - lo > LOG_T_TOLERANCE:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(math.exp(b))
    temperature = round(math.exp((lo + hi) / 2), 4)
    return {"temperature": temperature, "pixels": int(t.shape[-1]),
            "nll_before": round(nll(1.0), 6), "nll_after": round(nll(temperature), 6),
            "ece_before": round(ece(1.0), 6), "ece_after": round(ece(temperature), 6)}
