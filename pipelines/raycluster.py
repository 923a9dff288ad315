"""Connect to a Ray cluster, or start a small local one that behaves on 2-core machines.

One helper, :func:`ensure_ray`, used by every job and by the test fixtures:

- ``address`` given (``"auto"``, ``"ray://host:10001"``, ``"10.0.0.5:6379"``): connect, change nothing.
- no address: start a local Ray with ``num_cpus`` (default: all cores), an object store capped so
  that it fits in ``/dev/shm`` and leaves room for PyTorch (notes §3.2), and no dashboard.
- The driver's ``AWS_*``, ``RAYSEG_*`` and ``RAY_DATA_*`` variables travel to every worker through
  ``runtime_env`` (notes §1.1: code that opens S3 inside a task needs them there).
- Local clusters read Parquet footers with one actor per 8 CPUs instead of Ray's 32 (see below).
- Logging is quiet (warnings only) and Ray Data progress bars are off unless ``quiet=False``
  or ``RAYSEG_VERBOSE=1`` (what ``rayseg --verbose`` sets).  Quiet also drops Ray lines that are
  known to be benign and would read as faults (see :func:`quiet_known_noise`); everything else
  Ray warns about still shows, and every dropped line is still in the session's log files.

Token authentication (on by default for local clusters since 2.59) is left as Ray sets it: rayseg
never calls the dashboard REST API, so nothing needs the token.  Set ``RAY_AUTH_MODE=disabled``
yourself only on a trusted single-user machine.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from typing import Any, Iterator, Mapping

_MB = 1024 * 1024
# A local cluster's object store, as Ray sizes it by default (ray._private.utils.
# resolve_object_store_memory): 30% of the available RAM, at most 200 GB; rayseg also keeps it
# within /dev/shm (95% of what is free there), where Ray would fall back to a slower disk file.
# Ray refuses stores below ~75 MB.  A 2 GB cap before made a 400 MiB dataset stream on a
# 24 GiB box (issue 30).
_MIN_STORE_MB, _MAX_STORE_MB = 128, 200_000
_STORE_SHARE, _SHM_SHARE = 0.3, 0.95
_STORE_NOTE: list[str] = []   # why the local store has its size, for the training's data line
_PROPAGATED_PREFIXES = ("AWS_", "RAYSEG_", "RAY_DATA_")
# Ray Data 2.60's Parquet reader (datasource V2) lists files through a pool of footer-reading
# actors, 32 by default, created afresh for every read_parquet: on a 2-core machine that costs
# 5-13 s per read against ~1 s for the V1 reader.  Small local clusters (<= 8 CPUs) use V1;
# others get one footer actor per 8 CPUs.  Explicit environment settings win.
_FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_DATASOURCE_V2_ENV = "RAY_DATA_USE_DATASOURCE_V2"
_SMALL_CLUSTER_CPUS = 8
VERBOSE_ENV = "RAYSEG_VERBOSE"   # "1": Ray's own logs in full (``rayseg --verbose`` sets it)
# Ray pushes "Task X failed. There are N retries remaining, so the task will be retried" to the
# driver's terminal for every retried task; Serve's own shutdown triggers one on each stop.
_RETRY_NOTICE_ENV = "RAY_enable_output_error_log_if_still_retry"


def default_object_store_mb(available_ram_mb: int | None = None,
                            shm_free_mb: int | None = None) -> int:
    """Object-store size for a local cluster: 30% of the available RAM (as Ray's default),
    within 95% of the free /dev/shm, 128 MB .. 200 GB."""
    return _store_plan(available_ram_mb, shm_free_mb)[0]


def _store_plan(available_ram_mb: int | None = None,
                shm_free_mb: int | None = None) -> tuple[int, str]:
    """(MB, the sentence saying why) for :func:`default_object_store_mb`."""
    if available_ram_mb is None:
        available_ram_mb = available_memory_mb()
    if shm_free_mb is None:
        shm_free_mb = shutil.disk_usage("/dev/shm").free // _MB if os.path.isdir("/dev/shm") \
            else available_ram_mb
    share, shm = int(available_ram_mb * _STORE_SHARE), int(shm_free_mb * _SHM_SHARE)
    size = max(min(share, shm, _MAX_STORE_MB), _MIN_STORE_MB)
    why = (f"30% of {available_ram_mb:,} MiB available RAM" if size == share else
           f"95% of the {shm_free_mb:,} MiB free in /dev/shm" if size == shm else
           f"Ray's floor of {_MIN_STORE_MB} MiB" if size == _MIN_STORE_MB else
           f"Ray's cap of {_MAX_STORE_MB:,} MiB")
    return size, why


def available_memory_mb() -> int:
    """RAM this process may still use: /proc/meminfo's MemAvailable, within a cgroup's limit
    (a container's), else the physical total."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // _MB
    found = total
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) // 1024
                    break
    except OSError:
        pass
    for path, used_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                            ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                             "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(path) as limit_file, open(used_path) as used_file:
                limit, used = limit_file.read().strip(), used_file.read().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) // _MB < total:
            found = min(found, max(int(limit) - int(used), 0) // _MB)
        break
    return found


def store_note() -> str:
    """`` (<why>)`` when this process started the local cluster with the default store size,
    else empty."""
    return f" ({_STORE_NOTE[-1]})" if _STORE_NOTE else ""


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for workers: the driver's ``AWS_*`` / ``RAYSEG_*`` variables plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_PROPAGATED_PREFIXES) and v}
    env.update(extra or {})
    return env


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *,
               object_store_mb: int | None = None, env_vars: Mapping[str, str] | None = None,
               quiet: bool | None = None, **init_kwargs: Any) -> dict[str, float]:
    """Make sure this process is connected to Ray; returns the cluster's resources.

    Does nothing when Ray is already initialised (so tests can share one session cluster).

    Args:
        address: existing cluster to join; ``None`` starts a local one (or honours
            ``RAY_ADDRESS`` when that variable is set), never joining a cluster that a
            ``ray start`` elsewhere on this machine recorded.
        num_cpus: CPUs for a local cluster (ignored when joining).  Default: all cores.
        object_store_mb: object store for a local cluster.  Default: :func:`default_object_store_mb`.
        env_vars: extra worker environment, on top of the propagated AWS variables.
        quiet: warnings-only logging, no Ray Data progress bars, known-benign Ray lines dropped
            (:func:`quiet_known_noise`).  Default: quiet unless ``RAYSEG_VERBOSE=1``.
        init_kwargs: passed through to ``ray.init`` (e.g. ``namespace``).
    """
    import ray

    if quiet is None:
        quiet = not verbose_requested()
    if quiet:
        quiet_known_noise()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "runtime_env": {"env_vars": worker_env(env_vars)},
            "logging_level": logging.WARNING if quiet else logging.INFO,
            "log_to_driver": not quiet,
            **init_kwargs,
        }
        address = address or os.environ.get("RAY_ADDRESS") or None
        local = address is None
        if local:
            kwargs.setdefault("num_cpus", num_cpus or os.cpu_count() or 1)
            _small_cluster_parquet(int(kwargs["num_cpus"]), kwargs["runtime_env"]["env_vars"])
            if object_store_mb is None and "object_store_memory" not in kwargs:
                object_store_mb, why = _store_plan()
                _STORE_NOTE.append(why)
            kwargs.setdefault("object_store_memory", object_store_mb * _MB)
            kwargs.setdefault("include_dashboard", False)
        with _serve_ingress_env(local):
            # "local", not None: given None, ray.init joins the cluster that the last `ray start`
            # (or ray.cluster_utils.Cluster) on this machine recorded in
            # /tmp/ray/ray_current_cluster, then refuses num_cpus or waits on a dead address
            ray.init(address=address or "local", **kwargs)
    if quiet:
        _quiet_data()
        _absorb_actor_arg_notice()
    return dict(ray.cluster_resources())


_HA_PROXY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # An ingress replica that stops drains for this long first (Ray's default: 30 s, so that
    # HAProxy on other nodes stops routing to it).  On one machine HAProxy sees the change at
    # once; with 30 s, an endpoint stopped within 30 s of replacing a replica shut Ray down
    # under the draining one, and its rows waited in the write-ahead log for the next start.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


# How often the Ray Train controller polls its workers (Ray's default: 2 s).  Each change of a
# run's state waits for a poll, and a run goes through several: on this 2-core box a 2-epoch
# training took 16.0 s in `fit` at 2 s and 11.0 s at 0.5 s.  At the end of a run, from the
# train function's return to fit()'s, 0.5 s polls took 1.5 s and 0.2 s polls 0.85 s (0.1 s gave
# no more); the controller's own CPU went from 0.005 to 0.008 of a core while training.  Long
# runs do not notice; short ones (the demo, a fold, a tuning trial, every test) pay it each
# time.  A local cluster has no cloud preemption notices either, so no process is started to
# watch for them.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                  "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# How long an idle task worker is kept (Ray's default: 1 s).  Ray kills a task worker idle that
# long once the node has more worker processes than CPUs, and actors count: with predictor
# actors (or Ray Train's) holding most of a node, nearly every read, decode or write task that
# comes more than a second after the last one starts a fresh Python process, about 2 s of CPU
# to import Ray, Ray Data and pyarrow.  On this 2-core box a 4,000-image `rayseg predict` at 128²
# from shards started 11 such processes and took 68-72 s (34-35 ms of CPU per image); with
# workers kept 30 s it took 56-57 s (28 ms), two runs each, alternated.  An idle worker holds
# its memory that much longer: 190 MB RSS, 130 MB PSS after a write task's imports.
WORKER_KEEP_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "30000"}
# The endpoint's guard against request headers Ray Serve cannot take (its proxy and replicas
# decode the request id as UTF-8 before the app runs): pipelines.serve.http.HeaderGuard.
INGRESS_CALLBACK_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH":
                        "pipelines.serve.http:ingress_middlewares"}


@contextlib.contextmanager
def _serve_ingress_env(local: bool) -> Iterator[None]:
    """While a local Ray starts: Ray Serve's HAProxy ingress (:data:`_HA_PROXY_ENV`) when
    ``haproxy`` is on PATH and ``RAY_SERVE_ENABLE_HA_PROXY`` is not set already, the Ray
    Train poll interval (:data:`TRAIN_POLL_ENV`), the idle workers' keep time
    (:data:`WORKER_KEEP_ENV`) and the endpoint's header guard (:data:`INGRESS_CALLBACK_ENV`)
    unless they are set.

    Ray reads the variables in its own processes (controller, proxies, replicas), which inherit
    them from the raylet started here; this process's environment is left as it was.  On this
    2-core box HAProxy halved the endpoint's p50 at concurrency 1 (README, ``serve`` benchmark).
    In that mode the replicas also listen on ports 30000-31000 of every interface (Ray's
    design: HAProxy on other nodes must reach them); the API key still applies there.  A
    cluster (KubeRay) sets the HAProxy variable in its pod spec instead
    (``infra/rayservice.yaml``); ``RAY_SERVE_ENABLE_HA_PROXY=0`` keeps Ray's proxy actor.
    """
    if not local:
        yield
        return
    wanted = {**TRAIN_POLL_ENV, **WORKER_KEEP_ENV, **INGRESS_CALLBACK_ENV}
    if "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ and shutil.which("haproxy"):
        wanted.update(_HA_PROXY_ENV)
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def verbose_requested() -> bool:
    """True when ``RAYSEG_VERBOSE`` asks for Ray's logs in full (``rayseg --verbose``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


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


# ------------------------------------------------------------------- known-benign Ray output
#
# A fresh `rayseg demo` on Ray 2.60 printed these besides its own lines; each reads as a fault
# and is not one.  They stay in the session logs (/tmp/ray/session_latest/logs) and all come back
# with `rayseg --verbose`.
#
# - "Token authentication is enabled for this Ray cluster ..." (ray._private.authentication):
#   a notice that Ray's secure default is on.  The opposite warning (auth *disabled*) is kept.
# - "The Ray cluster currently does not have any available CPUs. The Dataset job will hang ..."
#   (ray.data.dataset): Ray Data samples `ray.available_resources()` once as a dataset starts;
#   right after a job with an actor pool the pool's CPUs are still being released (measured: 0.5
#   of 2 CPUs free for ~0.25 s), so the next job triggers it and does not hang.  Kept when CPUs
#   stay unavailable for a few seconds: that is the real hang it warns about.
# - "INFO ... serve -- Started Serve in namespace" (ray.serve): Serve sets its driver logger to
#   INFO on start, past the warnings-only level `ray.init` was given.
# - "(raylet) Task ServeController.graceful_shutdown failed. There are infinite retries
#   remaining": Serve's controller kills itself while `serve.shutdown()` waits on it; every stop.
#   Ray's switch for these retry notices (RAY_enable_output_error_log_if_still_retry) is set to
#   0 unless already set; a task that finally fails still raises its error.
# - "core_worker.cc: Actor ... 'MapWorker(MapBatches(...))' has constructor arguments in the
#   object store and max_restarts > 0": Ray Data passes every actor pool's UDF to its actors as
#   an ObjectRef that the operator keeps alive (ray-project/ray#57733; our constructor arguments
#   are a few strings).  A C++ line logged once per process, so :func:`_absorb_actor_arg_notice`
#   spends that once on a throw-away actor with stderr muted.

_FILTERS_INSTALLED = False
_ACTOR_NOTICE_ABSORBED = False
_CPU_RECHECK_S = 3.0


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class _BelowWarning(logging.Filter):
    """Drops INFO and DEBUG records (a filter outlives the logger's own ``setLevel``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


class _TransientNoCpus(logging.Filter):
    """Ray Data's "no available CPUs" warning, kept only if no CPU frees up within a few seconds."""

    marker = "The Ray cluster currently does not have any available CPUs"

    def filter(self, record: logging.LogRecord) -> bool:
        if self.marker not in record.getMessage():
            return True
        import ray

        deadline = time.monotonic() + _CPU_RECHECK_S
        while time.monotonic() < deadline:
            try:
                if ray.available_resources().get("CPU", 0) > 0:
                    return False
            except Exception:  # Ray going away: let the warning through
                return True
            time.sleep(0.1)
        return True


def quiet_known_noise() -> None:
    """Install the filters for the known-benign Ray lines above (idempotent, before ``ray.init``)."""
    global _FILTERS_INSTALLED
    os.environ.setdefault(_RETRY_NOTICE_ENV, "0")
    if _FILTERS_INSTALLED:
        return
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _DropMessages("Token authentication is enabled for this Ray cluster"))
    logging.getLogger("ray.data.dataset").addFilter(_TransientNoCpus())
    logging.getLogger("ray.serve").addFilter(_BelowWarning())
    _FILTERS_INSTALLED = True


def _absorb_actor_arg_notice() -> None:
    """Spend Ray's once-per-process "constructor arguments in the object store" line on a
    throw-away actor while stderr is muted (it still goes to the driver's log file)."""
    global _ACTOR_NOTICE_ABSORBED
    import ray

    if _ACTOR_NOTICE_ABSORBED or ray.util.client.ray.is_connected():
        return
    _ACTOR_NOTICE_ABSORBED = True

    @ray.remote(num_cpus=0, max_restarts=1)
    class _Absorb:
        def __init__(self, ref: Any) -> None:
            pass

    import sys

    ref = ray.put(None)
    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):   # no usable stderr: nothing to keep clean
        return
    try:
        os.dup2(devnull, 2)
        actor = _Absorb.remote(ref)   # Ray logs the line here, synchronously, on this thread
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    ray.kill(actor)


# --------------------------------------------------------------------------- storage contract

SHARED_FS_ENV = "RAYSEG_SHARED_FS"   # comma-separated local prefixes every node mounts


class StorageContractError(ValueError):
    """A local path given to a job on a multi-node cluster, where other nodes cannot see it."""


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creator actor is dead; return how many.

    A placement group made by a (non-detached) actor lives until its *job* ends, even after that
    actor is killed: Ray removes it only once both its creator job and its creator actor are
    dead.  When Tune stops a trial, it kills the trial's actor, and with it (their owner) the
    task running ``train()`` and the Ray Train controller that task created; the controller's
    worker placement group stays, holding its CPUs for the rest of the driver's life, and enough
    of them leave the next trials waiting for CPUs forever (issue 28's grid search hang).
    Nothing can use such a group any more: the workers placed in it were owned by the dead
    controller.  Removing it only gives the resources back.
    """
    import ray
    from ray._private import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    table = gcs_pb2.PlacementGroupTableData
    live = (table.PENDING, table.PREPARED, table.CREATED, table.RESCHEDULING)
    job = ray.get_runtime_context().get_job_id()
    removed = 0
    # Ray's public placement_group_table() leaves out who created a group: read the GCS record
    for raw in state.state._connect_and_get_accessor().get_placement_group_table():
        group = table.FromString(raw)
        if (group.state in live and not group.is_detached and group.creator_actor_dead
                and group.creator_actor_id.strip(b"\xff") and group.creator_job_id.hex() == job):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
            removed += 1
    return removed


def wait_note(what: str, needed: Mapping[str, float], *, settle_s: float = 1.0) -> str | None:
    """The line to print before ``what`` asks Ray for ``needed`` at once (e.g. ``{"CPU": 1.0}``:
    its first actor and a read task), when the cluster has less of it free; else None.

    Ray then queues the job without a word until other work frees the resources: Ray Data warns
    once after a minute without output, Ray Train's controller only with ``--verbose``.  A job
    started beside a Serve app, or in a notebook beside another job's actors, looked hung.
    A shortfall is looked at again for ``settle_s`` (tasks that just ended may still count as
    holding theirs), so a job that fits pays one call.  Free resources spread over several
    nodes may still not fit one actor: this only sees sums.
    """
    import ray

    deadline = time.monotonic() + settle_s
    while True:
        free, total = ray.available_resources(), ray.cluster_resources()
        short = [(name, amount) for name, amount in needed.items()
                 if amount > 0 and free.get(name, 0.0) + 1e-6 < amount]
        if not short:
            return None
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    wanted = ", ".join(f"{amount:g} {name} ({free.get(name, 0.0):g} of {total.get(name, 0.0):g} "
                       f"free now)" for name, amount in short)
    return (f"{what}: waiting for {wanted}. Other work in this cluster holds the rest (a Serve "
            f"app, another job's actors or tasks; `ray status` shows what is in use). It starts "
            f"when they are freed or a node joins.")


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_shared(uris: Mapping[str, str | None], *, nodes: int | None = None) -> None:
    """Refuse, before any work, local paths that tasks on other nodes would not see.

    ``uris`` maps each setting's name (as the user writes it: ``--out``, ``storage.storage_path``)
    to its URI.  On a cluster of more than one node every one must be in object storage
    (``s3://``, ``gs://``, ...) or under a prefix listed in ``RAYSEG_SHARED_FS`` (an NFS or
    similar mount present on every node).  On one node anything goes.
    """
    from pipelines import storage

    nodes = alive_nodes() if nodes is None else nodes
    if nodes <= 1:
        return
    shared = [p.rstrip("/") for p in os.environ.get(SHARED_FS_ENV, "").split(",") if p]
    bad = [(key, uri) for key, uri in uris.items()
           if uri and storage.is_local(uri) and not any(
               storage.strip_scheme(uri) == root or storage.strip_scheme(uri).startswith(
                   root + "/") for root in shared)]
    if bad:
        listed = "; ".join(f"{key}={uri}" for key, uri in bad)
        raise StorageContractError(
            f"this Ray cluster has {nodes} nodes, and {listed} is a local path: tasks, workers "
            f"and replicas on the other nodes would read or write their own disks (lost or "
            f"scattered data). Use object storage (s3://bucket/...) for it, or declare a "
            f"filesystem every node mounts: {SHARED_FS_ENV}=/mnt/shared")


def check_manifest_shared(key: str, source: str, *, nodes: int | None = None) -> None:
    """:func:`check_shared` for ``source`` and, when it is a manifest, every file it names."""
    nodes = alive_nodes() if nodes is None else nodes
    check_shared({key: source}, nodes=nodes)
    if nodes <= 1 or not source.lower().endswith((".csv", ".tsv", ".parquet")):
        return
    from pipelines import ingest

    if ingest.detect_kind(source) != "manifest":
        return
    table = ingest.read_manifest(source)
    for column in ("image_uri", "mask_uri"):
        for value in table[column].to_pylist():
            for uri in ingest.mask_part_uris(value):
                check_shared({f"{key} row {column.split('_')[0]} {uri}": uri}, nodes=nodes)
