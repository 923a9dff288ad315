"""The notebook session: ``init`` (connect to Ray or start it), the work directory, and
``import_file``."""
from __future__ import annotations

import os
from typing import Any

from pipelines import storage
from pipelines.api.frame import Frame, read_frame

DEFAULT_WORK_DIR = "rayseg_work"
_SESSION: dict[str, Any] = {"work_dir": None}


# ------------------------------------------------------------------------------------ session


def init(address: str | None = None, *, num_cpus: int | None = None,
         work_dir: str | os.PathLike | None = None, quiet: bool = True) -> dict[str, float]:
    """Connect to a Ray cluster (``address``, or ``RAY_ADDRESS``), else start a local one.

    A local cluster gets every core (``num_cpus`` to change that) and an object store sized to
    leave room for PyTorch.  ``work_dir`` is where frames, checkpoints, models and predictions go
    (default ``./rayseg_work``; use an ``s3://`` prefix when the cluster has several nodes).
    Returns the cluster's resources.
    """
    from pipelines.raycluster import ensure_ray

    resources = ensure_ray(address=address, num_cpus=num_cpus, quiet=quiet)
    if work_dir is not None:
        _SESSION["work_dir"] = storage.as_uri(work_dir)
    print(f"rayseg: Ray ready ({resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU); "
          f"work dir {work_directory()}", flush=True)
    return resources


def _connected() -> None:
    """Every call that runs Ray work: :func:`init` with its defaults when it was not called."""
    import ray

    if not ray.is_initialized():
        init()


def work_directory() -> str:
    """The session's work directory (``init(work_dir=...)``, ``RAYSEG_WORK_DIR`` or rayseg_work)."""
    chosen = _SESSION["work_dir"] or os.environ.get("RAYSEG_WORK_DIR") or DEFAULT_WORK_DIR
    return storage.strip_scheme(chosen) if storage.is_local(chosen) else chosen


def import_file(path: str | os.PathLike, *,
                storage_options: dict[str, Any] | None = None) -> Frame:
    """A :class:`Frame` over a manifest (``.csv``/``.parquet``), a dataset directory holding
    ``manifest.csv``, a prefix with ``images/`` and ``masks/``, ``rayseg pack`` shards, or bulk
    predictions; any URI (local, ``file://``, ``s3://``) or ``pathlib.Path``.  Only metadata is
    read."""
    return read_frame(path, storage_options)


