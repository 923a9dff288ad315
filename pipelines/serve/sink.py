"""The endpoint's durable log: a write-ahead log per replica on local disk, shipped as Parquet.

Every answered request's row takes this path::

    submit(row) --group commit--> <wal_dir>/<writer>-<token>-<seq>.wal (write + fsync) --> 200
    flush thread: seal the segment
        --> <out_uri>/date=YYYY-MM-DD/serve-<writer>-<token>-<seq>.parquet
        --> delete the segment (only once that file is committed)

(``<writer>`` is the replica id, ``<token>`` random per sink, ``<seq>`` counts its segments.)
The segment files, their format, locking and torn-record handling are in
:mod:`pipelines.serve.wal`.

**Guarantee**: every request answered 200 is in the Parquet log at least once: its row was
fsynced before the answer, and a segment is deleted only after its Parquet file is on storage.
:func:`read_serve_log` reads the log exactly once (one row per ``request_id``).

- *Segments*: a segment becomes one Parquet file per date named after the segment, so writing it
  again (a retry, or a replay after a crash) overwrites the same objects with the same rows: a
  retry never duplicates rows, even after a write that failed midway.
- *Recovery*: at start and every few seconds, a sink adopts the segments of dead replicas in its
  directory (:func:`~pipelines.serve.wal.adopt_orphans`) and ships them like its own.  The
  directory is keyed by ``out_uri``, so rows go back to their own log.
- *Bounds*: while the unflushed backlog holds ``max_buffer_rows`` rows or ``max_buffer_bytes``
  bytes, or its oldest row is ``max_unflushed_age_s`` old, :meth:`PredictionSink.submit` raises
  :class:`SinkUnavailable` (the endpoint answers 503 with ``Retry-After``) and
  :meth:`PredictionSink.health` reports the problem once storage is failing.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.predictions import scan, serve_file, write_table
from pipelines.serve.wal import (WalSegment, adopt_orphans, default_wal_dir, encode_row,
                                 read_segment, wal_directory)
from pipelines.storage import StorageOptions

logger = logging.getLogger(__name__)

Row = dict[str, Any]

_ORPHAN_SCAN_S = 5.0                # how often a running sink looks for dead replicas' segments
_MAX_BACKOFF_S = 5.0                # longest wait between flush retries while storage fails


class SinkUnavailable(RuntimeError):
    """The log cannot take a row now; the request must not be answered 200."""

    def __init__(self, reason: str, detail: str, retry_after_s: float) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.retry_after_s = reason, detail, retry_after_s


# ----------------------------------------------------------------------------------- the sink
class PredictionSink:
    """Log rows durably (WAL, fsync before returning), ship them as Parquet by count or age."""

    def __init__(self, out_uri: str, *, flush_rows: int = 256, flush_interval_s: float = 30.0,
                 writer_id: str = "", storage_options: StorageOptions | None = None,
                 close_retries: int = 3, wal_dir: str | None = None,
                 max_buffer_rows: int = 10_000, max_buffer_bytes: int = 256 * 2**20,
                 max_unflushed_age_s: float = 300.0) -> None:
        if flush_rows < 1 or flush_interval_s <= 0:
            raise ValueError(f"PredictionSink: expected flush_rows >= 1 and flush_interval_s > 0, "
                             f"got {flush_rows} and {flush_interval_s}")
        if max_buffer_rows < 1 or max_buffer_bytes < 1 or max_unflushed_age_s <= 0:
            raise ValueError(f"PredictionSink: expected positive bounds, got max_buffer_rows="
                             f"{max_buffer_rows}, max_buffer_bytes={max_buffer_bytes}, "
                             f"max_unflushed_age_s={max_unflushed_age_s}")
        self.out_uri = out_uri
        self.flush_rows, self.flush_interval_s = flush_rows, flush_interval_s
        self.max_buffer_rows, self.max_buffer_bytes = max_buffer_rows, max_buffer_bytes
        self.max_unflushed_age_s = max_unflushed_age_s
        self.writer_id = writer_id or uuid.uuid4().hex[:8]
        # Segment and file names carry this sink's own token too: a writer id used again (a
        # restarted process) must never overwrite the files of its earlier life.
        self._prefix = f"{self.writer_id}-{uuid.uuid4().hex[:8]}"
        self.wal_dir = wal_directory(wal_dir or default_wal_dir(), out_uri)
        os.makedirs(self.wal_dir, exist_ok=True)
        self._storage_options = dict(storage_options or {})
        self._close_retries = close_retries
        self._lock = threading.Lock()          # queue, open/sealed segments, error state
        self._queued = threading.Condition(self._lock)
        self._wal_lock = threading.Lock()      # file appends and sealing: never interleaved
        self._write_lock = threading.Lock()    # one flush at a time
        self._queue: list[tuple[bytes, Future]] = []
        self._open: WalSegment | None = None
        self._sealed: list[WalSegment] = adopt_orphans(self.wal_dir, out_uri)
        self._sequence = 0
        self._failures = 0                     # consecutive failed flushes
        self._next_attempt = 0.0               # time.time() before which the thread does not retry
        self._last_error: str | None = None    # storage
        self._wal_error: str | None = None     # local disk
        self._last_scan = time.time()
        self._closed = False
        self._wake = threading.Event()
        self.rows_written = 0
        self.files_written: list[str] = []
        self.commits = 0                       # group commits (one write + fsync each)
        if self._sealed:
            logger.warning("sink %s: adopted %d WAL segment(s), %d rows, of dead replicas in %s",
                           self.writer_id, len(self._sealed),
                           sum(s.rows for s in self._sealed), self.wal_dir)
        self._committer = threading.Thread(target=self._commit_loop, daemon=True,
                                           name=f"wal-{self.writer_id}")
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.writer_id}",
                                        daemon=True)
        self._committer.start()
        self._thread.start()

    # ------------------------------------------------------------------------- taking rows
    def submit(self, row: Mapping[str, Any]) -> Future:
        """Queue ``row`` for the next group commit; the future resolves once it is fsynced.

        Raises :class:`SinkUnavailable` while the backlog is over a bound, ``ValueError`` (or
        ``pyarrow.ArrowInvalid``) when the row does not fit :data:`pipelines.records.PREDICTION_SCHEMA`.
        """
        record = encode_row(row)
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("PredictionSink.add after close(); the replica is shutting down")
            refusal = self._refusal_locked()
            if refusal is not None:
                raise refusal
            self._queue.append((record, future))
            self._queued.notify()
        return future

    def add(self, row: Mapping[str, Any]) -> None:
        """Log one row; returns once it is fsynced in the WAL (see :meth:`submit`)."""
        self.submit(row).result()

    async def add_async(self, row: Mapping[str, Any]) -> None:
        """:meth:`add` for the event loop: the fsync runs in the commit thread."""
        await asyncio.wrap_future(self.submit(row))

    # ------------------------------------------------------------------------------- state
    @property
    def pending(self) -> int:
        """Rows logged and not yet on storage (this replica's and adopted ones)."""
        with self._lock:
            return sum(s.rows for s in self._segments_locked())

    def refusal(self) -> SinkUnavailable | None:
        """Why a row would be refused now (None: it would be taken)."""
        with self._lock:
            return self._refusal_locked()

    def health(self) -> str | None:
        """A problem worth restarting for: refusing rows while storage fails, or a failing disk."""
        with self._lock:
            if self._wal_error is not None:
                return f"write-ahead log in {self.wal_dir} fails: {self._wal_error}"
            refusal = self._refusal_locked()
            if refusal is not None and self._last_error is not None:
                return f"{refusal.detail}; last storage error: {self._last_error}"
            return None

    def stats(self) -> dict[str, Any]:
        """Backlog figures for ``/healthz``."""
        with self._lock:
            segments = self._segments_locked()
            oldest = min((s.oldest for s in segments if s.oldest is not None), default=None)
            return {"pending_rows": sum(s.rows for s in segments),
                    "pending_bytes": sum(s.size for s in segments if s.rows),
                    "oldest_pending_s": None if oldest is None else
                    round(max(0.0, time.time() - oldest), 3),
                    "storage_error": self._last_error}

    # ------------------------------------------------------------------------------ flushing
    def flush(self, *, seal: bool = True) -> int:
        """Seal the open segment (unless ``seal`` is false) and ship every sealed one now
        (blocking); returns rows shipped.

        Segments are shipped oldest first; the first storage error stops the flush, keeps that
        segment and the later ones for the next attempt, and propagates.
        """
        with self._write_lock:
            if seal:
                self._seal()
            shipped = 0
            while True:
                with self._lock:
                    if not self._sealed:
                        break
                    segment = self._sealed[0]
                try:
                    shipped += self._ship(segment)
                except Exception as error:
                    with self._lock:
                        self._failures += 1
                        self._last_error = f"{type(error).__name__}: {error}"
                        self._next_attempt = time.time() + min(
                            _MAX_BACKOFF_S, 0.25 * 2 ** self._failures)
                    raise
                with self._lock:
                    self._sealed.pop(0)
                    self._failures, self._last_error, self._next_attempt = 0, None, 0.0
                segment.delete()
            return shipped

    def close(self) -> int:
        """Stop taking rows, ship what is left; idempotent.  Returns rows written.

        Rows that still cannot be shipped after ``close_retries`` tries stay in the WAL, unlocked,
        for the next replica on this node to adopt: nothing answered is dropped.
        """
        with self._lock:
            first = not self._closed
            self._closed = True
            self._queued.notify_all()
        if first:
            self._wake.set()
            self._committer.join()
            self._thread.join(timeout=max(self.flush_interval_s, 5.0))
        for attempt in range(1, self._close_retries + 1):
            try:
                self.flush()
                break
            except Exception as error:  # noqa: BLE001 - any storage error: retry, then report
                logger.error("sink %s: final flush attempt %d/%d failed: %s", self.writer_id,
                             attempt, self._close_retries, error)
                if attempt < self._close_retries:
                    time.sleep(0.5 * attempt)
        with self._lock:
            left = self._segments_locked()
            self._sealed, self._open = [], None
        for segment in left:
            segment.release()
        if any(s.rows for s in left):
            logger.error("sink %s: %d rows could not be written to %s; they stay in the WAL "
                         "%s for the next replica on this node", self.writer_id,
                         sum(s.rows for s in left), self.out_uri, self.wal_dir)
        with contextlib.suppress(OSError):  # only when empty: another replica may use it
            os.rmdir(self.wal_dir)
        return self.rows_written

    # ------------------------------------------------------------------------------ internals
    def _segments_locked(self) -> list[WalSegment]:
        return self._sealed + ([self._open] if self._open is not None else [])

    def _refusal_locked(self) -> SinkUnavailable | None:
        segments = self._segments_locked()
        rows = sum(s.rows for s in segments)
        size = sum(s.size for s in segments if s.rows)
        oldest = min((s.oldest for s in segments if s.oldest is not None), default=None)
        age = 0.0 if oldest is None else time.time() - oldest
        if rows >= self.max_buffer_rows:
            why = f"{rows} rows wait for storage (max_buffer_rows={self.max_buffer_rows})"
        elif size >= self.max_buffer_bytes:
            why = f"{size} bytes wait for storage (max_buffer_bytes={self.max_buffer_bytes})"
        elif age >= self.max_unflushed_age_s:
            why = (f"the oldest unwritten row is {age:.0f}s old "
                   f"(max_unflushed_age_s={self.max_unflushed_age_s:g})")
        else:
            return None
        retry = max(1, math.ceil(self._next_attempt - time.time()))
        return SinkUnavailable("log_backlog_full", f"the prediction log is behind: {why}",
                               retry_after_s=retry)

    def _commit_loop(self) -> None:
        """Group commit: every row queued while the previous fsync ran shares the next one."""
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._queued.wait()
                if not self._queue:
                    return
                group, self._queue = self._queue, []
            self._commit(group)

    def _commit(self, group: list[tuple[bytes, Future]]) -> None:
        records = [record for record, _ in group]
        try:
            with self._wal_lock:
                if self._open is None or self._open.broken:
                    self._sequence += 1
                    segment = WalSegment.create(self.wal_dir, self._prefix, self._sequence,
                                                self.out_uri)
                    with self._lock:
                        self._open = segment
                self._open.append(records)
                due = self._open.rows >= self.flush_rows
        except OSError as error:
            with self._lock:
                self._wal_error = f"{type(error).__name__}: {error}"
            refused = SinkUnavailable("log_write_failed", f"the prediction log could not be "
                                      f"written to local disk: {error}", retry_after_s=1)
            for _, future in group:
                future.set_exception(refused)
            self._wake.set()  # seal the broken segment so that its rows get shipped
            return
        with self._lock:
            self._wal_error = None
            self.commits += 1
        for _, future in group:
            future.set_result(None)
        if due:
            self._wake.set()

    def _seal(self) -> None:
        """Close the open segment for appends; the next row opens a new one."""
        with self._wal_lock, self._lock:
            if self._open is not None and (self._open.rows or self._open.broken):
                if self._open.rows:
                    self._sealed.append(self._open)
                else:
                    self._open.delete()
                self._open = None

    def _open_due(self) -> bool:
        """The open segment is full, old enough, or broken: time to seal it."""
        with self._lock:
            segment = self._open
            if segment is None or not segment.rows:
                return segment is not None and segment.broken
            age = time.time() - (segment.oldest or time.time())
            return segment.broken or segment.rows >= self.flush_rows or age >= self.flush_interval_s

    def _run(self) -> None:
        # Wake on a full segment (the committer sets _wake) or a few times per interval.
        tick = max(min(self.flush_interval_s / 4.0, 1.0), 0.01)
        while not self._closed:
            self._wake.wait(tick)
            self._wake.clear()
            if self._closed:
                break
            self._scan_orphans()
            with self._lock:
                waiting = bool(self._sealed) and time.time() >= self._next_attempt
            seal = self._open_due()  # a retry alone does not cut the open segment short
            if not (waiting or seal):
                continue
            try:
                self.flush(seal=seal)
            except Exception as error:  # noqa: BLE001 - rows stay in the WAL; retried with backoff
                logger.warning("sink %s: flush to %s failed, will retry: %s", self.writer_id,
                               self.out_uri, error)

    def _scan_orphans(self) -> None:
        """Adopt segments released since the last scan (e.g. by a replica that just died)."""
        if time.time() - self._last_scan < _ORPHAN_SCAN_S:
            return
        self._last_scan = time.time()
        with self._lock:
            own = {s.path for s in self._segments_locked()}
        try:
            found = adopt_orphans(self.wal_dir, self.out_uri, own)
        except (OSError, ValueError) as error:
            logger.warning("sink %s: scanning %s for orphaned segments failed: %s",
                           self.writer_id, self.wal_dir, error)
            return
        if found:
            logger.warning("sink %s: adopted %d WAL segment(s) of dead replicas, %d rows",
                           self.writer_id, len(found), sum(s.rows for s in found))
            with self._lock:
                self._sealed[:0] = found
            self._wake.set()

    def _ship(self, segment: WalSegment) -> int:
        """Write one segment as one Parquet file per date; the names depend on the segment only,
        so shipping it again overwrites the same objects with the same rows."""
        _, table = read_segment(segment.path)
        if not table.num_rows:
            return 0
        fallback = time.strftime("%Y-%m-%d", time.gmtime(segment.oldest))  # no created_at
        dates = pc.fill_null(pc.strftime(table.column("created_at"), format="%Y-%m-%d"), fallback)
        for date in sorted(set(dates.to_pylist())):
            uri = serve_file(segment.out_uri, date, segment.writer_id, segment.seq)
            write_table(table.filter(pc.equal(dates, date)), uri, self._storage_options or None)
            if uri not in self.files_written:
                self.files_written.append(uri)
        self.rows_written += table.num_rows
        return table.num_rows


# ---------------------------------------------------------------------------------- reading
def read_serve_log(out_uri: str, storage_options: StorageOptions | None = None) -> pa.Table:
    """Every row of the endpoint's log under ``out_uri``, one per ``request_id``
    (:func:`pipelines.predictions.scan`).

    The log is written at least once (a segment replayed after a crash, or a client retrying
    with the same ``X-Request-Id``, can log a request twice); the first row of each request id
    is kept, in file order, and every row without one.  Empty when nothing was logged yet.
    """
    return scan(out_uri, storage_options=storage_options)
