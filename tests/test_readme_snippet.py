"""The README's Python snippet runs exactly as written, and gives what the README says it gives.

The block after the ``readme-snippet`` marker is extracted verbatim and executed in a temporary
working directory (its relative ``rayseg_work/...`` paths land there), on the session's local Ray.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- readme-snippet:"
MULTILABEL_MARKER = "<!-- readme-snippet-multilabel:"


def readme_snippet(marker: str = MARKER) -> str:
    """The fenced ``python`` block that follows the marker comment."""
    text = README.read_text()
    start = text.index(marker)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, "no ```python block after the readme-snippet marker"
    return match.group(1)


def test_snippet_is_the_h2o_flow():
    code = readme_snippet()
    for line in ("init()", 'import_file("rayseg_work/api_sample/manifest.csv")',
                 "UNetSegmentationEstimator(", "max_runtime_secs=", "model.train()",
                 "model.predict(",
                 "model.model_performance("):
        assert line in code, f"README snippet lost {line!r}"


@pytest.mark.ray
@pytest.mark.slow
def test_readme_snippet_runs_as_written(ray_session, tmp_path, monkeypatch, capsys):
    from pipelines.api import Frame, ModelPerformance

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_snippet"}
    exec(compile(readme_snippet(), str(README), "exec"), namespace)

    printed = capsys.readouterr().out
    assert "num_classes=3 inferred from the mask values [0, 1, 2]" in printed
    assert "rayseg plan: 18 training pair(s) fingerprinted" in printed   # the train frame
    assert "plan   full size: images are all about 96x96" in printed
    assert "plan   epochs 10000: as many as max_runtime_secs=40 allows" in printed
    assert "mIoU" in printed and "predicted" in printed        # print(perf), confusion matrix
    assert "train px" in printed and "val IoU" in printed      # train()'s per-class table

    valid, predictions, perf = namespace["valid"], namespace["predictions"], namespace["perf"]
    assert (tmp_path / "rayseg_work" / "api_sample" / "manifest.csv").exists()
    assert isinstance(predictions, Frame) and predictions.kind == "predictions"
    assert predictions.nrow == valid.nrow == 6
    assert sorted(predictions.head(99)["id"]) == sorted(valid.head(99)["id"])
    assert str(tmp_path) in predictions.source                 # under ./rayseg_work
    mask = predictions.mask(0)
    assert mask.shape == (96, 96) and mask.max() <= 2

    assert isinstance(perf, ModelPerformance) and perf.images == 6
    assert perf.class_names == ("class_0", "class_1", "class_2")
    for scores in (perf.iou(), perf.dice(), perf.precision(), perf.recall()):
        assert len(scores) == 3
        assert all(v is None or 0.0 <= v <= 1.0 for v in scores.values())
    matrix = perf.confusion_matrix().to_numpy()
    assert matrix.shape == (3, 3) and matrix.sum() == 6 * 96 * 96     # no ignored pixels
    assert perf.pixel_accuracy() == pytest.approx(np.trace(matrix) / matrix.sum())
    assert perf.mean_iou() > 0.3                                # it learned something


# The multi-label example (MULTILABEL_MARKER) runs as written in
# tests/pipelines/test_multilabel_flow.py, which then checks its model against hand counts.
