"""Per-replica Parquet buffer for the online endpoint: one row per answered request, few files.

Each Serve replica owns one :class:`PredictionSink`.  ``add`` only appends to a list under a lock,
so it is safe to call from the replica's event loop.  A daemon thread writes the buffer as one
Parquet file per date partition when it holds ``flush_rows`` rows or when its oldest row is
``flush_interval_s`` old, whichever comes first::

    <out_uri>/date=YYYY-MM-DD/serve-<replica>-<seq>-<random>.parquet

``close`` (called from the replica's graceful-shutdown hook) stops the thread and writes whatever
is left, so every row added before ``close`` is on storage afterwards.  A failed write keeps its
rows in the buffer for the next attempt; only ``close`` gives up, after ``close_retries`` tries.
Rows follow :data:`pipelines.records.PREDICTION_SCHEMA` and are written through
:func:`pipelines.storage.write_table`.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import pyarrow as pa

from pipelines.records import PREDICTION_SCHEMA
from pipelines.storage import StorageOptions, join_uri, write_table

logger = logging.getLogger(__name__)

Row = dict[str, Any]


class PredictionSink:
    """Buffer prediction rows in memory and flush them to Parquet by count or by age."""

    def __init__(self, out_uri: str, *, flush_rows: int = 256, flush_interval_s: float = 30.0,
                 writer_id: str = "", storage_options: StorageOptions | None = None,
                 close_retries: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        if flush_rows < 1 or flush_interval_s <= 0:
            raise ValueError(f"PredictionSink: expected flush_rows >= 1 and flush_interval_s > 0, "
                             f"got {flush_rows} and {flush_interval_s}")
        self.out_uri = out_uri
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.writer_id = writer_id or uuid.uuid4().hex[:8]
        self._storage_options = dict(storage_options or {})
        self._close_retries = close_retries
        self._clock = clock
        self._rows: list[Row] = []
        self._oldest: float | None = None      # clock() when the oldest buffered row arrived
        self._lock = threading.Lock()          # guards _rows / _oldest
        self._write_lock = threading.Lock()    # one flush at a time, files numbered in order
        self._wake = threading.Event()
        self._closed = False
        self._sequence = 0
        self.rows_written = 0
        self.files_written: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.writer_id}",
                                        daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Rows buffered and not yet on storage."""
        with self._lock:
            return len(self._rows)

    def add(self, row: Mapping[str, Any]) -> None:
        """Buffer one row (non-blocking).  Raises ``RuntimeError`` after :meth:`close`."""
        if self._closed:
            raise RuntimeError("PredictionSink.add after close(); the replica is shutting down")
        with self._lock:
            if not self._rows:
                self._oldest = self._clock()
            self._rows.append(dict(row))
            full = len(self._rows) >= self.flush_rows
        if full:
            self._wake.set()

    def flush(self) -> int:
        """Write every buffered row now (blocking); returns how many rows this call wrote.

        On a storage error the rows go back to the front of the buffer and the error propagates.
        """
        with self._write_lock:
            with self._lock:
                rows, self._rows, self._oldest = self._rows, [], None
            if not rows:
                return 0
            groups = _by_date(rows)
            try:
                for date in list(groups):
                    self._write(date, groups[date])
                    del groups[date]
            except Exception:
                with self._lock:  # keep what was not written, ahead of newer rows
                    self._rows[:0] = [row for group in groups.values() for row in group]
                    self._oldest = self._clock() if self._oldest is None else self._oldest
                raise
            return len(rows)

    def close(self) -> int:
        """Stop the flush thread and write what is left; idempotent.  Returns rows written."""
        if not self._closed:
            self._closed = True
            self._wake.set()
            self._thread.join(timeout=max(self.flush_interval_s, 5.0))
        for attempt in range(1, self._close_retries + 1):
            try:
                self.flush()
                break
            except Exception as error:  # noqa: BLE001 - any storage error: retry, then report
                logger.error("sink %s: final flush attempt %d/%d failed: %s", self.writer_id,
                             attempt, self._close_retries, error)
                time.sleep(0.5 * attempt)
        lost = self.pending
        if lost:
            logger.error("sink %s: %d rows could not be written to %s", self.writer_id, lost,
                         self.out_uri)
        return self.rows_written

    # ------------------------------------------------------------------------------ internals
    def _due(self) -> bool:
        with self._lock:
            if not self._rows:
                return False
            age = self._clock() - (self._oldest or self._clock())
            return len(self._rows) >= self.flush_rows or age >= self.flush_interval_s

    def _run(self) -> None:
        # Wake on a full buffer (add sets _wake) or a few times per interval to check the age.
        tick = max(min(self.flush_interval_s / 4.0, 1.0), 0.01)
        while not self._closed:
            self._wake.wait(tick)
            self._wake.clear()
            if self._closed or not self._due():
                continue
            try:
                self.flush()
            except Exception as error:  # noqa: BLE001 - rows stay buffered; next tick retries
                logger.warning("sink %s: flush to %s failed, will retry: %s", self.writer_id,
                               self.out_uri, error)

    def _write(self, date: str, rows: list[Row]) -> None:
        self._sequence += 1
        name = f"serve-{self.writer_id}-{self._sequence:06d}-{uuid.uuid4().hex[:8]}.parquet"
        uri = join_uri(self.out_uri, f"date={date}", name)
        table = pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
        write_table(table, uri, self._storage_options or None)
        self.rows_written += len(rows)
        self.files_written.append(uri)


def _by_date(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows grouped by the UTC date of ``created_at`` (now when missing), in arrival order."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        created = row.get("created_at") or datetime.now(timezone.utc)
        groups[created.astimezone(timezone.utc).strftime("%Y-%m-%d")].append(row)
    return dict(groups)
