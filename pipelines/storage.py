"""The one place that knows about storage: URIs -> filesystems, small-object helpers.

Every other module passes plain URIs (``s3://bkt/key``, ``gs://bkt/key``, ``file:///abs``, or a local
path).  The S3 endpoint and credentials come from ``storage_options`` or, failing that, the standard
AWS variables (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so MinIO and
moto work with the same code as AWS.

Ray Data accepts the ``pyarrow.fs.FileSystem`` returned by :func:`filesystem_for` together with the
scheme-less path it returns.  Ray Train's ``RunConfig(storage_filesystem=fs)`` needs that scheme-less
path too (notes §1.1: with ``s3://`` the TrainController dies).  Code that opens URIs *inside* Ray
tasks should call :func:`resolve_options` on the driver and ship the resulting dict, so the workers
see the driver's endpoint even when their environment lacks it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.fs as pafs

StorageOptions = Mapping[str, Any]
Uri = str | os.PathLike  # every function here takes a pathlib.Path wherever it takes a URI

S3_ENV = (
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED",
)
# storage_options keys we understand, with their fsspec/s3fs spellings as aliases.
_ALIASES = {
    "endpoint_url": "endpoint_override", "key": "access_key", "secret": "secret_key",
    "token": "session_token", "region_name": "region", "anon": "anonymous",
}
S3_CONNECT_TIMEOUT_S, S3_REQUEST_TIMEOUT_S = 10.0, 120.0
_S3_KEYS = ("endpoint_override", "access_key", "secret_key", "session_token", "region",
            "anonymous", "scheme", "request_timeout", "connect_timeout")
_S3_STORE_LOCK = threading.Lock()

# ---------------------------------------------------------------------------------- filesystems


def as_uri(uri: Uri) -> str:
    """A URI or path as ``str``: ``pathlib.Path`` (any ``os.PathLike``) is accepted everywhere."""
    if isinstance(uri, str):
        return uri
    if isinstance(uri, os.PathLike):
        return os.fspath(uri)
    raise TypeError(f"expected a URI or path (str or os.PathLike), got {type(uri).__name__} "
                    f"{uri!r}")


def path_fields(config: Any, *names: str) -> None:
    """Normalise the URI fields ``names`` of a frozen dataclass: ``pathlib.Path`` (any
    ``os.PathLike``) becomes ``str``, and a local path becomes absolute (``file://`` dropped).

    Configs are built on the driver; the tasks, actors and replicas that read these paths run
    in other processes (and on a cluster, other machines) with another working directory, so a
    relative path must not leave the driver.
    """
    for name in names:
        value = getattr(config, name)
        if value is not None and (isinstance(value, os.PathLike) or is_local(value)):
            object.__setattr__(config, name, strip_scheme(value))


def scheme_of(uri: Uri) -> str:
    """``"s3"``, ``"gs"``, ... or ``"file"`` for local paths (``"models"`` for registry URIs,
    ``models:/name@alias``, which have one slash)."""
    uri = as_uri(uri)
    if uri.startswith("models:/"):
        return "models"
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def is_local(uri: Uri) -> bool:
    return scheme_of(uri) == "file"


def strip_scheme(uri: Uri) -> str:
    """``s3://bkt/p`` -> ``bkt/p``; ``file:///a/b`` and relative paths -> absolute local path."""
    uri = as_uri(uri)
    if is_local(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return os.path.abspath(os.path.expanduser(path))
    return uri.split("://", 1)[1]


def resolve_options(storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """Explicit S3 options: ``storage_options`` (fsspec or pyarrow spellings) over the AWS env vars.

    The result is a plain dict, safe to ship to Ray workers.
    """
    opts: dict[str, Any] = {}
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_override"] = endpoint
    for key, var in (("access_key", "AWS_ACCESS_KEY_ID"), ("secret_key", "AWS_SECRET_ACCESS_KEY"),
                     ("session_token", "AWS_SESSION_TOKEN")):
        if env.get(var):
            opts[key] = env[var]
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
    if region:
        opts["region"] = region
    for key, value in (storage_options or {}).items():
        name = _ALIASES.get(key, key)
        if name == "client_kwargs" and isinstance(value, Mapping):   # s3fs style
            if value.get("endpoint_url"):
                opts["endpoint_override"] = value["endpoint_url"]
            if value.get("region_name"):
                opts["region"] = value["region_name"]
            continue
        if name not in _S3_KEYS:
            raise ValueError(
                f"storage_options: unknown key {key!r}; expected some of "
                f"{sorted(set(_S3_KEYS) | set(_ALIASES))}"
            )
        opts[name] = value
    return opts


def filesystem_for(uri: Uri, storage_options: StorageOptions | None = None
                   ) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path without scheme)`` for ``uri``.

    Filesystems are cached per scheme and options, so calling this per object is cheap.
    """
    scheme = scheme_of(uri)
    path = strip_scheme(uri)
    opts = resolve_options(storage_options) if scheme in ("s3", "s3a") else {}
    return _filesystem(scheme, tuple(sorted(opts.items()))), path


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, opts: tuple[tuple[str, Any], ...]) -> pafs.FileSystem:
    if scheme == "file":
        return pafs.LocalFileSystem()
    if scheme in ("s3", "s3a"):
        kw = dict(opts)
        endpoint = kw.get("endpoint_override")
        if endpoint:
            kw.setdefault("scheme", "http" if str(endpoint).startswith("http://") else "https")
            # pyarrow wants host:port when scheme is separate; it also accepts the full URL.
        kw.setdefault("region", "us-east-1")   # avoids a region lookup against the endpoint
        # a stalled endpoint fails the read (and the row is quarantined or retried) instead of
        # hanging a task forever; storage_options can set other values
        kw.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
        kw.setdefault("request_timeout", S3_REQUEST_TIMEOUT_S)
        return pafs.S3FileSystem(**kw)
    if scheme == "gs":
        return pafs.GcsFileSystem()
    import fsspec  # anything else (memory://, az://, ...) through fsspec

    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))


def _with_scheme(uri: Uri, path: str) -> str:
    """Re-attach ``uri``'s scheme to a scheme-less ``path`` returned by a filesystem."""
    return path if is_local(uri) else f"{scheme_of(uri)}://{path}"


# ------------------------------------------------------------------------------------ URI helpers


def join_uri(base: Uri, *parts: Uri) -> str:
    """Join path parts onto ``base`` with ``/`` (keeps the scheme; ``..`` is normalised)."""
    base, parts = as_uri(base), tuple(as_uri(p) for p in parts)
    if is_local(base):
        return os.path.normpath(os.path.join(strip_scheme(base), *parts))
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, *parts))}"


def parent_uri(uri: Uri) -> str:
    """The directory holding ``uri``."""
    uri = as_uri(uri)
    if is_local(uri):
        return os.path.dirname(strip_scheme(uri))
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


def resolve_against(base_dir: Uri, ref: Uri) -> str:
    """``ref`` if it is absolute (scheme or ``/``), else ``ref`` relative to ``base_dir``.

    An absolute ``/path`` stays a local path even against an object-storage ``base_dir``
    (ingest's path policy then refuses it there, rather than reading ``s3:///path``).
    """
    base_dir, ref = as_uri(base_dir), as_uri(ref)
    if "://" in ref or os.path.isabs(ref):
        return ref
    return join_uri(base_dir, ref)


# ----------------------------------------------------------------------------------- object I/O


def read_bytes(uri: Uri, storage_options: StorageOptions | None = None) -> bytes:
    """Whole object as bytes.  Raises ``FileNotFoundError`` when it does not exist."""
    fs, path = filesystem_for(uri, storage_options)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: Uri, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Create or replace one object, all at once: readers see the old object or the complete
    new one, never a part (local parent directories are created).

    The bytes go to a hidden sibling first (``.<name>.<random>.tmp``: Parquet readers, Ray Data
    and :func:`list_uri` with a suffix skip it) and are then published under ``uri`` by a rename
    (local) or a server-side copy (S3).  A failed upload can leave only the hidden sibling, and
    it is deleted: an S3 output stream that fails midway still completes its multipart upload
    on close, which would otherwise publish a truncated object under the final key.
    """
    fs, path = filesystem_for(uri, storage_options)
    directory, name = path.rsplit("/", 1) if "/" in path else ("", path)
    staging = f"{directory}/.{name}.{uuid.uuid4().hex[:12]}.tmp" if directory else \
        f".{name}.{uuid.uuid4().hex[:12]}.tmp"
    if is_local(uri):
        fs.create_dir(directory or ".", recursive=True)
    try:
        with fs.open_output_stream(staging) as stream:
            stream.write(data)
        if is_local(uri):
            fs.move(staging, path)          # rename(2): atomic on one filesystem
        else:
            fs.copy_file(staging, path)     # CopyObject: the key appears complete or not at all
            fs.delete_file(staging)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(staging)
        raise


def create_exclusive(uri: Uri, data: bytes, storage_options: StorageOptions | None = None) -> bool:
    """Create ``uri`` holding ``data`` only if nothing is there yet; False when something is.

    Atomic against a concurrent creator: ``O_CREAT | O_EXCL`` locally, a conditional PUT
    (``If-None-Match: *``) on S3, so of two writers racing for one key exactly one wins.
    """
    uri = as_uri(uri)
    if is_local(uri):
        path = strip_scheme(uri)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True
    if scheme_of(uri) != "s3":
        raise NotImplementedError(f"{uri}: exclusive create is implemented for local paths and "
                                  f"s3:// only")
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    bucket, _, key = strip_scheme(uri).partition("/")
    try:   # If-None-Match: *; a 412 answer (something is there) is AlreadyExistsError
        obstore.put(_object_store(bucket, resolve_options(storage_options)), key, data,
                    mode="create")
    except (AlreadyExistsError, PreconditionError):
        return False
    return True


def read_object_start(uri: Uri, nbytes: int, storage_options: StorageOptions | None = None
                      ) -> tuple[int, Any] | None:
    """One ranged GET of an S3 object's first ``nbytes``: ``(its whole size, the unread body)``,
    or None when no object has that key (missing, or a prefix).

    The size comes from the answer's headers, so a caller can refuse a huge object before
    reading any of its body (``body.close()``); a read is one request, not a HEAD and a GET.
    Errors other than a missing key raise ``OSError``, as pyarrow's do.

    The GET goes through obstore (Rust's ``object_store``): 0.35 ms of the reader's CPU per
    40 kB object from moto on this box, against 1.2 ms through botocore (docs/benchmarks.md),
    which was most of what a loose object cost Ray's workers more than a packed shard's row.
    """
    import obstore
    from obstore.exceptions import BaseError

    bucket, _, key = strip_scheme(uri).partition("/")
    store = _object_store(bucket, resolve_options(storage_options))
    try:
        answer = obstore.get(store, key, options={"range": (0, max(1, nbytes))})
    except FileNotFoundError:   # NoSuchKey, NoSuchBucket
        return None
    except (BaseError, OSError) as error:
        first = str(error).split("\n", 1)[0]   # the rest is a debug dump of the request
        if "InvalidRange" in str(error):   # the object is empty: no byte 0 to start from
            return 0, io.BytesIO(b"")
        raise OSError(f"{uri}: {first}") from error
    return answer.meta["size"], _Body(answer)


class _Body:
    """An obstore answer as the readable, closable body :func:`read_object_start` returns."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def read(self) -> bytes:
        return bytes(self.answer.bytes())

    def close(self) -> None:
        self.answer = None   # an unread body is dropped with the answer


def _object_store(bucket: str, opts: Mapping[str, Any]) -> Any:
    """An obstore ``S3Store`` for ``bucket`` from :func:`resolve_options`' dict, cached per
    bucket and options like :func:`filesystem_for`'s filesystems (stores are thread-safe;
    fetch threads ask at once)."""
    with _S3_STORE_LOCK:
        return _object_store_for(bucket, tuple(sorted(opts.items())))


@functools.lru_cache(maxsize=32)
def _object_store_for(bucket: str, opts: tuple[tuple[str, Any], ...]) -> Any:
    from datetime import timedelta

    from obstore.store import S3Store

    kw = dict(opts)
    endpoint = kw.get("endpoint_override")
    if endpoint and "://" not in str(endpoint):
        endpoint = f"{kw.get('scheme', 'https')}://{endpoint}"
    config: dict[str, Any] = {"region": kw.get("region", "us-east-1"),
                              "virtual_hosted_style_request": not endpoint}  # as pyarrow's
    if endpoint:
        config["endpoint"] = endpoint
    if kw.get("anonymous"):
        config["skip_signature"] = True
    elif kw.get("access_key"):
        config.update(access_key_id=kw["access_key"], secret_access_key=kw.get("secret_key"))
        if kw.get("session_token"):
            config["session_token"] = kw["session_token"]
    provider = None if "skip_signature" in config or "access_key_id" in config else \
        _botocore_credentials()
    client = {"allow_http": str(endpoint or "").startswith("http://"),
              "connect_timeout": timedelta(seconds=kw.get("connect_timeout",
                                                          S3_CONNECT_TIMEOUT_S)),
              "timeout": timedelta(seconds=kw.get("request_timeout", S3_REQUEST_TIMEOUT_S))}
    return S3Store(bucket, config=config, client_options=client,  # type: ignore[arg-type]
                   retry_config={"max_retries": 2},   # three tries, as pyarrow's and botocore's
                   credential_provider=provider)


def _botocore_credentials() -> Any:
    """An obstore credential provider asking botocore's chain (the shared credentials file,
    profiles, SSO, web identity, instance roles: what pyarrow's filesystem and the AWS CLI
    find).  Refreshable keys are asked for again every 5 minutes; where the chain finds none,
    each request fails saying so (obstore would otherwise try the instance metadata service
    again, even where ``AWS_EC2_METADATA_DISABLED`` says not to)."""
    import datetime as dt

    import botocore.credentials
    import botocore.session

    found = botocore.session.Session().get_credentials()
    refreshable = isinstance(found, botocore.credentials.RefreshableCredentials)

    def provide() -> dict[str, Any]:
        if found is None:
            raise PermissionError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a "
                "profile in ~/.aws/credentials, or storage_options (key, secret; anon: true "
                "for a public bucket)")
        frozen = found.get_frozen_credentials()
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token,
                "expires_at": dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)
                if refreshable else None}

    return provide


def delete(uri: Uri, storage_options: StorageOptions | None = None) -> None:
    """Delete one object or file; a missing one is fine."""
    fs, path = filesystem_for(uri, storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def open_uri(uri: Uri, storage_options: StorageOptions | None = None):
    """A random-access binary file object for reading ``uri`` (write with :func:`write_bytes`)."""
    fs, path = filesystem_for(uri, storage_options)
    return fs.open_input_file(path)


def exists(uri: Uri, storage_options: StorageOptions | None = None) -> bool:
    """True when ``uri`` is an existing object or directory (prefix)."""
    fs, path = filesystem_for(uri, storage_options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(prefix: Uri, *, recursive: bool = True, suffixes: tuple[str, ...] = (),
               storage_options: StorageOptions | None = None) -> list[tuple[str, int]]:
    """Sorted ``(uri, size in bytes)`` of the files under ``prefix``, optionally by suffix."""
    fs, path = filesystem_for(prefix, storage_options)
    selector = pafs.FileSelector(path.rstrip("/"), recursive=recursive, allow_not_found=True)
    lowered = tuple(s.lower() for s in suffixes)
    return sorted(
        (_with_scheme(prefix, info.path), int(info.size or 0))
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File and (not lowered or info.path.lower().endswith(lowered))
    )


def list_uri(prefix: Uri, *, recursive: bool = True, suffixes: tuple[str, ...] = (),
             storage_options: StorageOptions | None = None) -> list[str]:
    """Sorted URIs of the files under ``prefix`` (optionally only those ending in ``suffixes``)."""
    return [uri for uri, _ in list_files(prefix, recursive=recursive, suffixes=suffixes,
                                         storage_options=storage_options)]


def file_sizes(uris: list[str], storage_options: StorageOptions | None = None) -> list[int | None]:
    """Size of each object in bytes, ``None`` where it does not exist (one metadata call each)."""
    sizes: list[int | None] = []
    for uri in uris:
        fs, path = filesystem_for(uri, storage_options)
        info = fs.get_file_info(path)
        sizes.append(int(info.size) if info.type == pafs.FileType.File else None)
    return sizes


def copy_dir_to_local(uri: Uri, local_dir: str | os.PathLike,
                      storage_options: StorageOptions | None = None) -> Path:
    """Download every file under ``uri`` into ``local_dir`` (a local ``uri`` is copied too)."""
    fs, path = filesystem_for(uri, storage_options)
    dest = Path(local_dir)
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return dest


ARTIFACT_CACHE = Path(tempfile.gettempdir()) / "rayseg-artifacts"


def fetch_artifact(uri: Uri, storage_options: StorageOptions | None = None) -> Path:
    """A local directory holding the model artifact at ``uri``; the one way an artifact gets
    onto a machine (predict actors, Serve replicas, evaluate, export, the notebook API).

    A local artifact is used where it is.  One in object storage is copied once per node into
    ``<tmp>/rayseg-artifacts/<weights sha256>-<artifact.json sha256[:16]>/``: every actor and
    replica of that node shares the copy, and a new artifact at the same URI gets its own when
    its weights *or* its ``artifact.json`` differ (the same weights saved with another tile size,
    class names or settings are another model to predict with).  The copy is
    staged under a hidden name, its weights are checked against the recorded hash, and it is
    renamed into place whole, so a reader never sees half a copy.
    """
    from seg_core.artifact import ARTIFACT_JSON, WEIGHTS_FILE, sha256_file

    uri = as_uri(uri)
    if is_local(uri):
        return Path(strip_scheme(uri))
    meta = read_bytes(join_uri(uri, ARTIFACT_JSON), storage_options)
    recorded = json.loads(meta).get("weights_sha256")   # artifacts before 0.2 lack it
    described = hashlib.sha256(meta).hexdigest()
    key = f"{recorded}-{described[:16]}" if recorded else hashlib.sha256(
        as_uri(uri).encode() + meta).hexdigest()
    target = ARTIFACT_CACHE / key
    if (target / ARTIFACT_JSON).is_file():
        return target
    staging = ARTIFACT_CACHE / f".{key}.{uuid.uuid4().hex[:8]}"
    try:
        copy_dir_to_local(uri, staging, storage_options)
        if recorded and sha256_file(staging / WEIGHTS_FILE) != recorded:
            raise ValueError(f"{uri}: {WEIGHTS_FILE} does not match the weights_sha256 in "
                             f"{ARTIFACT_JSON} (changed while it was copied?); try again")
        try:
            os.rename(staging, target)    # whole, or another process was first: use theirs
        except OSError:
            if not (target / ARTIFACT_JSON).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def copy_dir_from_local(local_dir: str | os.PathLike, uri: Uri,
                        storage_options: StorageOptions | None = None) -> str:
    """Upload every file under ``local_dir`` to ``uri``; returns ``uri``."""
    uri = as_uri(uri)
    fs, path = filesystem_for(uri, storage_options)
    if is_local(uri):
        fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return uri


def s3_env() -> dict[str, str]:
    """The AWS variables set on this process, for a Ray ``runtime_env={"env_vars": ...}``."""
    return {name: os.environ[name] for name in S3_ENV if os.environ.get(name)}


def write_table(table: pa.Table, uri: str, storage_options: StorageOptions | None = None) -> str:
    """Write one Parquet file at ``uri`` (zstd), all at once (:func:`write_bytes`); returns it."""
    write_bytes(uri, parquet_bytes(table), storage_options)
    return uri


def parquet_bytes(table: pa.Table, compression: str | dict[str, str] = "zstd") -> bytes:
    """``table`` as the bytes of one Parquet file (serialised whole before anything is written)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue().to_pybytes()


def read_table(uri: Uri, storage_options: StorageOptions | None = None) -> pa.Table:
    """Read a Parquet file or a directory of Parquet files at ``uri``."""
    import pyarrow.parquet as pq

    fs, path = filesystem_for(uri, storage_options)
    return pq.read_table(path, filesystem=fs)
