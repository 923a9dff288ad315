"""How each file of a batch output is committed exactly once.

The layout (names, compression, readers) is :mod:`pipelines.predictions`'; this module adds what
a ``rayseg predict`` run needs on top of it::

    <out>/part-<key>.parquet              predictions (records.PREDICTION_SCHEMA)
    <out>/_quarantine/part-<key>.parquet  unreadable inputs (records.QUARANTINE_SCHEMA)
    <out>/_model.json                     which model wrote them (checked on every rerun)
    <out>/_SUCCESS                        summary of the last run that finished
    <out>/_LEASE                          the run writing here now (one writer per output)

The commit unit is one Parquet file.  Each file appears atomically (:func:`storage.write_bytes`:
a hidden sibling, then a rename or a server-side copy; an upload that fails midway never
publishes a partial file), so every id found in a file under ``<out>`` is done.  A rerun skips those ids (:func:`done_ids`) and processes the rest,
hence no duplicates and no gaps however the previous run died.  ``<key>`` is a hash of the sorted
ids in the file, so when Ray retries a write task on the same rows it overwrites the same file
instead of adding a second copy.  ``_``- and ``.``-prefixed entries are skipped by Arrow readers,
so ``pyarrow.dataset(<out>)`` sees predictions only.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import threading
import uuid
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from pipelines.predictions import (
    MODEL_FILE,
    SUCCESS_FILE,
    batch_file,
    prediction_files,
    quarantine_dir,
    read_quarantine,
    scan,
    write_table,
)
from pipelines.records import PREDICTION_SCHEMA, QUARANTINE_SCHEMA, RESULT_SCHEMA
from pipelines.storage import create_exclusive, delete, join_uri, read_bytes, write_bytes


def done_ids(out: str) -> pa.Array:
    """Every id already committed under ``out`` (predictions and quarantine), as a string array."""
    chunks = [chunk for column in (scan(out, ["id"], dedupe=False)["id"],
                                   read_quarantine(out)["id"]) for chunk in column.chunks]
    return pa.chunked_array(chunks, pa.string()).combine_chunks()


def done_sources(out: str, *, digests: bool = False) -> pa.Table:
    """Every id committed under ``out`` with the source URI it came from (``id``,
    ``source_uri``) and, with ``digests``, the SHA-256 of its bytes (``source_sha256``, null for
    a quarantined id).

    One Arrow table, read column by column: a few dozen bytes of the driver's memory per done
    id (``rayseg bench scale_rows`` reports it), where a dict of Python strings took a few
    hundred; the 64-character digests are read only when a run verifies them.
    """
    columns = ["id", "source_uri", *(["source_sha256"] if digests else [])]
    schema = pa.schema([(name, pa.string()) for name in columns])
    predicted = scan(out, columns, dedupe=False).select(columns).cast(schema)
    bad = read_quarantine(out)
    quarantined = pa.table({"id": bad["id"], "source_uri": bad["image_uri"],
                            **({"source_sha256": pa.nulls(bad.num_rows, pa.string())}
                               if digests else {})}).cast(schema)
    return pa.concat_tables([predicted, quarantined])


def claim_output(out: str, model: dict[str, Any]) -> None:
    """Record ``model`` in ``out/_model.json``, or check that the existing record matches.

    Mixing two models (by the SHA-256 of their weights, not their names) or TTA settings in one
    output would make the rows incomparable, so a mismatch is an error rather than a silent
    append.
    """
    uri = join_uri(out, MODEL_FILE)
    try:
        existing = json.loads(read_bytes(uri))
    except FileNotFoundError:
        write_bytes(uri, (json.dumps(model, indent=2, sort_keys=True) + "\n").encode())
        return
    # the weights' hash is the model's identity: a retrain under the same name and version is
    # another model; records from before 0.2 have no hash and compare by name and version
    identity = ("weights_sha256",) if existing.get("weights_sha256") else ("name", "version")
    keys = (*identity, "tta", "confidence_maps",
            # settings that change the rows; records from before they existed do not hold them
            *(k for k in ("postprocess", "instances", "temperature") if k in existing))
    changed = {k: (existing.get(k), model.get(k)) for k in keys if existing.get(k) != model.get(k)}
    if changed:
        raise ValueError(f"{out} already holds predictions from a different setup "
                         f"(existing vs requested: {changed}); write to a fresh --out, or delete "
                         f"{out} to start over")


LEASE_FILE = "_LEASE"
LEASE_TTL_S = 120.0   # a lease not renewed for this long belongs to a run that died


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease."""


@contextlib.contextmanager
def lease(out: str, *, ttl_s: float = LEASE_TTL_S,
          storage_options: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Hold ``out``'s lease for the duration: one writer per output.

    The lease is ``<out>/_LEASE``, created with an exclusive create (a conditional PUT on S3), so
    of two runs started together exactly one gets it; the other is refused with a message naming
    the holder.  The holder renews it every ``ttl_s / 4`` seconds; a lease that was not renewed
    for ``ttl_s`` (its run died), or whose process is gone from this host, is stale and taken over.
    """
    uri = join_uri(out, LEASE_FILE)
    me = {"run": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
          "started_at": _now(), "ttl_s": ttl_s}
    for attempt in range(3):
        if create_exclusive(uri, _lease_bytes(me), storage_options):
            break
        holder = _read_lease(uri, storage_options)
        if holder is not None and not _stale(holder):
            raise LeaseHeld(
                f"{out} is being written by another run ({holder.get('host')} pid "
                f"{holder.get('pid')}, run {holder.get('run')}, since {holder.get('started_at')}, "
                f"renewed {holder.get('renewed_at', holder.get('started_at'))}); wait for it to "
                f"finish, write to another --out, or if that run is gone delete {uri} (a lease "
                f"not renewed for {holder.get('ttl_s', ttl_s):g} s expires by itself)")
        delete(uri, storage_options)   # stale, or vanished between the two calls: try again
    else:
        raise LeaseHeld(f"{out}: could not take the lease {uri} after 3 tries; another run keeps "
                        f"taking it")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 4):
            with contextlib.suppress(Exception):   # a missed renewal is retried next round
                write_bytes(uri, _lease_bytes({**me, "renewed_at": _now()}), storage_options)

    keeper = threading.Thread(target=renew, name="rayseg-lease", daemon=True)
    keeper.start()
    try:
        yield me
    finally:
        stop.set()
        keeper.join()
        if (_read_lease(uri, storage_options) or {}).get("run") == me["run"]:
            delete(uri, storage_options)


def _lease_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


def _read_lease(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    try:
        return json.loads(read_bytes(uri, storage_options))
    except (FileNotFoundError, ValueError):
        return None


def _stale(holder: dict[str, Any]) -> bool:
    """Not renewed within its TTL, or its process is gone from this very host."""
    renewed = dt.datetime.fromisoformat(holder.get("renewed_at") or holder["started_at"])
    age = (dt.datetime.now(dt.timezone.utc) - renewed).total_seconds()
    if age > float(holder.get("ttl_s", LEASE_TTL_S)):
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def read_model_record(out: str) -> dict[str, Any]:
    """The ``_model.json`` written by :func:`claim_output` (name, version, mask_spec, ...)."""
    return json.loads(read_bytes(join_uri(out, MODEL_FILE)))


def write_success(out: str, summary: dict[str, Any]) -> None:
    """Write the run summary to ``out/_SUCCESS``."""
    write_bytes(join_uri(out, SUCCESS_FILE), (json.dumps(summary, indent=2) + "\n").encode())


class CommitSink(Datasink):
    """Ray Data sink: commits its rows as files of about ``rows_per_file`` rows each.

    Ray Data hands each write task at least ``rows_per_file`` rows (``min_rows_per_write``),
    usually a few more: the task cuts them into ``round(rows / rows_per_file)`` (at least one)
    chunks of equal size, so 10,015 rows for 10,000 per file make one file, not one of 10,000
    and one of 15, and no file is more than 1.5x ``rows_per_file``.  Each chunk becomes one
    prediction file and (if it has bad inputs) one quarantine file.

    ``fail_after_files`` is the tests' fault (:mod:`pipelines.faults`): once that many
    prediction files are committed, the next write task raises, as if the job had died midway.
    """

    def __init__(self, out: str, *, rows_per_file: int, fail_after_files: int | None = None,
                 storage_options: dict[str, Any] | None = None):
        self.out = out
        self.rows_per_file = rows_per_file
        self.fail_after_files = fail_after_files
        # Resolved on the driver and shipped: workers may lack the driver's S3 variables.
        self.storage_options = storage_options
        self.written: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        result = {"rows": 0, "quarantined": 0, "files": 0}
        if not tables:
            return result
        table = pa.concat_tables(tables).cast(RESULT_SCHEMA)
        # Same input -> same chunks -> same file names, so a retried task overwrites its files.
        chunks = max(1, round(table.num_rows / self.rows_per_file))
        bounds = [table.num_rows * i // chunks for i in range(chunks + 1)]
        for start, stop in zip(bounds, bounds[1:]):
            self._maybe_fail()
            for key, value in self._commit(table.slice(start, stop - start)).items():
                result[key] += value
        return result

    def _commit(self, table: pa.Table) -> dict[str, int]:
        """Commit one chunk: its quarantine rows, then its predictions, one file each."""
        ids = table.column("id").to_pylist()
        bad = pc.is_valid(table.column("reason"))
        quarantined = table.filter(bad).select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
        predicted = table.filter(pc.invert(bad)).select(PREDICTION_SCHEMA.names).cast(
            PREDICTION_SCHEMA)
        files = 0
        for part, directory in ((quarantined, quarantine_dir(self.out)), (predicted, self.out)):
            if part.num_rows:
                write_table(part, batch_file(directory, ids), self.storage_options)
                files += 1
        return {"rows": predicted.num_rows, "quarantined": quarantined.num_rows, "files": files}

    def _maybe_fail(self) -> None:
        if self.fail_after_files is not None and \
                len(prediction_files(self.out, self.storage_options)) >= self.fail_after_files:
            raise RuntimeError(f"injected failure: {self.fail_after_files} files already committed")

    def on_write_complete(self, write_result: Any) -> None:
        # Runs on the driver, on this very object: keep the per-task results for the summary.
        self.written = [r for r in write_result.write_returns if r]
