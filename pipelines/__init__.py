"""pipelines: the Ray layer of rayseg.

Shared ground at the root (config, records, storage, registry, ingest, pack, validate,
raycluster, demo) and six wings: ``train/``, ``predict/``, ``serve/``, ``evaluate/``,
``operate/``, ``api/`` (see
ARCHITECTURE.md at the repository root).

The H2O-style API is importable from here too (``from pipelines import init, import_file,
UNetSegmentationEstimator``); the names resolve lazily so that ``import pipelines`` stays cheap
and imports neither Ray nor torch.
"""
from __future__ import annotations

from typing import Any

_API = ("init", "import_file", "Frame", "UNetSegmentationEstimator", "ModelPerformance",
        "load_model", "get_model", "GridSearch", "AutoSegmentation")


def __getattr__(name: str) -> Any:
    if name in _API:
        from pipelines import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API))
