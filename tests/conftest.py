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
