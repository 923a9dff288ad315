"""Expected calibration error and temperature scaling (seg_core.calibration)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seg_core.calibration import (calibration_bins, decisions, expected_calibration_error,
                                  fit_temperature, sample_pixels, scale_probs)


def test_ece_by_hand():
    # two pixels at 0.9 (one right: accuracy 0.5) and two at 0.6 (both right): each bin holds
    # half the pixels and misses by 0.4, so ECE = 0.5 * 0.4 + 0.5 * 0.4
    bins = calibration_bins(np.array([0.9, 0.9, 0.6, 0.6]), np.array([1, 0, 1, 1]))
    assert bins["pixels"][13] == 2 and bins["pixels"][9] == 2 and sum(bins["pixels"]) == 4
    assert expected_calibration_error(bins) == pytest.approx(0.4)
    assert calibration_bins(np.array([1.0]), np.array([1]))["pixels"][-1] == 1   # 1.0: last bin


def test_scaling_keeps_the_decision_and_moves_the_confidence():
    logits = torch.randn(4, 30, 40, generator=torch.Generator().manual_seed(0)) * 3
    probs = logits.softmax(0)
    for temperature in (0.5, 2.0):
        scaled = scale_probs(probs, temperature, multilabel=False)
        assert torch.equal(scaled.argmax(0), probs.argmax(0))
        assert torch.allclose(scaled, (logits / temperature).softmax(0), atol=1e-5)
    assert scale_probs(probs, 2.0, multilabel=False).max(0).values.mean() < probs.max(0).values.mean()
    sig = torch.sigmoid(logits)
    scaled = scale_probs(sig, 3.0, multilabel=True)
    assert torch.equal(scaled >= 0.5, sig >= 0.5)
    assert torch.allclose(scaled, torch.sigmoid(logits / 3.0), atol=1e-4)   # float32 near 1


def test_fit_recovers_the_temperature_of_over_confident_probabilities():
    """Truth drawn from softmax(l / 2), the model says softmax(l): T = 2 puts it right."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, size=(3, 200, 200))
    true = torch.from_numpy(logits / 2.0).softmax(0).numpy()
    cumulative = true.cumsum(0)
    truth = (rng.random((200, 200))[None] > cumulative).sum(0).astype(np.int64)
    said = torch.from_numpy(logits).softmax(0).numpy().astype(np.float32)
    samples = [sample_pixels(said[:, i * 50:(i + 1) * 50], truth[i * 50:(i + 1) * 50],
                             multilabel=False, rng=rng) for i in range(4)]
    fitted = fit_temperature(samples, multilabel=False)
    assert fitted["temperature"] == pytest.approx(2.0, rel=0.1)
    assert fitted["nll_after"] < fitted["nll_before"]
    assert fitted["ece_after"] < fitted["ece_before"] / 2
    confidence, right = decisions(said, truth, multilabel=False)
    assert fitted["ece_before"] == pytest.approx(
        expected_calibration_error(calibration_bins(confidence, right)), abs=0.01)


def test_the_segmenter_applies_the_artifact_temperature(tmp_path):
    from seg_core.artifact import load_artifact, write_calibration
    from seg_core.inference import Segmenter
    from seg_core.sample_data import render_sample
    from tests.serve_util import make_artifact

    path = make_artifact(tmp_path / "m")
    image = render_sample(1, size=(50, 70), shape_types=2, seed=3)[0]
    raw = Segmenter(load_artifact(path), engine="torch").predict(image)
    write_calibration(path, {"temperature": 2.5, "ece_before": 0.2, "ece_after": 0.05})
    segmenter = Segmenter(load_artifact(path), engine="torch")
    assert segmenter.temperature == 2.5
    calibrated = segmenter.predict(image)
    assert np.array_equal(calibrated.mask, raw.mask)
    assert calibrated.confidence.mean() < raw.confidence.mean()
    assert Segmenter(load_artifact(path), engine="torch", temperature=1.0).predict(
        image).confidence.mean() == pytest.approx(raw.confidence.mean())
