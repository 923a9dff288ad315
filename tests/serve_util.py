"""Helpers shared by the tests that start the Serve endpoint on 127.0.0.1."""
from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
import uuid
from email.message import Message
from pathlib import Path

import numpy as np
from PIL import Image

from seg_core.artifact import save_artifact
from seg_core.config import MaskSpec, ModelConfig, Preprocessing
from seg_core.model import UNet


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def endpoint_config(port: int | None = None) -> dict:
    """jobs/configs/serve.yaml with a quarter CPU per replica and one replica, on loopback."""
    from jobs.options import shipped_config
    from pipelines.serve.control import load_serve_config

    data = load_serve_config(shipped_config("serve"))
    deployment = data["applications"][0]["deployments"][0]
    deployment["ray_actor_options"] = {"num_cpus": 0.25}
    deployment["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    data["http_options"].update(host="127.0.0.1", port=port or free_port())
    return data


def encode_as(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt.upper())
    return buffer.getvalue()


def post(url: str, data: bytes, *, headers: dict | None = None, query: str = "",
         answered: list | None = None) -> tuple[int, Message, bytes]:
    """POST /v1/segment; returns (status, headers, body) and records ids of 200 answers."""
    request = urllib.request.Request(f"{url}/v1/segment{query}", data=data, method="POST",
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, head, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, head, body = error.code, error.headers, error.read()
    if status == 200 and answered is not None:
        answered.append(head["X-Request-Id"])
    return status, head, body


def get(url: str, path: str, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def make_artifact(path: Path) -> Path:
    """A tiny U-Net whose random weights are scaled so that its masks use several classes."""
    import torch

    torch.manual_seed(0)
    model = UNet(ModelConfig(in_channels=3, num_classes=3, depth=2, base_width=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim == 4:
                param.mul_(3.0)
    return save_artifact(path, model.eval(), name="tiny", version="t1",
                         mask_spec=MaskSpec(num_classes=3, class_names=("bg", "a", "b")),
                         preprocessing=Preprocessing(tile_size=64, tile_overlap=0.25),
                         metrics={})
