"""Connect to a Ray cluster, or start a small local one that behaves on 2-core machines.

One helper, :func:`ensure_ray`, used by every job and by the test fixtures:

- ``address`` given (``"auto"``, ``"ray://host:10001"``, ``"10.0.0.5:6379"``): connect, change nothing.
- no address: start a local Ray with ``num_cpus`` (default: all cores), an object store capped so
  that it fits in ``/dev/shm`` and leaves room for PyTorch (notes §3.2), and no dashboard.
- The driver's ``AWS_*``, ``RAYSEG_*`` and ``RAY_DATA_*`` variables travel to every worker through
  ``runtime_env`` (notes §1.1: code that opens S3 inside a task needs them there).
- Local clusters read Parquet footers with one actor per 8 CPUs instead of Ray's 32 (see below).
- Logging is quiet (warnings only) and Ray Data progress bars are off unless ``quiet=False``.

Token authentication (on by default for local clusters since 2.59) is left as Ray sets it: rayseg
never calls the dashboard REST API, so nothing needs the token.  Set ``RAY_AUTH_MODE=disabled``
yourself only on a trusted single-user machine.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Mapping

_MB = 1024 * 1024
# Ray refuses object stores below ~75 MB; above ~2 GB nothing in rayseg's tests or single-node
# jobs benefits, and a smaller store leaves RAM for the model and decoded batches.
_MIN_STORE_MB, _MAX_STORE_MB = 128, 2048
_PROPAGATED_PREFIXES = ("AWS_", "RAYSEG_", "RAY_DATA_")
# Ray Data 2.60's Parquet reader (datasource V2) lists files through a pool of footer-reading
# actors, 32 by default, created afresh for every read_parquet: on a 2-core machine that costs
# 5-13 s per read against ~1 s for the V1 reader.  Small local clusters (<= 8 CPUs) use V1;
# others get one footer actor per 8 CPUs.  Explicit environment settings win.
_FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_DATASOURCE_V2_ENV = "RAY_DATA_USE_DATASOURCE_V2"
_SMALL_CLUSTER_CPUS = 8


def default_object_store_mb(total_ram_mb: int | None = None, shm_free_mb: int | None = None) -> int:
    """Object-store size for a local cluster: 20% of RAM, within 128 MB .. 2 GB and /dev/shm."""
    if total_ram_mb is None:
        total_ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // _MB
    if shm_free_mb is None:
        shm_free_mb = shutil.disk_usage("/dev/shm").free // _MB if os.path.isdir("/dev/shm") \
            else total_ram_mb
    size = min(int(total_ram_mb * 0.2), _MAX_STORE_MB, int(shm_free_mb * 0.8))
    return max(size, _MIN_STORE_MB)


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for workers: the driver's ``AWS_*`` / ``RAYSEG_*`` variables plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_PROPAGATED_PREFIXES) and v}
    env.update(extra or {})
    return env


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *,
               object_store_mb: int | None = None, env_vars: Mapping[str, str] | None = None,
               quiet: bool = True, **init_kwargs: Any) -> dict[str, float]:
    """Make sure this process is connected to Ray; returns the cluster's resources.

    Does nothing when Ray is already initialised (so tests can share one session cluster).

    Args:
        address: existing cluster to join; ``None`` starts a local one (or honours
            ``RAY_ADDRESS`` when that variable is set).
        num_cpus: CPUs for a local cluster (ignored when joining).  Default: all cores.
        object_store_mb: object store for a local cluster.  Default: :func:`default_object_store_mb`.
        env_vars: extra worker environment, on top of the propagated AWS variables.
        quiet: warnings-only logging and no Ray Data progress bars.
        init_kwargs: passed through to ``ray.init`` (e.g. ``namespace``).
    """
    import ray

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "runtime_env": {"env_vars": worker_env(env_vars)},
            "logging_level": logging.WARNING if quiet else logging.INFO,
            "log_to_driver": not quiet,
            **init_kwargs,
        }
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            kwargs.setdefault("num_cpus", num_cpus or os.cpu_count() or 1)
            _small_cluster_parquet(int(kwargs["num_cpus"]), kwargs["runtime_env"]["env_vars"])
            kwargs.setdefault("object_store_memory",
                              (object_store_mb or default_object_store_mb()) * _MB)
            kwargs.setdefault("include_dashboard", False)
        ray.init(address=address, **kwargs)
    if quiet:
        _quiet_data()
    return dict(ray.cluster_resources())


def _small_cluster_parquet(num_cpus: int, worker_vars: dict[str, str]) -> None:
    """Parquet reader settings for a local cluster of ``num_cpus`` (see the module constants)."""
    settings = {_FOOTER_ACTORS_ENV: str(max(1, min(32, num_cpus // 8)))}
    if num_cpus <= _SMALL_CLUSTER_CPUS:
        settings[_DATASOURCE_V2_ENV] = "0"
    for name, value in settings.items():
        os.environ.setdefault(name, value)           # the driver plans the read
        worker_vars.setdefault(name, os.environ[name])
    if os.environ.get(_DATASOURCE_V2_ENV) == "0":    # ray.data may already be imported
        from ray.data import DataContext

        DataContext.get_current().use_datasource_v2 = False


def _quiet_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    # "Dataset ... execution finished" and "Data sink Parquet finished" are INFO lines per run.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ... and a warning that progress bars are off, which is what quiet asked for.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
