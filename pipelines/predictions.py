"""The predictions store: both output layouts, their file names, compression and one reader.

Two jobs write prediction rows (:data:`records.PREDICTION_SCHEMA`), each in its own layout::

    rayseg predict --out <out>                  rayseg serve (out_uri: <out>)
      <out>/part-<key>.parquet                    <out>/date=YYYY-MM-DD/serve-<writer>-<seq>.parquet
      <out>/_quarantine/part-<key>.parquet        (a refused request is answered 4xx, not logged)
      <out>/_model.json  the model (one per out)  <out>/_models/<weights_sha256>.json  (one per
                                                  model the endpoint served: it follows promotions)

- *Names* make every write idempotent: ``<key>`` hashes the sorted ids of a batch file, and a
  serve file is named after its write-ahead-log segment, so a retried write overwrites the same
  object with the same rows (:mod:`pipelines.predict.store`, :mod:`pipelines.serve.sink`).
- *Compression*: zstd, except the PNG columns, which are compressed already
  (:func:`write_table`, the one writer of both layouts).
- *Reading*: :func:`scan` reads either layout, or a folder holding both: every ``*.parquet``
  below ``uri`` whose path has no ``_``- or ``.``-prefixed part (quarantine, records and
  in-flight uploads are left out, as Arrow's own readers do), or only some of those files.  It
  filters by time and weights, and keeps one row per ``request_id`` (the serve log is written
  at least once).  :func:`model_record` is the one model whose mask spec decodes the rows.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage
from pipelines.records import PREDICTION_SCHEMA, QUARANTINE_SCHEMA

QUARANTINE_DIR = "_quarantine"
MODEL_FILE = "_model.json"          # the batch layout's one model
MODELS_DIR = "_models"              # the serve log's models, by weights
SUCCESS_FILE = "_SUCCESS"
PNG_COLUMNS = ("mask_png", "class_mask_pngs", "confidence_png")
_PART, _SERVE, _SUFFIX = "part-", "serve-", ".parquet"


# ------------------------------------------------------------------------------ file names


def batch_file(directory: str, ids: Iterable[str]) -> str:
    """The batch file holding exactly ``ids``: the same ids always get the same name."""
    return storage.join_uri(directory, f"{_PART}{file_key(ids)}{_SUFFIX}")


def serve_file(out: str, date: str, writer: str, seq: int) -> str:
    """The serve-log file of one write-ahead-log segment's rows of ``date``."""
    return storage.join_uri(out, f"date={date}", f"{_SERVE}{writer}-{seq:06d}{_SUFFIX}")


def quarantine_dir(out: str) -> str:
    return storage.join_uri(out, QUARANTINE_DIR)


def file_key(ids: Iterable[str]) -> str:
    """Stable name for a file holding exactly ``ids`` (order does not matter)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------- writing


def write_table(table: pa.Table, uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``table`` as one Parquet file that appears at ``uri`` all at once; returns ``uri``.
    PNG bytes are compressed already: zstd would only spend CPU on them."""
    compression = {name: "none" if name in PNG_COLUMNS else "zstd" for name in table.column_names}
    storage.write_bytes(uri, storage.parquet_bytes(table, compression), storage_options)
    return uri


def record_served_model(out: str, record: dict[str, Any],
                        storage_options: dict[str, Any] | None = None) -> None:
    """Note in the serve log which model (by weights) wrote rows there, with its mask spec, so
    the log can be scored and monitored later.  Idempotent: the same model, the same file."""
    uri = storage.join_uri(out, MODELS_DIR, f"{record['weights_sha256']}.json")
    storage.write_bytes(uri, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(),
                        storage_options)


# --------------------------------------------------------------------------------- reading


def prediction_files(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The prediction files of either layout under ``uri`` (see the module docstring)."""
    base = uri.rstrip("/")
    return [file for file in storage.list_uri(uri, suffixes=(_SUFFIX,),
                                              storage_options=storage_options)
            if not any(part[:1] in ("_", ".") for part in file[len(base):].split("/") if part)]


def quarantine_files(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The quarantine files of a batch output."""
    return [file for file in storage.list_uri(quarantine_dir(uri), recursive=False,
                                              suffixes=(_SUFFIX,), storage_options=storage_options)
            if file.rsplit("/", 1)[-1].startswith(_PART)]


def scan(uri: str, columns: Sequence[str] | None = None, *, since: str | dt.datetime | None = None,
         weights: str | None = None, dedupe: bool = True, ids: Sequence[str] | None = None,
         files: Sequence[str] | None = None,
         storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The prediction rows under ``uri`` (either layout), as one table with ``columns``.

    ``ids``: only those rows (pushed down to the Parquet reader).  ``since``: only rows
    created at or after it (ISO time; naive means UTC).  ``weights``: only rows made by the
    model with that weights SHA-256.  ``dedupe``: one row per ``request_id``
    (the first, in file order; rows without one, the batch layout's, are all kept).  ``files``:
    only these of :func:`prediction_files` (a large store read one file at a time stays small
    in memory; ``dedupe`` then holds within the call).  An empty table with the schema when
    nothing matches.
    """
    wanted = list(columns or PREDICTION_SCHEMA.names)
    needed = list(dict.fromkeys([*wanted, *(["created_at"] if since else []),
                                 *(["weights_sha256"] if weights else []),
                                 *(["request_id"] if dedupe else [])]))
    files = prediction_files(uri, storage_options) if files is None else list(files)
    if not files:
        return PREDICTION_SCHEMA.empty_table().select(wanted)
    import pyarrow.dataset as pads

    fs, _ = storage.filesystem_for(uri, storage_options)
    where = None if ids is None else pads.field("id").isin(list(ids))
    table = pads.dataset([storage.strip_scheme(f) for f in files], schema=PREDICTION_SCHEMA,
                         format="parquet", filesystem=fs).to_table(columns=needed, filter=where)
    if since:
        moment = since if isinstance(since, dt.datetime) else dt.datetime.fromisoformat(since)
        moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
        table = table.filter(pc.greater_equal(table["created_at"],
                                              pa.scalar(moment, table["created_at"].type)))
    if weights:
        table = table.filter(pc.equal(table["weights_sha256"], weights))
    if dedupe:
        table = _first_per_request(table)
    return table.select(wanted)


def read_quarantine(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """All quarantine rows of a batch output (empty with the schema when none)."""
    files = quarantine_files(uri, storage_options)
    if not files:
        return QUARANTINE_SCHEMA.empty_table()
    import pyarrow.dataset as pads

    fs, _ = storage.filesystem_for(uri, storage_options)
    return pads.dataset([storage.strip_scheme(f) for f in files], schema=QUARANTINE_SCHEMA,
                        format="parquet", filesystem=fs).to_table()


def model_records(uri: str, storage_options: dict[str, Any] | None = None
                  ) -> list[dict[str, Any]]:
    """The models that wrote the predictions under ``uri``: the batch layout's ``_model.json``,
    or every model the serve log recorded (oldest name first)."""
    try:
        return [json.loads(storage.read_bytes(storage.join_uri(uri, MODEL_FILE),
                                              storage_options))]
    except FileNotFoundError:
        pass
    return [json.loads(storage.read_bytes(file, storage_options)) for file in storage.list_uri(
        storage.join_uri(uri, MODELS_DIR), recursive=False, suffixes=(".json",),
        storage_options=storage_options)]


def model_record(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one model that made the predictions under ``uri``: a batch output's, or the one
    model of a serve log.  Its ``mask_spec`` is how every row decodes, so a log holding rows of
    several models (whose class lists may differ) is refused rather than read as one."""
    records = model_records(uri, storage_options)
    if not records:
        raise ValueError(f"{uri}: no model record (_model.json, or _models/ of a serve log): "
                         f"not written by `rayseg predict` or `rayseg serve`")
    if len(records) > 1:
        models = ", ".join(f"{r.get('name')}:{r.get('version')} ({r['weights_sha256'][:12]})"
                           for r in records)
        raise ValueError(f"{uri}: the log holds rows of {len(records)} models ({models}); rows "
                         f"of different models do not mix: point the endpoint at a fresh "
                         f"out_uri for each model")
    return records[0]


def _first_per_request(table: pa.Table) -> pa.Table:
    ids = table.column("request_id").to_pylist()
    if not any(ids):
        return table
    seen: set[str] = set()
    keep = []
    for index, request_id in enumerate(ids):
        if request_id is None or request_id not in seen:
            keep.append(index)
            if request_id is not None:
                seen.add(request_id)
    return table.take(keep) if len(keep) < table.num_rows else table
