"""Where batch predictions live, and how each file is committed exactly once.

Layout of an output URI ``<out>``::

    <out>/part-<key>.parquet              predictions (records.PREDICTION_SCHEMA)
    <out>/_quarantine/part-<key>.parquet  unreadable inputs (records.QUARANTINE_SCHEMA)
    <out>/_model.json                     which model wrote them (checked on every rerun)
    <out>/_SUCCESS                        summary of the last run that finished
    <out>/.tmp/                           local staging for atomic renames (never read)

The commit unit is one Parquet file.  Each file appears atomically (an S3 PUT or multipart upload
becomes visible only when complete; locally we write to ``.tmp`` and rename), so every id found in
a file under ``<out>`` is done.  A rerun skips those ids (:func:`done_ids`) and processes the rest,
hence no duplicates and no gaps however the previous run died.  ``<key>`` is a hash of the sorted
ids in the file, so when Ray retries a write task on the same rows it overwrites the same file
instead of adding a second copy.  ``_``- and ``.``-prefixed entries are skipped by Arrow readers,
so ``pyarrow.dataset(<out>)`` sees predictions only.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from pipelines.records import PREDICTION_SCHEMA, QUARANTINE_SCHEMA, RESULT_SCHEMA
from pipelines.storage import (
    filesystem_for,
    is_local,
    join_uri,
    list_uri,
    read_bytes,
    write_bytes,
)

QUARANTINE_DIR = "_quarantine"
MODEL_FILE = "_model.json"
SUCCESS_FILE = "_SUCCESS"
_STAGING_DIR = ".tmp"
_PREFIX, _SUFFIX = "part-", ".parquet"
_PNG_COLUMNS = ("mask_png", "class_mask_pngs", "confidence_png")


def prediction_files(out: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """URIs of the committed prediction files directly under ``out``."""
    return _parts(out, storage_options)


def quarantine_files(out: str) -> list[str]:
    """URIs of the committed quarantine files under ``out/_quarantine``."""
    return _parts(join_uri(out, QUARANTINE_DIR))


def done_ids(out: str) -> pa.Array:
    """Every id already committed under ``out`` (predictions and quarantine), as a string array."""
    columns = [_read(files, ["id"]).column("id")
               for files in (prediction_files(out), quarantine_files(out)) if files]
    chunks = [chunk for column in columns for chunk in column.chunks]
    return pa.chunked_array(chunks, pa.string()).combine_chunks()


def read_predictions(out: str, columns: list[str] | None = None) -> pa.Table:
    """All committed predictions under ``out`` (empty table with the schema when none)."""
    files = prediction_files(out)
    return _read(files, columns) if files else PREDICTION_SCHEMA.empty_table().select(
        columns or PREDICTION_SCHEMA.names)


def read_quarantine(out: str) -> pa.Table:
    """All committed quarantine rows under ``out``."""
    files = quarantine_files(out)
    return _read(files, None) if files else QUARANTINE_SCHEMA.empty_table()


def claim_output(out: str, model: dict[str, Any]) -> None:
    """Record ``model`` in ``out/_model.json``, or check that the existing record matches.

    Mixing two models (or TTA settings) in one output would make the rows incomparable, so a
    mismatch is an error rather than a silent append.
    """
    uri = join_uri(out, MODEL_FILE)
    try:
        existing = json.loads(read_bytes(uri))
    except FileNotFoundError:
        write_bytes(uri, (json.dumps(model, indent=2, sort_keys=True) + "\n").encode())
        return
    keys = ("name", "version", "tta", "confidence_maps")
    changed = {k: (existing.get(k), model.get(k)) for k in keys if existing.get(k) != model.get(k)}
    if changed:
        raise ValueError(f"{out} already holds predictions from a different setup "
                         f"(existing vs requested: {changed}); write to a fresh --out, or delete "
                         f"{out} to start over")


def read_model_record(out: str) -> dict[str, Any]:
    """The ``_model.json`` written by :func:`claim_output` (name, version, mask_spec, ...)."""
    return json.loads(read_bytes(join_uri(out, MODEL_FILE)))


def write_success(out: str, summary: dict[str, Any]) -> None:
    """Write the run summary to ``out/_SUCCESS``."""
    write_bytes(join_uri(out, SUCCESS_FILE), (json.dumps(summary, indent=2) + "\n").encode())


def file_key(ids: Iterable[str]) -> str:
    """Stable name for a file holding exactly ``ids`` (order does not matter)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:24]


class CommitSink(Datasink):
    """Ray Data sink: commits its rows as files of at most ``rows_per_file`` rows each.

    Each chunk becomes one prediction file and (if it has bad inputs) one quarantine file.

    ``fail_after_files`` exists for tests only: once that many prediction files are committed,
    the next write task raises, as if the job had died midway.
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
        for start in range(0, table.num_rows, self.rows_per_file):
            self._maybe_fail()
            for key, value in self._commit(table.slice(start, self.rows_per_file)).items():
                result[key] += value
        return result

    def _commit(self, table: pa.Table) -> dict[str, int]:
        """Commit one chunk: its quarantine rows, then its predictions, one file each."""
        key = file_key(table.column("id").to_pylist())
        bad = pc.is_valid(table.column("reason"))
        quarantined = table.filter(bad).select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
        predicted = table.filter(pc.invert(bad)).select(PREDICTION_SCHEMA.names).cast(
            PREDICTION_SCHEMA)
        files = 0
        for part, directory in ((quarantined, join_uri(self.out, QUARANTINE_DIR)),
                                (predicted, self.out)):
            if part.num_rows:
                commit_table(part, join_uri(directory, f"{_PREFIX}{key}{_SUFFIX}"),
                             self.storage_options)
                files += 1
        return {"rows": predicted.num_rows, "quarantined": quarantined.num_rows, "files": files}

    def _maybe_fail(self) -> None:
        if self.fail_after_files is not None and \
                len(prediction_files(self.out, self.storage_options)) >= self.fail_after_files:
            raise RuntimeError(f"injected failure: {self.fail_after_files} files already committed")

    def on_write_complete(self, write_result: Any) -> None:
        # Runs on the driver, on this very object: keep the per-task results for the summary.
        self.written = [r for r in write_result.write_returns if r]


def commit_table(table: pa.Table, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``table`` as one Parquet file that appears at ``uri`` all at once."""
    fs, path = filesystem_for(uri, storage_options)
    # PNG bytes are compressed already: zstd would only spend CPU on them.
    compression = {name: "none" if name in _PNG_COLUMNS else "zstd" for name in table.column_names}
    if not is_local(uri):  # an S3 object becomes visible only when its upload completes
        with fs.open_output_stream(path) as sink:
            pq.write_table(table, sink, compression=compression)
        return
    directory, name = path.rsplit("/", 1)
    base = directory[: -len(QUARANTINE_DIR) - 1] if directory.endswith(QUARANTINE_DIR) else directory
    staging = f"{base}/{_STAGING_DIR}/{name}.{uuid.uuid4().hex}"
    fs.create_dir(f"{base}/{_STAGING_DIR}", recursive=True)
    fs.create_dir(directory, recursive=True)
    pq.write_table(table, staging, filesystem=fs, compression=compression)
    fs.move(staging, path)  # rename(2): atomic on one local filesystem


def _parts(directory: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    return [uri for uri in list_uri(directory, recursive=False, suffixes=(_SUFFIX,),
                                    storage_options=storage_options)
            if uri.rsplit("/", 1)[-1].startswith(_PREFIX)]


def _read(files: list[str], columns: list[str] | None) -> pa.Table:
    fs, _ = filesystem_for(files[0])
    paths = [filesystem_for(uri)[1] for uri in files]
    return pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=columns)
