"""The model artifact: one local directory that is all inference needs.

Layout::

    <dir>/artifact.json   format_version, name, version, model (ModelConfig), mask_spec,
                          preprocessing, reproducibility {seed, packages, manifest_sha256,
                          data_sha256, data_rows, fold}, metrics, created_at, weights_sha256
    <dir>/baseline.json   optional: prediction statistics on the val split (drift monitoring)
    <dir>/weights.pt      the U-Net state_dict (plain CPU tensors, loaded with weights_only=True)
    <dir>/calibration.npz optional: training images for INT8 calibration (seg_core.runtimes)
    <dir>/engines/        optional, written on first use: exported ONNX graphs keyed by the
                          weights' SHA-256 (seg_core.runtimes)

Local paths only: the pipelines layer copies artifacts to and from object storage.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from seg_core.config import (MaskSpec, ModelConfig, PostProcess, Preprocessing, from_dict,
                             to_dict)
from seg_core.model import UNet

# 2: preprocessing records ``train_size`` (the inputs training showed the network) and
# ``tile_size`` may be null or [H, W].  Version-1 artifacts load with their inference window
# inferred from ``resize`` (see Preprocessing.inference_window).
# 3: preprocessing records ``bit_depth`` (how 16-bit pixels are scaled), ``tiff_page`` and
# ``max_inference_bytes``.  Older artifacts load with the defaults, which reproduce what they
# did (scale by the dtype's range, page 0 of single-page TIFFs) under a 2 GiB budget; an older
# rayseg refuses a version-3 artifact as newer instead of misreading it.
FORMAT_VERSION = 3
ARTIFACT_JSON = "artifact.json"
WEIGHTS_FILE = "weights.pt"
# Wrappers that prefix parameter names: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ArtifactError(ValueError):
    """An artifact directory that cannot be loaded (missing files, bad or future format)."""


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: the model in eval mode on CPU plus everything needed to use it."""

    model: UNet
    model_config: ModelConfig
    mask_spec: MaskSpec
    preprocessing: Preprocessing
    name: str
    version: str
    meta: dict[str, Any]  # the full artifact.json (reproducibility, metrics, created_at, ...)
    path: Path | None = None  # the directory it was loaded from
    postprocess: PostProcess = PostProcess()   # chosen on val by training (seg_core.postprocess)

    @property
    def weights_key(self) -> str:
        """The weights' SHA-256 (hex): what caches of derived files (exported graphs) key on."""
        recorded = self.meta.get("weights_sha256")
        if recorded:
            return str(recorded)
        if self.path is None:
            raise ArtifactError("an artifact built in memory has no weights file to key on")
        return sha256_file(self.path / WEIGHTS_FILE)


def package_versions() -> dict[str, str]:
    """Versions that matter for reproducing a model: python, torch, numpy, rayseg."""
    from seg_core import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "rayseg": __version__}


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a local file (used for the training manifest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reproducibility_record(*, seed: int | None, manifest_sha256: str | None = None,
                           fold: int | None = None, data_sha256: str | None = None,
                           data_rows: int | None = None) -> dict[str, Any]:
    """The ``reproducibility`` block: seed, package versions, the source listing's hash
    (``manifest_sha256``: the manifest's bytes, or the shard file list), the content hash of the
    training rows (``data_sha256``, None when it was not computed) and their count, and fold."""
    return {"seed": seed, "packages": package_versions(), "manifest_sha256": manifest_sha256,
            "data_sha256": data_sha256, "data_rows": data_rows, "fold": fold}


def save_artifact(path: str | Path, model: nn.Module, *, name: str, version: str,
                  mask_spec: MaskSpec, preprocessing: Preprocessing,
                  reproducibility: Mapping[str, Any] | None = None,
                  metrics: Mapping[str, Any] | None = None,
                  postprocess: PostProcess | None = None) -> Path:
    """Write ``artifact.json`` and ``weights.pt`` into directory ``path``; return the directory.

    ``model`` is a :class:`UNet`, possibly wrapped by DDP or ``torch.compile``, on any device.
    Missing reproducibility fields are filled in (package versions always are).  The JSON is
    written last, so a directory with ``artifact.json`` always has its weights.
    """
    unet = _unwrap(model)
    config = unet.config
    if config.num_classes != mask_spec.num_classes:
        raise ValueError(f"save_artifact: model has {config.num_classes} output classes but "
                         f"mask_spec.num_classes={mask_spec.num_classes}; they must match")
    if config.in_channels != preprocessing.channels:
        raise ValueError(f"save_artifact: model takes {config.in_channels} input channels but "
                         f"preprocessing.channels={preprocessing.channels}; they must match")
    record = reproducibility_record(seed=None)
    record.update(dict(reproducibility or {}))
    record["packages"] = {**package_versions(), **dict(record.get("packages") or {})}
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "model": to_dict(config),
        "mask_spec": to_dict(mask_spec),
        "preprocessing": to_dict(preprocessing),
        "reproducibility": record,
        "metrics": dict(metrics or {}),
        "postprocess": to_dict(postprocess.check(mask_spec.num_classes) if postprocess
                               else PostProcess()),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {_strip_prefix(k): v.detach().to("cpu").contiguous()
             for k, v in unet.state_dict().items()}
    _atomic_write(directory / WEIGHTS_FILE, lambda handle: torch.save(state, handle))
    meta["weights_sha256"] = sha256_file(directory / WEIGHTS_FILE)   # the artifact's identity
    text = json.dumps(_jsonable(meta), indent=2, sort_keys=False, allow_nan=False) + "\n"
    _atomic_write(directory / ARTIFACT_JSON, lambda handle: handle.write(text.encode()))
    return directory


def load_artifact(path: str | Path) -> Artifact:
    """Load an artifact directory written by :func:`save_artifact` (model on CPU, eval mode)."""
    directory = Path(path)
    meta = read_artifact_meta(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{directory}: {WEIGHTS_FILE} is missing; copy the whole artifact "
                            f"directory, not only {ARTIFACT_JSON}")
    try:
        model_config = from_dict(ModelConfig, meta["model"])
        mask_spec = from_dict(MaskSpec, meta["mask_spec"])
        preprocessing = from_dict(Preprocessing, meta["preprocessing"])
        postprocess = from_dict(PostProcess, meta.get("postprocess") or {}).check(
            mask_spec.num_classes)
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{directory / ARTIFACT_JSON}: invalid configuration ({error})") \
            from error
    model = UNet(model_config)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ArtifactError(f"{weights}: weights do not fit the model config in "
                            f"{ARTIFACT_JSON} ({error})") from error
    model.eval()
    return Artifact(model=model, model_config=model_config, mask_spec=mask_spec,
                    preprocessing=preprocessing, name=str(meta.get("name", "")),
                    version=str(meta.get("version", "")), meta=meta, path=directory,
                    postprocess=postprocess)


def write_calibration(path: str | Path, calibration: Mapping[str, Any]) -> None:
    """Record the confidence temperature fitted on val (:mod:`seg_core.calibration`) in the
    ``artifact.json`` of the artifact in ``path``; every engine applies it."""
    _update_meta(path, {"calibration": dict(calibration)})


def write_postprocess(path: str | Path, rules: PostProcess, evidence: Mapping[str, Any]) -> None:
    """Record the post-processing chosen for the artifact in ``path`` (and why) in its
    ``artifact.json``; the weights stay as they are."""
    meta = read_artifact_meta(path)
    _update_meta(path, {"postprocess": to_dict(rules.check(int(meta["mask_spec"]["num_classes"]))),
                        "postprocess_choice": dict(evidence)})


def _update_meta(path: str | Path, updates: Mapping[str, Any]) -> None:
    """``artifact.json`` of the artifact in ``path`` with ``updates``, rewritten whole."""
    directory = Path(path)
    meta = {**read_artifact_meta(directory), **updates}
    text = json.dumps(_jsonable(meta), indent=2, sort_keys=False, allow_nan=False) + "\n"
    _atomic_write(directory / ARTIFACT_JSON, lambda handle: handle.write(text.encode()))


def read_artifact_meta(path: str | Path) -> dict[str, Any]:
    """Read and check ``artifact.json`` only (cheap: no weights), refusing future formats."""
    file = Path(path) / ARTIFACT_JSON
    if not file.is_file():
        raise ArtifactError(f"{path}: no {ARTIFACT_JSON}; expected an artifact directory "
                            f"written by save_artifact (artifact.json + {WEIGHTS_FILE})")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{file}: not valid JSON ({error})") from error
    found = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(found, int):
        raise ArtifactError(f"{file}: format_version missing or not an integer (got {found!r})")
    if found > FORMAT_VERSION:
        raise ArtifactError(f"{file}: format_version {found} is newer than this rayseg supports "
                            f"({FORMAT_VERSION}); upgrade rayseg to load it")
    if found < 1:
        raise ArtifactError(f"{file}: format_version must be >= 1, got {found}")
    return meta


# ---------------------------------------------------------------------------------- helpers
def _unwrap(model: nn.Module) -> UNet:
    inner = model
    while isinstance(getattr(inner, "module", None) or getattr(inner, "_orig_mod", None),
                     nn.Module):  # DDP (.module) and torch.compile (._orig_mod), in any nesting
        inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod")
    if not isinstance(getattr(inner, "config", None), ModelConfig):
        raise TypeError(f"save_artifact: expected a UNet (with a ModelConfig .config), "
                        f"got {type(model).__name__}")
    return inner  # type: ignore[return-value]


def _strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _atomic_write(target: Path, write: Any) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    with open(temporary, "wb") as handle:
        write(handle)
    os.replace(temporary, target)


def _jsonable(value: Any) -> Any:
    """NumPy/torch scalars and arrays to plain JSON; NaN/inf become None (strict JSON)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(to_dict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _jsonable(value.tolist())
    if isinstance(value, (np.generic,)):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
