"""``rayseg pack``: many small image/mask objects -> a few Parquet shards of bounded size.

Ray Data reads a few hundred large objects far faster than millions of small ones, and S3 stops
throttling (notes §3.1, ray #55055 / #35826).  Each shard row follows :data:`SHARD_SCHEMA`:
the original image bytes (no re-encoding), the mask bytes, format, height, width, source URIs,
sha256 and split/fold.  Packing is faithful, not a filter: a missing or broken file is packed as
it is (null bytes or unreadable size) and is quarantined when decoded later.  Run
``rayseg validate`` first to catch it early.

Layout: ``<out>/part-*.parquet``, or ``<out>/split=<name>/...`` (hive) with ``partition_by_split``,
plus ``<out>/_rayseg_pack.json`` describing the run.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from dataclasses import asdict, dataclass

import pyarrow as pa

from pipelines import storage
from pipelines.ingest import (SourceKind, detect_kind, header_size, mask_part_uris, pair_table,
                              read_pairs)
from pipelines.records import SHARD_SCHEMA
from seg_core.codecs import sniff_format

PACK_META = "_rayseg_pack.json"
_SIZE_SAMPLE = 32


@dataclass(frozen=True)
class PackSummary:
    """What ``pack`` wrote."""

    out_uri: str
    rows: int
    files: int
    total_bytes: int
    rows_per_file: int
    shard_mb: float
    partition_by_split: bool
    source: str


def pack(source: str, out_uri: str, *, shard_mb: float = 256.0, partition_by_split: bool = False,
         kind: SourceKind = "auto", num_cpus: float = 0.5,
         storage_options: storage.StorageOptions | None = None) -> PackSummary:
    """Pack ``source`` (manifest, prefix or shards) into Parquet shards under ``out_uri``.

    Shards hold about ``shard_mb`` MB each: rows per file come from the mean object size of a
    sample of the inputs.  ``out_uri`` is overwritten.
    """
    if shard_mb <= 0:
        raise ValueError(f"pack: shard_mb must be > 0, got {shard_mb}")
    from ray.data import SaveMode

    kind = detect_kind(source, storage_options) if kind == "auto" else kind
    row_bytes = _mean_row_bytes(source, kind, storage_options)
    rows_per_file = max(1, int(shard_mb * 1024 * 1024 // max(row_bytes, 1)))
    rows = read_pairs(source, kind=kind, storage_options=storage_options).map_batches(
        to_shard_rows, batch_format="pyarrow", num_cpus=num_cpus, udf_modifying_row_count=False)
    fs, path = storage.filesystem_for(out_uri, storage_options)
    # min_rows_per_file with partition_cols is deprecated in 2.60: there max alone bounds shards.
    sizing = {"max_rows_per_file": rows_per_file}
    if not partition_by_split:
        sizing["min_rows_per_file"] = rows_per_file
    rows.write_parquet(path, filesystem=fs, mode=SaveMode.OVERWRITE,
                       partition_cols=["split"] if partition_by_split else None, **sizing)
    files = storage.list_files(out_uri, suffixes=(".parquet",), storage_options=storage_options)
    count = sum(_parquet_rows(uri, storage_options) for uri, _ in files)
    summary = PackSummary(out_uri=out_uri, rows=count, files=len(files),
                          total_bytes=sum(size for _, size in files), rows_per_file=rows_per_file,
                          shard_mb=shard_mb, partition_by_split=partition_by_split, source=source)
    meta = {"format_version": 1, **asdict(summary),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    storage.write_bytes(storage.join_uri(out_uri, PACK_META),
                        json.dumps(meta, indent=2).encode(), storage_options)
    return summary


def to_shard_rows(batch: pa.Table) -> pa.Table:
    """:data:`records.ROW_SCHEMA` rows -> :data:`SHARD_SCHEMA` rows (format, size, sha256)."""
    images = batch["image_bytes"].to_pylist()
    formats, heights, widths, digests = [], [], [], []
    for data in images:
        size = header_size(data) if data else None
        formats.append(sniff_format(data) if data else None)
        heights.append(size[1] if size else None)
        widths.append(size[0] if size else None)
        digests.append(hashlib.sha256(data).hexdigest() if data is not None else None)
    columns = {
        "id": batch["id"], "image_bytes": batch["image_bytes"], "mask_bytes": batch["mask_bytes"],
        "image_format": pa.array(formats, pa.string()), "height": pa.array(heights, pa.int32()),
        "width": pa.array(widths, pa.int32()), "source_uri": batch["image_uri"],
        "mask_uri": batch["mask_uri"], "sha256": pa.array(digests, pa.string()),
        "split": batch["split"], "fold": batch["fold"],
    }
    return pa.Table.from_arrays([columns[f.name] for f in SHARD_SCHEMA],
                                schema=SHARD_SCHEMA)


def _mean_row_bytes(source: str, kind: SourceKind, storage_options) -> float:
    """Mean bytes per pair, from the sizes of a random sample of objects (or of the shards)."""
    if kind == "shards":
        files = storage.list_files(source, suffixes=(".parquet",), storage_options=storage_options)
        rows = sum(_parquet_rows(uri, storage_options) for uri, _ in files)
        return sum(size for _, size in files) / max(rows, 1)
    table = pair_table(source, kind, storage_options)
    picks = random.Random(0).sample(range(table.num_rows), min(_SIZE_SAMPLE, table.num_rows))
    uris = []
    for i in picks:
        for name in ("image_uri", "mask_uri"):
            value = table[name][i].as_py()
            uris.extend(mask_part_uris(value))
    sizes = [s for s in storage.file_sizes(uris, storage_options) if s is not None]
    return sum(sizes) / max(len(picks), 1) if sizes else 1.0


def _parquet_rows(uri: str, storage_options) -> int:
    import pyarrow.parquet as pq

    with storage.open_uri(uri, storage_options) as handle:
        return pq.ParquetFile(handle).metadata.num_rows
