"""Part 4: correctness on the device: checkpoints, artifacts and generator states round-trip."""
from __future__ import annotations

import copy
import io
import random
import tempfile
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_check.data import MASK
from benchmarks.gpu_check.sizes import PRE, Sizes
from seg_core.artifact import load_artifact, save_artifact
from seg_core.config import Preprocessing
from seg_core.engine import rng_state, set_rng_state
from seg_core.model import UNet


def round_trip(model: UNet, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Checkpoint and artifact saved where the model trained, restored on the CPU and back;
    generator states through torch.save / torch.load(weights_only=True)."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    probe = torch.randn(2, 1, sizes.side, sizes.side, generator=torch.Generator().manual_seed(5))
    model = model.eval()

    def logits(net: torch.nn.Module, where: torch.device) -> torch.Tensor:
        """fp32 logits on ``where``, in one memory layout for all (NCHW and channels_last
        kernels round differently, and the artifact loads in NCHW)."""
        with torch.inference_mode():
            net = net.to(where, memory_format=torch.contiguous_format)
            return net(probe.to(where)).float().cpu()

    on_device = logits(model, device)
    on_cpu = logits(copy.deepcopy(model), torch.device("cpu"))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "rng": rng_state()}, buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
    restored = UNet(model.config)
    restored.load_state_dict(state["model"])
    checkpoint_cpu = torch.equal(logits(restored.eval(), torch.device("cpu")), on_cpu)
    back = io.BytesIO()
    torch.save({"model": restored.state_dict()}, back)       # saved on the CPU, loaded on device
    again = UNet(model.config)
    again.load_state_dict(torch.load(io.BytesIO(back.getvalue()), map_location=device,
                                     weights_only=True)["model"])
    checkpoint_back = torch.equal(logits(again.eval(), device), on_device)
    with tempfile.TemporaryDirectory() as directory:
        save_artifact(directory, model, name="gpu-check", version="rt", mask_spec=MASK,
                      preprocessing=Preprocessing(**PRE))
        artifact_cpu = torch.equal(logits(load_artifact(directory).model, torch.device("cpu")),
                                   on_cpu)

    saved = rng_state()
    draws = draw_all(device)
    blob = io.BytesIO()
    torch.save({"rng": saved}, blob)
    set_rng_state(torch.load(io.BytesIO(blob.getvalue()), map_location="cpu",
                             weights_only=True)["rng"])
    redrawn = draw_all(device)
    rng_ok = {name: redrawn[name] == value for name, value in draws.items()}
    return {"checkpoint_device_to_cpu_identical": checkpoint_cpu,
            "checkpoint_cpu_to_device_identical": checkpoint_back,
            "artifact_device_to_cpu_identical": artifact_cpu,
            "rng_round_trip": rng_ok,
            "cuda_rng_checked": "cuda" in draws}


def draw_all(device: torch.device) -> dict[str, Any]:
    draws = {"python": random.random(), "numpy": float(np.random.rand()),
             "torch": torch.rand(3).tolist()}
    if device.type == "cuda":
        draws["cuda"] = torch.rand(3, device=device).tolist()
    return draws
