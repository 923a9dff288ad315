"""The model registry and run tracking: MLflow's tracking store and Model Registry.

- Every ``rayseg train`` (not CV folds) is an MLflow run: params, per-epoch metrics, the learning
  curve, and its artifact registered as a new version of the registered model ``<name>``.
- ``models:/<name>/<version>`` and ``models:/<name>@<alias>`` resolve wherever a model URI is
  taken (predict, evaluate, serve, promote, monitor, ``load_model``): :func:`resolve` turns them
  into the artifact's own URI, on the driver; actors and replicas only ever see that URI.
- The artifact stays where training wrote it (``<models_uri>/<name>/<version>/``, local or
  object storage); a model version records that URI as its ``source`` and the weights' SHA-256
  as a tag, and :func:`resolve` refuses a version whose files were overwritten since.

Backend: ``RAYSEG_TRACKING_URI`` or ``MLFLOW_TRACKING_URI`` when set (a shared MLflow server:
``http://mlflow:5000``), else an embedded SQLite file ``<work dir>/mlflow.db`` (work dir:
``RAYSEG_WORK_DIR`` when local, else ``./rayseg_work``).  The registry is only ever opened by the
driver process of a job, so the SQLite file need not be shared across nodes; a multi-node team
that promotes from several machines sets the server URI.

MLflow is imported lazily (about 1.2 s) by the calls that need it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from pipelines import storage

if TYPE_CHECKING:
    from mlflow import MlflowClient

MODELS_PREFIX = "models:/"
TRACKING_ENV = "RAYSEG_TRACKING_URI"
EXPERIMENT = "rayseg"
WEIGHTS_TAG = "weights_sha256"
DATA_TAG = "data_sha256"
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
_MODELS_URI = re.compile(rf"^models:/(?P<name>{_NAME})(?:/(?P<version>\d+)|@(?P<alias>{_NAME}))$")


class RegistryError(ValueError):
    """A ``models:/`` URI that does not resolve, or a registry call that cannot be done."""


@dataclass(frozen=True)
class ModelRef:
    """Where a model URI leads: the artifact URI, plus its registry identity when it has one."""

    uri: str                          # as given
    source: str                       # the artifact directory (local path or s3://...)
    name: str | None = None           # registered model name
    version: str | None = None        # registry version number ("3")
    alias: str | None = None          # the alias it was reached through
    weights_sha256: str | None = None  # recorded at registration

    @property
    def registry_uri(self) -> str | None:
        """``models:/name/3`` (the immutable form), or None outside the registry."""
        return f"{MODELS_PREFIX}{self.name}/{self.version}" if self.version else None

    def as_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "source": self.source, "registered_name": self.name,
                "registry_version": self.version, "alias": self.alias,
                "registry_uri": self.registry_uri}


def is_models_uri(uri: Any) -> bool:
    return isinstance(uri, str) and uri.startswith(MODELS_PREFIX)


def tracking_uri() -> str:
    """The tracking and registry backend (see the module docstring)."""
    chosen = os.environ.get(TRACKING_ENV) or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return chosen
    work = os.environ.get("RAYSEG_WORK_DIR") or "rayseg_work"
    if not storage.is_local(work):
        work = "rayseg_work"   # SQLite needs a local file; the driver's own work dir
    path = os.path.abspath(os.path.join(storage.strip_scheme(work), "mlflow.db"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return f"sqlite:///{path}"


@functools.lru_cache(maxsize=4)
def _client_for(uri: str) -> "MlflowClient":
    for name in ("mlflow", "alembic", "mlflow.store.db.utils"):   # table set-up chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow import MlflowClient

    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)          # both stores open (and create or
        client.search_registered_models(max_results=1)    # upgrade their tables) right here
    return client


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """One process at a time opens a SQLite store: an exclusive lock on ``<db>.lock``.

    Processes that open a new store together race MLflow's table creation; two Tune trials
    registering at once failed with alembic's "Online migration expected to match one row"
    and "table _alembic_tmp_tags already exists".  A server store needs no lock.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    with open(uri[len("sqlite:///"):] + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def client() -> "MlflowClient":
    return _client_for(tracking_uri())


def parse(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name/3`` -> ``(name, "3", None)``; ``models:/name@champion`` -> alias."""
    match = _MODELS_URI.match(uri)
    if not match:
        raise RegistryError(f"{uri!r} is not a registry URI; expected models:/<name>/<version> "
                            f"or models:/<name>@<alias>")
    return match["name"], match["version"], match["alias"]


def resolve(uri: str) -> ModelRef:
    """``uri`` as a :class:`ModelRef`; any other URI (path, ``s3://``) stands for itself."""
    if not is_models_uri(uri):
        return ModelRef(uri=uri, source=uri)
    from mlflow.exceptions import MlflowException

    name, version, alias = parse(uri)
    try:
        found = client().get_model_version_by_alias(name, alias) if alias else \
            client().get_model_version(name, version)
    except MlflowException as error:
        known = ", ".join(sorted(m.name for m in client().search_registered_models())) or "none"
        raise RegistryError(f"{uri}: not in the registry at {tracking_uri()} "
                            f"({error.message.splitlines()[0]}); registered models: {known}. "
                            f"Train one (rayseg train registers it) or promote a version to "
                            f"that alias (rayseg promote)") from None
    ref = ModelRef(uri=uri, source=found.source, name=name, version=str(found.version),
                   alias=alias, weights_sha256=(found.tags or {}).get(WEIGHTS_TAG))
    _check_unchanged(ref)
    return ref


def resolve_source(uri: str) -> str:
    """The artifact URI behind ``uri`` (itself unless it is a ``models:/`` URI)."""
    return resolve(uri).source if is_models_uri(uri) else uri


def _check_unchanged(ref: ModelRef) -> None:
    """Refuse a version whose artifact was overwritten after registration (same name and
    version retrained in place): its rows would carry another model's identity."""
    if not ref.weights_sha256:
        return
    import json

    from seg_core.artifact import ARTIFACT_JSON

    try:
        meta = json.loads(storage.read_bytes(storage.join_uri(ref.source, ARTIFACT_JSON)))
    except FileNotFoundError:
        raise RegistryError(f"{ref.uri}: the artifact of version {ref.version} is gone from "
                            f"{ref.source}") from None
    if meta.get("weights_sha256") != ref.weights_sha256:
        raise RegistryError(
            f"{ref.uri}: version {ref.version} was registered with weights "
            f"{ref.weights_sha256[:12]}, but {ref.source} now holds "
            f"{str(meta.get('weights_sha256'))[:12]} (retrained in place under the same name and "
            f"version?); use the newer registry version, or train with a fresh version string")


# ----------------------------------------------------------------------------- registration


def register(source: str, name: str, *, weights_sha256: str, run_id: str | None = None,
             tags: Mapping[str, Any] | None = None, description: str | None = None) -> ModelRef:
    """A new version of registered model ``name`` pointing at the artifact ``source``."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    all_tags = {WEIGHTS_TAG: weights_sha256, **{k: str(v) for k, v in (tags or {}).items()}}
    version = mlflow_client.create_model_version(name, source=source, run_id=run_id,
                                                 tags=all_tags, description=description)
    return ModelRef(uri=f"{MODELS_PREFIX}{name}/{version.version}", source=source, name=name,
                    version=str(version.version), weights_sha256=weights_sha256)


def register_artifact(source: str, name: str | None = None) -> ModelRef:
    """Register an artifact that training did not register (name: the artifact's own);
    an artifact whose weights are already a version of that name returns that version."""
    import json

    from seg_core.artifact import ARTIFACT_JSON

    meta = json.loads(storage.read_bytes(storage.join_uri(source, ARTIFACT_JSON)))
    name = name or str(meta["name"])
    sha = meta.get("weights_sha256")
    for version in versions(name):
        if sha and version.weights_sha256 == sha:
            return version
    return register(source, name, weights_sha256=sha or "",
                    tags={"artifact_version": meta.get("version", "")})


def versions(name: str) -> list[ModelRef]:
    """Every version of ``name``, newest first (empty when it is not registered)."""
    found = client().search_model_versions(f"name = '{name}'")
    refs = [ModelRef(uri=f"{MODELS_PREFIX}{name}/{v.version}", source=v.source, name=name,
                     version=str(v.version), weights_sha256=(v.tags or {}).get(WEIGHTS_TAG))
            for v in found]
    return sorted(refs, key=lambda r: -int(r.version or 0))


def alias_holder(name: str, alias: str) -> ModelRef | None:
    """The version that ``name@alias`` points at, or None when the alias is unset."""
    from mlflow.exceptions import MlflowException

    try:
        return resolve(f"{MODELS_PREFIX}{name}@{alias}")
    except RegistryError:
        return None
    except MlflowException:
        return None


def set_alias(ref: ModelRef, alias: str, *, tags: Mapping[str, Any] | None = None) -> None:
    """Point ``ref.name@alias`` at ``ref``'s version (and tag the version with ``tags``)."""
    if not ref.name or not ref.version:
        raise RegistryError(f"{ref.uri}: only registered versions take aliases")
    client().set_registered_model_alias(ref.name, alias, ref.version)
    tag_version(ref, tags or {})


def version_tags(ref: ModelRef) -> dict[str, str]:
    """The registry tags of ``ref``'s version."""
    return dict(client().get_model_version(ref.name, ref.version).tags or {})


def tag_version(ref: ModelRef, tags: Mapping[str, Any]) -> None:
    """Set ``tags`` on ``ref``'s registry version."""
    for key, value in tags.items():
        client().set_model_version_tag(ref.name, ref.version, key, str(value))


def provenance(ref: ModelRef, meta: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """The reproducibility record written next to predictions and evaluations: which model
    (URI, registry version, weights hash, training data hash), which packages, when, and
    ``fields`` (inputs, settings, counts)."""
    import datetime as dt

    from seg_core.artifact import package_versions

    trained = dict(meta.get("reproducibility") or {})
    return {"model": {**ref.as_dict(), "name": meta.get("name"), "version": meta.get("version"),
                      "weights_sha256": meta.get("weights_sha256"),
                      "training_data_sha256": trained.get("data_sha256"),
                      "training_manifest_sha256": trained.get("manifest_sha256")},
            **fields, "packages": package_versions(),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


# ----------------------------------------------------------------------------- run tracking


def log_training_run(*, run_name: str, params: Mapping[str, Any],
                     history: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
                     files: Sequence[str], tags: Mapping[str, Any],
                     started_at: float | None = None) -> str:
    """One MLflow run for a finished training (started at ``started_at``, epoch seconds; it
    ends now): params, per-epoch metrics, final metrics, the learning curve and metrics files;
    returns the run id."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else \
        mlflow_client.create_experiment(EXPERIMENT, artifact_location=_artifact_location())
    run = mlflow_client.create_run(experiment_id, run_name=run_name,
                                   start_time=int(started_at * 1000) if started_at else None,
                                   tags={k: str(v) for k, v in tags.items()})
    run_id = run.info.run_id
    from mlflow.entities import Metric, Param

    metrics = []
    for record in history:
        step = int(record.get("epoch", 0))
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and value == value:
                metrics.append(Metric(key, float(value), 0, step))
    metrics += [Metric(f"final_{k}", float(v), 0, 0) for k, v in summary.items()
                if isinstance(v, (int, float)) and v == v]
    flat = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(flat), 100):        # MLflow's batch limits: 100 params,
        mlflow_client.log_batch(run_id, params=flat[start:start + 100])
    for start in range(0, len(metrics), 1000):    # 1000 metrics per call
        mlflow_client.log_batch(run_id, metrics=metrics[start:start + 1000])
    for path in files:
        mlflow_client.log_artifact(run_id, path)
    mlflow_client.set_terminated(run_id)
    return run_id


def _artifact_location() -> str | None:
    """Run files (learning curves) beside an embedded SQLite store; a server keeps its own."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")


def training_runs(limit: int = 100) -> list[Any]:
    """The newest ``limit`` training runs of the tracking store (MLflow ``Run`` objects)."""
    experiment = client().get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return list(client().search_runs([experiment.experiment_id], max_results=limit,
                                     order_by=["attributes.start_time DESC"]))


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one logged metric of a run, by step."""
    return sorted((m.step, m.value) for m in client().get_metric_history(run_id, key))


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """A nested config dict as MLflow params: ``{"optim.lr": 0.001, ...}``."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: value}
