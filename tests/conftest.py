"""Shared fixtures: a local S3 (moto), one Ray cluster per session, and the generated sample data.

All fixtures are lazy: seg_core tests that use none of them never import ray or moto.

Fixtures (session-scoped unless noted):

- ``RAYSEG_TRACKING_URI`` is set (at import) to a SQLite file in a fresh temp dir: every training
  in the session registers there.
- ``s3_endpoint`` -> ``"http://127.0.0.1:<port>"``.  moto's S3 server, bound to loopback only, on
  a free port.  Sets ``AWS_ENDPOINT_URL``, dummy ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_DEFAULT_REGION=us-east-1`` and ``AWS_EC2_METADATA_DISABLED=true`` in ``os.environ`` for the
  whole session, so ``pipelines.storage`` (and Ray workers started afterwards) find it.
- ``s3_bucket`` -> ``"rayseg-test"``: a bucket created on that server.
- ``s3_prefix`` (function scope) -> ``"s3://rayseg-test/<test-name>-<uuid>"``: a fresh prefix.
- ``ray_session`` -> ``ray.cluster_resources()``: one local Ray (2 CPUs, 300 MB object store, no
  dashboard) via :func:`pipelines.raycluster.ensure_ray`, started after the S3 variables are set
  so workers inherit them.  Shared by every pipelines/jobs test; never call ``ray.shutdown()``.
- ``sample_dataset`` -> ``Path`` of ``manifest.csv`` of the generated sample dataset (24 pairs,
  96x96, 3 classes, all five image formats), built once in a session temp dir.
- ``s3_sample_dataset`` -> ``"s3://rayseg-test/sample/manifest.csv"``: the same dataset uploaded
  (manifest with relative paths, so it resolves against its own S3 location).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path

import pytest

# One throwaway registry and tracking store per test session (pipelines.registry), never the
# repository's rayseg_work/mlflow.db.
os.environ.setdefault("RAYSEG_TRACKING_URI", "sqlite:///" + os.path.join(
    tempfile.mkdtemp(prefix="rayseg-mlflow-"), "mlflow.db"))


def _ports_of_this_worker() -> dict[str, str]:
    """Under ``make test``'s pytest-xdist workers (``gw0``, ``gw1``, ...), each worker's Ray
    serves with HAProxy on ports of its own: Ray Serve's HAProxy binds fixed stats (8404) and
    metrics (9101) ports and hands replicas ports from 30000 up, so a second local cluster's
    endpoint on the same machine fails to start ("cannot bind socket").  Ray's defaults stay
    free for jobs the tests run as a fresh shell would (``rayseg demo``)."""
    import socket

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return {}
    n = int(worker[2:])

    def free() -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return str(sock.getsockname()[1])

    http, grpc = 31100 + 250 * n, 41100 + 250 * n   # past Ray's 30000-31000 and 40000-41000
    return {"RAY_SERVE_HAPROXY_STATS_PORT": free(), "RAY_SERVE_HAPROXY_METRICS_PORT": free(),
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http + 249),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + 249)}


for _name, _value in _ports_of_this_worker().items():
    os.environ.setdefault(_name, _value)

S3_BUCKET = "rayseg-test"
RAY_TEST_CPUS = 2
RAY_TEST_OBJECT_STORE_MB = 300


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny convolutions (and direct Segmenter calls next to Ray
    workers) run several times faster on one thread than on a contended 2-core pool."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def position_model():
    """The position-dependent task's U-Net of ``tests.geometry_reference``, trained once for the
    session on one torch thread (a few seconds): the geometry and the engine tests share it."""
    import torch

    from tests.geometry_reference import train_position_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_position_model()
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start moto's S3 server on 127.0.0.1:<free port> and point the AWS variables at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    patch = pytest.MonkeyPatch()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        patch.setenv(name, value)
    patch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    patch.delenv("AWS_SESSION_TOKEN", raising=False)
    yield endpoint
    patch.undo()
    server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint):
    """Name of a bucket that exists on the moto server."""
    import pyarrow.fs as pafs

    from pipelines.storage import resolve_options

    fs = pafs.S3FileSystem(**resolve_options(), scheme="http", allow_bucket_creation=True)
    fs.create_dir(S3_BUCKET)
    return S3_BUCKET


@pytest.fixture
def s3_prefix(s3_bucket, request):
    """A fresh ``s3://`` prefix for one test."""
    name = request.node.name.replace("[", "-").replace("]", "")[:40]
    return f"s3://{s3_bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole session (2 CPUs, capped object store, no dashboard)."""
    from pipelines.raycluster import ensure_ray

    resources = ensure_ray(num_cpus=RAY_TEST_CPUS, object_store_mb=RAY_TEST_OBJECT_STORE_MB)
    yield resources
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> Path:
    """Generated sample dataset (24 pairs, all five formats); returns its manifest.csv path."""
    from seg_core.sample_data import generate_sample_dataset

    root = tmp_path_factory.mktemp("sample")
    return Path(generate_sample_dataset(root, n=24, size=(96, 96), num_classes=3, seed=0))


@pytest.fixture(scope="session")
def s3_sample_dataset(sample_dataset, s3_bucket) -> str:
    """The sample dataset uploaded to ``s3://<bucket>/sample/``; returns the manifest's URI."""
    from pipelines.storage import copy_dir_from_local

    root = copy_dir_from_local(sample_dataset.parent, f"s3://{s3_bucket}/sample")
    return f"{root}/{sample_dataset.name}"


# ------------------------------------------------------------------------- fault injection


@pytest.fixture(scope="session")
def fault_env():
    """``with fault_env(fail_at_step=3): train(cfg)``: the tests' private fault channel
    (:mod:`pipelines.faults`, an environment variable the driver reads), armed for the
    block; for module-scoped fixtures, where ``monkeypatch`` is not available."""
    from pipelines.faults import ENV

    @contextlib.contextmanager
    def arm(**faults: int):
        before = os.environ.get(ENV)
        os.environ[ENV] = json.dumps(faults)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = before

    return arm


@pytest.fixture
def inject_faults(monkeypatch):
    """``inject_faults(nan_at_step=5)``: arm the fault channel for the rest of one test."""
    from pipelines.faults import ENV

    def arm(**faults: int) -> None:
        monkeypatch.setenv(ENV, json.dumps(faults))

    return arm


# ------------------------------------------------------------------------------------- tiers
#
# Markers (pyproject.toml): ``ray`` starts or joins Ray, ``cluster`` runs a multi-node cluster on
# 127.0.0.1, ``browser`` drives Chromium, ``slow`` takes long without them.  ``make test-fast``
# runs what needs none of them.  A test that asks for ``ray_session`` (directly or through a
# fixture) is marked ``ray`` here; modules that start Ray otherwise say so with ``pytestmark``.


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


def pytest_sessionfinish(session, exitstatus):
    """The fast tier must not start Ray: fail it if something did anyway (a missing marker)."""
    import sys

    expression = session.config.getoption("markexpr", "") or ""
    if "not ray" in expression and "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            session.exitstatus = 1
            print(f"\nA test selected by -m {expression!r} started Ray; mark it ray "
                  f"(tests/conftest.py)", file=sys.stderr)


# ------------------------------------------------------------------------- the watchdog

# pytest-timeout fails a test past its limit by raising from a SIGALRM handler; code that
# catches BaseException in a wait loop (Ray's, or a retry of ours) swallows that, and the test
# then hangs until CI's own limit ends the run and lands nothing.  So a test still running
# WATCHDOG_GRACE_S after its limit ends the whole run, with every thread's stack on stderr.
WATCHDOG_GRACE_S = 120


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import faulthandler

    try:   # pytest's own copy of stderr, made before output capture (a private name)
        from _pytest.faulthandler import fault_handler_stderr_fd_key
    except ImportError:   # a pytest without it: no watchdog, pytest-timeout alone
        return (yield)
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0] if marker and marker.args else
                  item.config.getini("timeout") or 0)
    if not limit or fault_handler_stderr_fd_key not in item.config.stash:
        return (yield)
    # dump_traceback_later keeps one timer per process: pytest's own (faulthandler_timeout)
    # is unset here, so this one is the only one
    faulthandler.dump_traceback_later(limit + WATCHDOG_GRACE_S, exit=True,
                                      file=item.config.stash[fault_handler_stderr_fd_key])
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


# ----------------------------------------------------------------------- torch's globals


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Whatever a test sets of torch's process-wide settings (threads, default dtype,
    deterministic algorithms, cuDNN flags), the next test starts from what it found.  Module
    fixtures that set threads for their module (``one_torch_thread``) are in place before this
    runs, so their setting is what is restored between their tests."""
    import sys

    if "torch" not in sys.modules:   # seg_core-free tests never import it
        yield
        return
    import torch

    saved = (torch.get_num_threads(), torch.get_default_dtype(),
             torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    threads, dtype, deterministic, cudnn_deterministic, cudnn_benchmark = saved
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = cudnn_deterministic
    torch.backends.cudnn.benchmark = cudnn_benchmark

