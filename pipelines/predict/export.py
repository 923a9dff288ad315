"""Export a trained U-Net to TorchScript or ONNX for CPU serving outside rayseg.

The exported graph is the bare network: ``N x C x H x W`` float input, already normalised the
way the artifact's ``preprocessing`` says, logits out.  Tiling, resizing and softmax stay with
the caller (or with :class:`seg_core.inference.Segmenter`).  The trace is taken at the artifact's
inference window (its training geometry) rounded up to a multiple of ``2**depth``, so the graph
holds no padding branch and accepts any H, W that are multiples of ``2**depth``.  ONNX graphs
come from :func:`seg_core.runtimes.export_onnx`, the exporter the inference engines use (dynamic
batch, height and width; ``onnx`` is a dependency).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

ExportFormat = Literal["torchscript", "onnx"]


def export_artifact(artifact_uri: str, out_dir: str, format: ExportFormat = "torchscript",
                    path: str | None = None) -> str:
    """Write ``<out_dir>/model.pt`` (TorchScript) or ``model.onnx`` (or ``path``); return it."""
    import warnings

    import torch

    from pipelines.model import open_artifact

    if format not in ("torchscript", "onnx"):
        raise ValueError(f"export: format must be 'torchscript' or 'onnx', got {format!r}")
    from pipelines.registry import resolve_source

    artifact = open_artifact(resolve_source(artifact_uri))
    model = artifact.model.eval()
    height, width = (_trace_side(side, model.size_multiple)
                     for side in artifact.preprocessing.inference_window())
    example = torch.zeros(1, artifact.model_config.in_channels, height, width)
    default = Path(out_dir) / ("model.pt" if format == "torchscript" else "model.onnx")
    target = Path(path) if path else default
    target.parent.mkdir(parents=True, exist_ok=True)
    if format == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            # The input check and the padding branch are constant at the trace size: intended.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, example)
        meta = json.dumps(artifact.meta)
        torch.jit.save(traced, str(target), _extra_files={"artifact.json": meta})
    else:
        from seg_core.runtimes import export_onnx

        export_onnx(model, target)
    return str(target)


def _trace_side(side: int, multiple: int) -> int:
    """A window side rounded up to a multiple of ``2**depth`` (no padding path in the trace)."""
    return max(multiple, -(-side // multiple) * multiple)
