"""Inference engines: the same network run by torch eager, OpenVINO or ONNX Runtime.

:class:`seg_core.inference.Segmenter` sends windows through a *runner*: ``N x C x h x w`` float
tensor in, ``N x K x h x w`` logits out.  For ``torch`` the runner is the (BatchNorm-folded)
module itself.  For the others the folded module is exported once to ONNX (opset 17, dynamic
batch, height and width) and cached beside the weights in ``<artifact>/engines/``, under a name
keyed by the weights' SHA-256; the runtime compiles that graph.  The graph is traced on an input
whose sides are multiples of the U-Net's size multiple, so the runner pads each window the way
:class:`seg_core.model.UNet` does (reflect, bottom and right) and crops the logits back: the
masks do not depend on the engine's handling of shapes.

Engines (figures: README, ``rayseg bench engines``):

- ``torch``: PyTorch eager, channels-last.  The only one that runs on a GPU.
- ``openvino``: OpenVINO's CPU plugin.  On CPUs with native bf16 (AVX-512 BF16, AMX) OpenVINO
  computes in bf16 by default; masks still agreed with torch on 99.96% of ISBI pixels, and the
  forward ran several times faster than torch eager on the AVX-512 box measured.  Elsewhere it
  computes in fp32.
- ``onnxruntime``: ONNX Runtime's CPU provider, fp32: the portable graph runner.
- ``openvino-int8`` / ``onnxruntime-int8``: static post-training INT8 quantization (ONNX
  Runtime's ``quantize_static``: QDQ, per-channel int8 weights, uint8 activations, min/max
  calibration) on training images that ``rayseg train`` stores in the artifact
  (``calibration.npz``, see :func:`save_calibration`).
- ``auto``: ``torch`` on a GPU; on the CPU ``openvino`` for the base U-Net and ``onnxruntime``
  for the lite one (see :func:`resolve_engine`).

Pure: no ray, no network.  The runtimes are imported only when an engine needs them.
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import uuid
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from seg_core.config import ENGINES, EngineKind, check_engine
from seg_core.model import _pad_to_multiple, input_channels

__all__ = ["ENGINES", "EngineKind", "check_engine", "engine_runner", "export_onnx",
           "load_calibration", "quantize_int8", "resolve_engine", "save_calibration"]

Runner = Callable[[torch.Tensor], torch.Tensor]
CALIBRATION_FILE = "calibration.npz"
ENGINE_DIR = "engines"
CALIBRATION_IMAGES = 16      # windows stored for INT8 calibration
CALIBRATION_SIDE = 512       # ... each center-cropped to at most this many pixels per side
_OPSET = 17


def resolve_engine(engine: str, device: torch.device, arch: str = "unet") -> str:
    """The concrete engine for ``engine`` on ``device``: ``auto`` is torch on a GPU; on the CPU
    OpenVINO for the base U-Net and ONNX Runtime for the lite one (``arch``), whose depthwise
    convolutions in OpenVINO's bf16 agreed with torch on only 99.82% of ISBI val pixels, under
    the 99.9% bar (``rayseg bench engines``).  The graph engines run on the CPU only."""
    check_engine(engine)
    if engine == "auto":
        if device.type != "cpu":
            return "torch"
        return "onnxruntime" if arch == "lite" else "openvino"
    if engine != "torch" and device.type != "cpu":
        raise ValueError(f"engine {engine!r} runs on the CPU, but the device is {device}; use "
                         f"engine 'torch' (or 'auto') on a GPU")
    return engine


def export_onnx(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (a :class:`~seg_core.model.UNet`, inference-ready) as an ONNX graph with
    dynamic batch, height and width; written whole (temp file + rename)."""
    # a CPU fp32 copy in NCHW (the exporter's layout), whatever the segmenter runs
    model = copy.deepcopy(model).to("cpu", torch.float32,
                                    memory_format=torch.contiguous_format).eval()
    side = 2 * int(getattr(model, "size_multiple", 16))
    example = torch.zeros(1, input_channels(model), side, side)
    axes = {0: "batch", 2: "height", 3: "width"}
    target = Path(path)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():   # the tracer's notes on the input checks
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=_OPSET,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": axes, "logits": axes})

    return _write_whole(target, write)


def save_calibration(directory: str | Path, images: Sequence[np.ndarray]) -> Path:
    """Store up to :data:`CALIBRATION_IMAGES` prepared images (float ``C x H x W``, as the network
    sees them) in ``<directory>/calibration.npz`` for INT8 calibration, each center-cropped to
    at most :data:`CALIBRATION_SIDE` pixels per side and kept as float16."""
    arrays = {}
    for index, image in enumerate(images[:CALIBRATION_IMAGES]):
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise ValueError(f"save_calibration: images must be C x H x W, got {image.shape}")
        top = max(0, (image.shape[1] - CALIBRATION_SIDE) // 2)
        left = max(0, (image.shape[2] - CALIBRATION_SIDE) // 2)
        arrays[f"image_{index:03d}"] = image[:, top:top + CALIBRATION_SIDE,
                                             left:left + CALIBRATION_SIDE].astype(np.float16)
    if not arrays:
        raise ValueError("save_calibration: no images given")

    def write(tmp: Path) -> None:
        # np.savez_compressed's layout (a zip of .npy members, read by np.load) at deflate
        # level 1: on sixteen 512 x 512 RGB windows 0.36 s for 12.1 MB, where its level 6
        # took 3.0 s for 10.7 MB at the end of every training run
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED,
                             compresslevel=1) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    return _write_whole(Path(directory) / CALIBRATION_FILE, write)


def load_calibration(directory: str | Path) -> list[np.ndarray]:
    """The images :func:`save_calibration` stored, as float32 ``C x H x W`` arrays."""
    file = Path(directory) / CALIBRATION_FILE
    if not file.is_file():
        raise ValueError(f"{directory}: no {CALIBRATION_FILE}, so INT8 engines cannot be "
                         f"calibrated; `rayseg train` (rayseg 0.2 and later) stores training "
                         f"images there: retrain, or store some with "
                         f"seg_core.runtimes.save_calibration(dir, images)")
    with np.load(file) as stored:
        return [stored[name].astype(np.float32) for name in sorted(stored.files)]


def quantize_int8(onnx_path: str | Path, out_path: str | Path,
                  calibration: Sequence[np.ndarray], size_multiple: int) -> Path:
    """Static INT8 quantization of the graph at ``onnx_path`` (QDQ, per-channel int8 weights,
    uint8 activations, min/max ranges over ``calibration``, padded as the runner pads)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._inputs = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self._inputs, None)
            if image is None:
                return None
            image = torch.from_numpy(np.asarray(image, np.float32))[None]
            padded = _pad_to_multiple(image, size_multiple)
            return {"image": padded.numpy()}

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as work:
            prepared = Path(work) / "prepared.onnx"
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=True)

    return _write_whole(Path(out_path), write)


def engine_runner(model: nn.Module, engine: str, *, cache_dir: str | Path, key: str,
                  calibration_dir: str | Path, threads: int | None = None) -> Runner:
    """A runner for the CPU graph ``engine`` (not ``torch`` or ``auto``): the graph of ``model``
    exported (and quantized, for ``*-int8``, on the images in ``calibration_dir``) into
    ``cache_dir`` as ``<key>.onnx`` / ``<key>.int8.onnx`` unless already there, then compiled with ``threads`` intra-op threads
    (torch's count by default)."""
    runtime, _, precision = engine.partition("-")
    if runtime not in ("openvino", "onnxruntime") or precision not in ("", "int8"):
        raise ValueError(f"engine_runner: {engine!r} is not a graph engine")
    threads = threads or torch.get_num_threads()
    multiple = int(getattr(model, "size_multiple", 1))
    cache = writable_cache(Path(cache_dir))
    graph = cache / f"{key}.onnx"
    if not graph.is_file():
        export_onnx(model, graph)
    if precision == "int8":
        quantized = cache / f"{key}.int8.onnx"
        if not quantized.is_file():
            images = load_calibration(calibration_dir)
            quantize_int8(graph, quantized, images, multiple)
        graph = quantized
    run = _openvino(graph, threads) if runtime == "openvino" else _onnxruntime(graph, threads)

    def runner(tiles: torch.Tensor) -> torch.Tensor:
        height, width = tiles.shape[-2:]
        padded = _pad_to_multiple(tiles.float(), multiple).contiguous()
        logits = torch.from_numpy(run(padded.numpy()))
        return logits[..., :height, :width]

    return runner


def writable_cache(directory: Path) -> Path:
    """``directory`` (created), or a folder under the system temp dir when it is read-only."""
    with contextlib.suppress(OSError):
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    fallback = Path(tempfile.gettempdir()) / "rayseg-engines"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _openvino(graph: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import openvino

    compiled = openvino.Core().compile_model(
        str(graph), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(inputs: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: inputs})[0])   # copy: the request reuses its buffer

    return run


def _onnxruntime(graph: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3   # errors only: no notes on the graph's optimisation
    session = onnxruntime.InferenceSession(str(graph), options,
                                           providers=["CPUExecutionProvider"])
    return lambda inputs: session.run(None, {"image": inputs})[0]


def _write_whole(target: Path, write: Callable[[Path], object]) -> Path:
    """Run ``write(tmp)`` on a temp name beside ``target`` and rename it into place, so that
    concurrent writers (actors sharing a node's artifact copy) never expose half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
