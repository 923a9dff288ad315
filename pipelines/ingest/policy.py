"""What ingest will read: the path policy (:func:`path_refusal`) and reads bounded in size
(:func:`read_limited`), so a manifest naming ``/dev/zero`` or a 30 GB object costs one request
and none of its bytes."""
from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from typing import Literal, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines import storage
from seg_core.codecs import DEFAULT_MAX_PIXELS
from seg_core.errors import InputError

SourceKind = Literal["auto", "manifest", "prefix", "shards"]
MASK_SEPARATOR = ";"
IGNORE_PREFIX = "ignore="  # a multi-label mask part naming a binary ignore mask
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
_FETCH_THREADS = 16
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"   # how Ray writes a null partition value (pack)
DEFAULT_MAX_BYTES = 4 * DEFAULT_MAX_PIXELS    # per object read: 256 MiB at the 64 Mpx guard
_SPECIAL_ROOTS = ("/proc", "/dev", "/sys", "/run")   # never image files, sometimes secrets
ALLOWED_ROOTS_ENV = "RAYSEG_ALLOWED_ROOTS"   # prefixes a manifest may reach outside its dir


def path_refusal(raw: str, resolved: str, manifest_dir: str,
                 allowed_roots: Sequence[str] = ()) -> InputError | None:
    """Why the manifest cell ``raw`` (resolved to ``resolved``) may not be read, or None.

    - a relative path stays inside the manifest's directory (no ``../`` out of it);
    - a manifest in object storage names no local file (absolute path or ``file://``);
    - nothing under ``/proc``, ``/dev``, ``/sys`` or ``/run``.
    ``allowed_roots`` (URI prefixes; default: the comma-separated ``RAYSEG_ALLOWED_ROOTS``)
    lifts the first two rules for paths under them.
    """
    def refuse(why: str) -> InputError:
        return InputError("path_refused", why, source=resolved,
                          hint=f"keep data under the manifest's directory, or allow its root "
                               f"explicitly: {ALLOWED_ROOTS_ENV}=<prefix>[,<prefix>...]")

    local = storage.is_local(resolved)
    path = storage.strip_scheme(resolved) if local else ""
    if local and any(path == root or path.startswith(root + "/") for root in _SPECIAL_ROOTS):
        return refuse(f"{path} is a system path, not a data file")
    roots = allowed_roots or [r for r in os.environ.get(ALLOWED_ROOTS_ENV, "").split(",") if r]
    if any(resolved == root.rstrip("/") or resolved.startswith(root.rstrip("/") + "/")
           for root in map(storage.as_uri, roots)):
        return None
    if local and not storage.is_local(manifest_dir):
        return refuse(f"a manifest in object storage ({manifest_dir}) names the local file "
                      f"{path}")
    relative = "://" not in raw and not raw.startswith("/")
    root = manifest_dir.rstrip("/") + "/"
    if relative and not resolved.startswith(root):
        return refuse(f"the relative path {raw!r} leaves the manifest's directory "
                      f"{manifest_dir}")
    return None


def read_limited(uri: str, storage_options: storage.StorageOptions | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> bytes | None:
    """The bytes of a regular file or object of at most ``max_bytes``; None when missing.

    Raises :class:`InputError` (``not_a_file``, ``too_large``) for a FIFO, device, directory or
    an object over the limit: a manifest row naming ``/dev/zero`` or a 30 GB object costs one
    request, not the task's memory.  An S3 object costs one request: a GET of at most
    ``max_bytes + 1`` bytes whose answer gives the object's size before any of its body is read
    (a missing key costs a look more, to tell a prefix from nothing); other object stores
    cost pyarrow's HEAD (the size, checked first) and GET.
    """
    fs, path = storage.filesystem_for(uri, storage_options)
    if storage.scheme_of(uri) in ("s3", "s3a"):
        return _read_s3_object(fs, path, uri, max_bytes, storage_options)
    if not storage.is_local(uri):
        return _read_object(fs, path, uri, max_bytes)
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(found.st_mode):
        raise _not_a_file(uri, "not a regular file (a directory, device, pipe or socket)")
    limit = _too_large(uri, found.st_size, max_bytes)
    if limit:
        raise limit
    with fs.open_input_stream(path) as stream:
        return _read_at_most(stream, uri, max_bytes)


def _read_s3_object(fs: pafs.FileSystem, path: str, uri: str, max_bytes: int,
                    storage_options: storage.StorageOptions | None) -> bytes | None:
    found = storage.read_object_start(uri, max_bytes + 1, storage_options)
    if found is None:   # a missing key: nothing there, or a prefix ("directory")
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise _not_a_file(uri, "not a file or object")
    size, body = found
    with contextlib.closing(body):
        limit = _too_large(uri, size, max_bytes)
        if limit:
            raise limit   # before its body is read: closing drops the connection
        data = body.read()
    if len(data) > max_bytes:   # the object may have grown since its size was read
        raise _too_large(uri, len(data), max_bytes)  # type: ignore[misc]  # over: never None
    return data


def _read_object(fs: pafs.FileSystem, path: str, uri: str, max_bytes: int) -> bytes | None:
    try:
        stream = fs.open_input_file(path)   # a HEAD: the object's size, or that it is none
    except OSError:   # missing, a prefix, or unreadable: one more request says which
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            return None
        if kind != pafs.FileType.File:      # a prefix ("directory")
            raise _not_a_file(uri, "not a file or object") from None
        raise
    with stream:
        limit = _too_large(uri, stream.size(), max_bytes)
        if limit:
            raise limit
        return _read_at_most(stream, uri, max_bytes)


def _read_at_most(stream: pa.NativeFile, uri: str, max_bytes: int) -> bytes:
    data = stream.read(max_bytes + 1)      # the file may have grown since its size was read
    if len(data) > max_bytes:
        raise _too_large(uri, len(data), max_bytes)  # type: ignore[misc]  # over: never None
    return data


def _not_a_file(uri: str, what: str) -> InputError:
    return InputError("not_a_file", what, source=uri, hint="point the manifest at image files")


def _too_large(uri: str, size: int | None, max_bytes: int) -> InputError | None:
    if size is None or size <= max_bytes:
        return None
    return InputError("too_large", f"{size / 2**20:.1f} MiB is over the {max_bytes / 2**20:.0f} "
                      f"MiB limit per file", source=uri,
                      hint="raise max_bytes (and max_pixels) if such files are expected, or "
                           "tile the image before ingest")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding pixels; None if unreadable."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
