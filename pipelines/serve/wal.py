"""The endpoint's write-ahead log: segment files on local disk, their format and their locks.

Each replica's :class:`~pipelines.serve.sink.PredictionSink` appends rows to segment files
``<wal_dir>/<writer>-<token>-<seq>.wal`` in :func:`wal_directory` (keyed by ``out_uri``, so rows
go back to their own log).  A segment is created as ``.wal.new`` and renamed once its header is
synced, so a half-made file never looks like a segment.

- *Locking*: each file is held under an exclusive ``fcntl.flock`` while its replica lives.
  :func:`adopt_orphans` locks the segments whose lock it can take (their replica died: SIGKILL,
  OOM kill, or a final flush that failed) and removes stale ``.wal.new`` files.

Segment file format: ``RSWAL01\\n``, then records ``<u32 length><u32 crc32><payload>``: a JSON
header (writer, seq, out_uri, created), the Arrow IPC schema, then one Arrow IPC record batch per
row.  A torn last record (the process died mid-write, before its fsync and so before its answer)
fails its length or CRC check and is ignored with everything after it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping

import pyarrow as pa

from pipelines.records import PREDICTION_SCHEMA

logger = logging.getLogger(__name__)

WAL_ROOT = "rayseg-serve-wal"
_MAGIC = b"RSWAL01\n"
_RECORD = struct.Struct("<II")      # payload length, crc32 of the payload
_SUFFIX = ".wal"
_NEW = ".wal.new"                   # a segment being created (renamed once its header is synced)
_STALE_NEW_S = 60.0                 # a .wal.new this old belongs to a creator that died


def default_wal_dir(app_name: str = "default") -> str:
    """``<system temp dir>/rayseg-serve-wal/<app_name>``: the per-node default WAL root."""
    return os.path.join(tempfile.gettempdir(), WAL_ROOT, app_name)


def wal_directory(wal_root: str, out_uri: str) -> str:
    """The directory of the segments that belong to ``out_uri`` under ``wal_root``."""
    return os.path.join(wal_root, hashlib.sha256(out_uri.encode()).hexdigest()[:16])


# ------------------------------------------------------------------------------ segment files
def encode_row(row: Mapping[str, Any]) -> bytes:
    """One WAL record holding ``row`` as a one-row :data:`PREDICTION_SCHEMA` record batch."""
    batch = pa.RecordBatch.from_pylist([dict(row)], schema=PREDICTION_SCHEMA)
    return _record(batch.serialize().to_pybytes())


def read_segment(path: str | os.PathLike) -> tuple[dict[str, Any] | None, pa.Table]:
    """``(header, rows)`` of one segment file; a torn tail is dropped, a torn header gives
    ``(None, empty table)`` (rows are only written after the header is synced)."""
    data = Path(path).read_bytes()
    if not data.startswith(_MAGIC):
        raise ValueError(f"{path}: not a rayseg WAL segment (no {_MAGIC!r} header)")
    payloads = list(_records(data, len(_MAGIC)))
    if len(payloads) < 2:
        return None, PREDICTION_SCHEMA.empty_table()
    header = json.loads(payloads[0])
    schema = pa.ipc.read_schema(pa.py_buffer(payloads[1]))
    batches = [pa.ipc.read_record_batch(pa.py_buffer(p), schema) for p in payloads[2:]]
    return header, _conform(pa.Table.from_batches(batches, schema=schema))


class WalSegment:
    """One segment file, open and exclusively ``flock``-ed by this process."""

    def __init__(self, path: str, fd: int, writer_id: str, seq: int, out_uri: str, *,
                 rows: int = 0, size: int = 0, oldest: float | None = None) -> None:
        self.path, self.fd, self.out_uri = path, fd, out_uri
        self.writer_id, self.seq = writer_id, seq          # writer id + the sink's token
        self.rows, self.size, self.oldest = rows, size, oldest   # oldest: wall clock, first row
        self.broken = False                                       # an append failed: seal it

    @classmethod
    def create(cls, directory: str, writer_id: str, seq: int, out_uri: str) -> "WalSegment":
        """A new, locked, synced segment holding only its header."""
        path = os.path.join(directory, f"{writer_id}-{seq:06d}{_SUFFIX}")
        temp = path[: -len(_SUFFIX)] + _NEW  # never looks like a segment until complete
        os.makedirs(directory, exist_ok=True)  # a closing sink may have removed it when empty
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            header = {"writer": writer_id, "seq": seq, "out_uri": out_uri, "created": time.time()}
            head = (_MAGIC + _record(json.dumps(header).encode())
                    + _record(PREDICTION_SCHEMA.serialize().to_pybytes()))
            _pwrite_all(fd, head, 0)
            os.fsync(fd)
            os.rename(temp, path)
            _fsync_dir(directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return cls(path, fd, writer_id, seq, out_uri, size=len(head))

    @classmethod
    def adopt(cls, path: str, out_uri: str) -> "WalSegment | None":
        """Lock a dead replica's segment of ``out_uri``; None when it is live or gone."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:  # shipped and unlinked meanwhile
                raise FileNotFoundError(path)
            header, table = read_segment(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        except ValueError as error:  # not a segment, or a corrupt one: keep it for a human
            logger.error("WAL: %s cannot be read, left alone: %s", path, error)
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if header is not None and header.get("out_uri") != out_uri:
            logger.warning("WAL segment %s belongs to %s, not %s; left alone", path,
                           header.get("out_uri"), out_uri)
            os.close(fd)
            return None
        created = [c.timestamp() for c in table.column("created_at").to_pylist() if c]
        oldest = min(created) if created else (header or {}).get("created", time.time())
        name = os.path.basename(path)[: -len(_SUFFIX)]
        writer_id, _, seq = name.rpartition("-")
        return cls(path, fd, (header or {}).get("writer", writer_id), int(seq), out_uri,
                   rows=table.num_rows, size=os.fstat(fd).st_size, oldest=oldest)

    def append(self, records: list[bytes]) -> None:
        """Write ``records`` after the last good one and fsync; on error, cut them off again."""
        data = b"".join(records)
        try:
            _pwrite_all(self.fd, data, self.size)
            os.fsync(self.fd)
        except OSError:
            self.broken = True
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise
        self.size += len(data)
        self.rows += len(records)
        if self.oldest is None:
            self.oldest = time.time()

    def delete(self) -> None:
        """Remove the file (its rows are on storage), then release the lock."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.release()

    def release(self) -> None:
        """Close the file and drop the lock: a later sink may adopt the segment."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def adopt_orphans(directory: str, out_uri: str, own: Collection[str] = ()) -> list[WalSegment]:
    """Lock and return, oldest first, every segment in ``directory`` whose replica is dead.

    Stale ``.wal.new`` files (a creator died before renaming; they hold no rows) are removed.
    """
    if not os.path.isdir(directory):
        return []
    adopted = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(_NEW):
            _remove_stale_new(path)
        elif name.endswith(_SUFFIX) and path not in own:
            segment = WalSegment.adopt(path, out_uri)
            if segment is not None and segment.rows == 0:
                segment.delete()
            elif segment is not None:
                adopted.append(segment)
    return sorted(adopted, key=lambda s: (s.oldest or 0.0, s.path))


# --------------------------------------------------------------------------------- helpers
def _record(payload: bytes) -> bytes:
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def _records(data: bytes, offset: int) -> Iterator[bytes]:
    """Payloads of the complete, intact records from ``offset``; stops at the first torn one."""
    while offset + _RECORD.size <= len(data):
        length, crc = _RECORD.unpack_from(data, offset)
        start = offset + _RECORD.size
        payload = data[start:start + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            logger.warning("WAL: torn record at byte %d of %d dropped", offset, len(data))
            return
        yield payload
        offset = start + length
    if offset != len(data):
        logger.warning("WAL: torn record header at byte %d of %d dropped", offset, len(data))


def _conform(table: pa.Table) -> pa.Table:
    """``table`` in :data:`PREDICTION_SCHEMA` (a segment written by another version may differ)."""
    if table.schema.equals(PREDICTION_SCHEMA):
        return table
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in PREDICTION_SCHEMA]
    return pa.Table.from_arrays(columns, schema=PREDICTION_SCHEMA)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_new(path: str) -> None:
    try:
        if time.time() - os.stat(path).st_mtime < _STALE_NEW_S:
            return
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except (BlockingIOError, FileNotFoundError):
        pass
    finally:
        os.close(fd)
