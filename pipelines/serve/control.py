"""Typed settings of the online endpoint and the calls that start, retune and stop it.

- :class:`ServeArgs`: the ``args:`` block of the Serve config, handed to the app builder
  ``pipelines.serve:build_app``.
- :class:`BatchSettings`: the deployment's ``user_config`` (``max_batch_size``,
  ``batch_wait_timeout_s``), applied by ``reconfigure`` in running replicas, beside ``model``:
  ``{uri, ref}``, the served artifact, which :func:`follow_model` moves after a promotion.
- :func:`start_endpoint` / :func:`reconfigure_endpoint` / :func:`follow_model` /
  :func:`stop_endpoint`: deploy the
  ``serve build``-style YAML (``jobs/configs/serve.yaml`` ships) on the connected Ray.

The YAML is applied as a declarative config, the way ``serve run serve.yaml`` and a KubeRay
RayService apply it, so the replica counts, autoscaling and batching in the file are what runs,
and a later ``user_config`` change reaches running replicas without restarting them.
"""
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from pipelines.config import BatchSettings, ServeArgs
from pipelines.storage import is_local, strip_scheme
from seg_core.config import from_dict

APP_NAME = "rayseg"
DEPLOYMENT_NAME = "SegmentService"
MODEL_KEY = "model"   # user_config entry naming the served model: {uri, ref}


# The config last applied per application name, so that reconfigure_endpoint can re-apply it
# with a new user_config (a lightweight update: replicas stay, Serve calls reconfigure).
_APPLIED: dict[str, dict[str, Any]] = {}


def load_serve_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A one-application Serve config as a plain dict, validated by Ray's own schema."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    if isinstance(config, (str, Path)):
        data = yaml.safe_load(Path(config).read_text())
    else:
        data = yaml.safe_load(yaml.safe_dump(dict(config)))  # a deep copy
    ServeDeploySchema.model_validate(data)  # raises with Ray's message on a malformed file
    count = len(data.get("applications") or [])
    if count != 1:
        raise ValueError(f"serve config: expected exactly one application, got {count}")
    return data


def start_endpoint(model_uri: str, out_uri: str | None = None, *,
                   config: str | Path | Mapping[str, Any],
                   host: str | None = None, port: int | None = None,
                   api_key_env: str | None = None, args: Mapping[str, Any] | None = None,
                   user_config: Mapping[str, Any] | None = None,
                   timeout_s: float = 180.0) -> str:
    """Deploy the endpoint (starting a local Ray if none is connected); return its base URL.

    ``config`` is a ``serve build``-style YAML (``jobs/configs/serve.yaml`` ships) or its dict;
    the other arguments override its ``http_options``, ``args`` and ``user_config``.  When
    ``api_key_env`` names a variable set in this process, its value reaches the replicas through
    the application's ``runtime_env`` (with the ``AWS_*`` variables, as for every rayseg job).
    Returns once ``GET /healthz`` answers 200.  The config is applied declaratively: it is the
    whole set of applications on this Serve instance, so one started from another config goes.
    """
    from pipelines import registry
    from pipelines.raycluster import worker_env

    data = load_serve_config(config)
    app = data["applications"][0]
    ref = registry.resolve(model_uri)   # replicas get the artifact, never the registry
    app["args"] = {**(app.get("args") or {}), **dict(args or {}), "model_uri": ref.source,
                   "model_ref": ref.registry_uri}
    if out_uri is not None:
        app["args"]["out_uri"] = out_uri
    if api_key_env is not None:
        app["args"]["api_key_env"] = api_key_env
    for key in ("model_uri", "out_uri"):   # replicas run elsewhere: no relative path leaves here
        if app["args"].get(key) and is_local(app["args"][key]):
            app["args"][key] = strip_scheme(app["args"][key])
    ServeArgs.model_validate(app["args"])  # fail here rather than inside the build task
    key_env = {api_key_env: os.environ[api_key_env]} \
        if api_key_env and os.environ.get(api_key_env) else None
    runtime_env = dict(app.get("runtime_env") or {})
    runtime_env["env_vars"] = {**worker_env(key_env), **(runtime_env.get("env_vars") or {})}
    app["runtime_env"] = runtime_env
    deployment = _deployment_entry(app)
    deployment["user_config"] = {**(deployment.get("user_config") or {}),
                                 **dict(user_config or {}), MODEL_KEY: model_pointer(ref)}
    data["http_options"] = {**(data.get("http_options") or {}),
                            **({"host": host} if host else {}), **({"port": port} if port else {})}
    _apply(data, timeout_s)
    url = endpoint_url(data)
    _wait_healthy(url, timeout_s)
    return url


def reconfigure_endpoint(app_name: str = APP_NAME, *, timeout_s: float = 60.0,
                         **user_config: Any) -> None:
    """Change ``user_config`` (``max_batch_size``, ``batch_wait_timeout_s``) of a running app."""
    if app_name not in _APPLIED:
        raise ValueError(f"no application {app_name!r} was started from this process; "
                         f"started: {sorted(_APPLIED)}")
    data = _APPLIED[app_name]
    deployment = _deployment_entry(data["applications"][0])
    deployment["user_config"] = {**(deployment.get("user_config") or {}), **user_config}
    _apply(data, timeout_s)


def follow_model(model_uri: str, app_name: str = APP_NAME, *,
                 timeout_s: float = 60.0) -> dict[str, Any]:
    """Point a running endpoint at ``model_uri`` (``models:/name@champion`` after a promotion):
    the replicas load it in ``reconfigure`` and swap it in between forwards, so no request fails
    and each answer names the version that made it.  Works from any process connected to the
    endpoint's Ray cluster (the config is read back from Serve when this process did not
    start it).  Returns the new model pointer."""
    from pipelines import registry

    pointer = model_pointer(registry.resolve(model_uri))
    if app_name not in _APPLIED:
        _APPLIED[app_name] = _deployed_config(app_name)
    reconfigure_endpoint(app_name, timeout_s=timeout_s, **{MODEL_KEY: pointer})
    return pointer


def model_pointer(ref: Any) -> dict[str, Any]:
    """The ``user_config`` entry that names the served model (see :func:`split_user_config`)."""
    source = strip_scheme(ref.source) if is_local(ref.source) else ref.source
    return {"uri": source, "ref": ref.registry_uri or source}


def split_user_config(user_config: Mapping[str, Any]) -> tuple[BatchSettings, dict | None]:
    """``user_config`` -> (batching, model pointer or None); unknown keys are refused."""
    settings = dict(user_config)
    pointer = settings.pop(MODEL_KEY, None)
    if pointer is not None and not (isinstance(pointer, Mapping) and pointer.get("uri")):
        raise ValueError(f"user_config.{MODEL_KEY}: expected {{uri: <artifact>, ref: <name>}}, "
                         f"got {pointer!r}")
    return from_dict(BatchSettings, settings), (dict(pointer) if pointer else None)


def _deployed_config(app_name: str) -> dict[str, Any]:
    """The declarative config Serve holds for ``app_name`` (from another process's deploy)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        raise ValueError(f"no Serve instance runs on this Ray cluster, so there is no "
                         f"application {app_name!r} to follow the promotion; connect to the "
                         f"endpoint's cluster (--address), or drop --serve-app")
    details = client.get_serve_details()
    app = (details.get("applications") or {}).get(app_name) or {}
    config = app.get("deployed_app_config")
    if not config:
        raise ValueError(f"no running Serve application {app_name!r} was deployed from a "
                         f"config; running: {sorted(details.get('applications') or {})}")
    return {"http_options": {k: v for k, v in (details.get("http_options") or {}).items()
                             if k in ("host", "port")},
            "proxy_location": details.get("proxy_location") or "EveryNode",
            "applications": [config]}


def stop_endpoint(app_name: str = APP_NAME, *, shutdown_serve: bool = True) -> None:
    """Delete the app (replicas drain, then flush their Parquet rows) and stop Serve.

    ``serve.delete`` returns only after every replica finished its graceful shutdown, so rows of
    every answered request are on storage when this returns, if storage was reachable; rows it
    could not take stay in the node's write-ahead log, for the next replica of the app there.
    """
    from ray import serve

    serve.delete(app_name, _blocking=True)
    _APPLIED.pop(app_name, None)
    if shutdown_serve:
        serve.shutdown()


def endpoint_url(data: Mapping[str, Any]) -> str:
    """Base URL of the (single) application in a Serve config, as seen from this machine."""
    http_options = data.get("http_options") or {}
    host = http_options.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    prefix = (data["applications"][0].get("route_prefix") or "/").rstrip("/")
    return f"http://{host}:{http_options.get('port', 8000)}{prefix}"


def replica_counts(app_name: str = APP_NAME) -> dict[str, int]:
    """Replicas per state (``RUNNING``, ``STARTING``, ``STOPPING``, ...) from ``serve.status()``."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return {}
    return {str(k): int(v) for k, v in app.deployments[DEPLOYMENT_NAME].replica_states.items()}


# ------------------------------------------------------------------------------------ internals
def _deployment_entry(app: dict[str, Any]) -> dict[str, Any]:
    entries = app.setdefault("deployments", [])
    for entry in entries:
        if entry.get("name") == DEPLOYMENT_NAME:
            return entry
    entries.append({"name": DEPLOYMENT_NAME})
    return entries[-1]


def _check_batching(data: Mapping[str, Any]) -> None:
    deployment = _deployment_entry(data["applications"][0])
    batch, _ = split_user_config(deployment.get("user_config") or {})
    limit = deployment.get("max_ongoing_requests", 5)  # Serve's default since 2.32
    if batch.max_batch_size > limit:
        raise ValueError(f"user_config.max_batch_size={batch.max_batch_size} exceeds "
                         f"max_ongoing_requests={limit}, so a batch could never fill; raise "
                         f"max_ongoing_requests to at least max_batch_size")


def _apply(data: dict[str, Any], timeout_s: float) -> None:
    """Start Serve with the config's HTTP options and apply the config; wait for RUNNING.

    This is what ``serve run serve.yaml`` does (``ray/serve/scripts.py``): the controller builds
    the application from ``import_path`` + ``args``.  Serve has no public Python call that
    applies a declarative config, so the two private calls live here and nowhere else.
    """
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    _check_batching(data)
    schema = ServeDeploySchema.model_validate(data)
    wanted = schema.http_options.model_dump()
    client = serve_api.serve_start(http_options=wanted, proxy_location=schema.proxy_location)
    running = client.get_serve_details().get("http_options") or {}
    if (running.get("host"), running.get("port")) != (wanted["host"], wanted["port"]):
        raise ValueError(f"Serve already listens on {running.get('host')}:{running.get('port')}, "
                         f"not {wanted['host']}:{wanted['port']}; call stop_endpoint() first, "
                         f"or ask for that address")
    client.deploy_apps(schema)
    name = schema.applications[0].name
    _APPLIED[name] = data
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        status = str(app.status) if app is not None else "NOT_STARTED"
        if status.endswith("RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED") or time.monotonic() > deadline:
            message = "" if app is None else "; ".join(
                [app.message] + [f"{n}: {d.message}" for n, d in app.deployments.items()
                                 if d.message])
            raise RuntimeError(f"serve application {name!r} is {status} after "
                               f"{timeout_s:.0f}s: {message}")
        time.sleep(0.2)


def _wait_healthy(url: str, timeout_s: float) -> None:
    """Poll ``GET <url>/healthz`` until 200 (the proxy learns new routes asynchronously)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = error
        time.sleep(0.2)
    raise RuntimeError(f"{url}/healthz did not answer 200 within {timeout_s:.0f}s: {last}")
