"""Pairs -> rows with their bytes, in Ray tasks (I/O threads per task): files by pair table, pack
shards by Parquet, the few bytes one process needs (:func:`read_split_bytes`,
:func:`read_mask`)."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence, TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.ingest.policy import (
    _FETCH_THREADS,
    _HIVE_NULL,
    DEFAULT_MAX_BYTES,
    IGNORE_PREFIX,
    MASK_SEPARATOR,
    read_limited,
    SourceKind,
)
from pipelines.ingest.sources import detect_kind, pair_table, select_rows
from pipelines.records import PAIR_SCHEMA, refusal_json, ROW_SCHEMA
from seg_core.codecs import decode_mask, IGNORE_PART, pack_mask_parts
from seg_core.config import MaskSpec
from seg_core.errors import InputError

if TYPE_CHECKING:
    import ray.data


# CPUs a fetch, shard-read or write task asks for: its work is I/O bound, so it stays small on
# 2-core machines.  A CPU actor pool leaves IO_CPUS_LEFT free for such tasks: a pool holding
# every CPU starves its own reads and hangs (notes §3.2, ray #44687).
IO_TASK_CPUS = 0.25
IO_CPUS_LEFT = 0.5


def read_pairs(source: str, *, kind: SourceKind = "auto", split: str | None = None,
               folds: Sequence[int] | None = None, shuffle_seed: int | None = None,
               rows_per_block: int = 32, num_cpus: float = IO_TASK_CPUS,
               storage_options: storage.StorageOptions | None = None) -> "ray.data.Dataset":
    """A Ray Dataset of :data:`ROW_SCHEMA` rows from a manifest, a prefix or pack shards.

    ``shuffle_seed`` fixes a shuffle of the pair order (file order and block order for shards)
    and makes the iteration order reproducible (:func:`seeded_order`).
    ``num_cpus`` is per fetch (or shard read) task; fetching is I/O bound, so it stays small on
    2-core machines.  A following ``map_batches`` with the same ``num_cpus`` fuses with it.
    """
    kind = detect_kind(source, storage_options) if kind == "auto" else kind
    if kind == "shards":
        return read_shards(source, split=split, folds=folds, shuffle_seed=shuffle_seed,
                           num_cpus=num_cpus, storage_options=storage_options)
    table = select_rows(pair_table(source, kind, storage_options), split=split, folds=folds)
    if shuffle_seed is not None:
        table = table.take(np.random.default_rng(shuffle_seed).permutation(table.num_rows))
    dataset = fetch_pairs(table, rows_per_block=rows_per_block, num_cpus=num_cpus,
                          storage_options=storage_options)
    return seeded_order(dataset) if shuffle_seed is not None else dataset


def seeded_order(dataset: "ray.data.Dataset") -> "ray.data.Dataset":
    """Make ``dataset`` (and everything derived from it) yield rows in a reproducible order.

    Ray Data streams blocks out as they finish; ``preserve_order`` keeps the planned order, so
    the seeded shuffle is the order a consumer sees.  Only this dataset's context changes.
    """
    dataset.context.execution_options.preserve_order = True
    return dataset


def fetch_pairs(table: pa.Table, *, rows_per_block: int = 32, num_cpus: float = IO_TASK_CPUS,
                storage_options: storage.StorageOptions | None = None) -> "ray.data.Dataset":
    """Pair metadata (:data:`PAIR_SCHEMA`, e.g. a filtered :func:`pair_table`) -> fetched rows.

    The table is cut into blocks of at most ``rows_per_block`` rows on the driver (metadata
    only, :func:`table_dataset`); each block's objects are read by one Ray task with I/O
    threads.  Null URIs give null bytes.
    """
    options = storage.resolve_options(storage_options)   # driver's endpoint, shipped to tasks
    return table_dataset(table, rows_per_block).map_batches(
        fetch_bytes, batch_format="pyarrow", batch_size=None, num_cpus=num_cpus,
        fn_kwargs={"storage_options": options}, udf_modifying_row_count=False)


def table_dataset(table: pa.Table, rows_per_block: int) -> "ray.data.Dataset":
    """``table`` (metadata rows: URIs, ids) as a Ray Dataset of ``ceil(rows / rows_per_block)``
    blocks, as even as the rows allow (at most ``rows_per_block`` each), built on the driver.

    ``ray.data.from_arrow`` reads every block's metadata in a Ray task that asks for a whole
    CPU, so planning a job waited, without a word, while other work (a Serve app, another
    job's actors) held the CPUs, and forever on a node with less than one CPU free.  Ray
    Data's ``from_items`` builds the blocks here and starts no task.  Column types are
    inferred from the values (a column of nulls has Arrow's null type): readers cast to the
    schema they expect.  No rows: one empty block of ``table``'s schema, as ``from_arrow`` gives
    (``from_items`` would give a dataset without a schema).
    """
    import ray

    if not table.num_rows:
        return ray.data.from_arrow(table)
    blocks = math.ceil(table.num_rows / max(1, rows_per_block))
    return ray.data.from_items(table.to_pylist(), override_num_blocks=blocks)


def read_shards(uri: str, *, split: str | None = None, folds: Sequence[int] | None = None,
                shuffle_seed: int | None = None, num_cpus: float = IO_TASK_CPUS,
                storage_options: storage.StorageOptions | None = None) -> "ray.data.Dataset":
    """Pack shards -> a Ray Dataset of :data:`ROW_SCHEMA` rows (file/block order seeded).

    Read and rename tasks ask for ``num_cpus`` each; a following ``map_batches`` with the same
    ``num_cpus`` fuses into the same task (no object-store hop between read and decode).
    """
    import ray
    from ray.data import FileShuffleConfig

    fs, path = storage.filesystem_for(uri, storage_options)
    shuffle = FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"], shuffle=shuffle,
                               num_cpus=num_cpus)
    ds = ds.map_batches(shard_to_rows, batch_format="pyarrow", num_cpus=num_cpus,
                        fn_kwargs={"split": split, "folds": None if folds is None else list(folds)})
    if shuffle_seed is None:
        return ds
    return seeded_order(ds.randomize_block_order(seed=shuffle_seed))


def read_split_bytes(source: str, *, kind: str, split: str, limit: int,
                     storage_options: storage.StorageOptions | None = None) -> pa.Table:
    """``image_bytes`` and ``mask_bytes`` (with ``id``, ``image_uri``, ``mask_uri`` and
    ``refused``) of up to ``limit`` rows of ``split``, read on this process: the few pairs the
    end of training needs (drift baseline, post-processing choice) take no Ray job.  ``kind``
    (``auto`` detects it): ``shards`` reads only those columns of matching shard rows; a
    manifest's or prefix's pairs are fetched with :func:`fetch_bytes`."""
    import pyarrow.dataset as pads

    from pipelines.ingest.sources import detect_kind, pair_table, select_rows

    options = storage.resolve_options() if storage_options is None else storage_options
    kind = detect_kind(source, storage_options) if kind == "auto" else kind
    if kind != "shards":
        pairs = select_rows(pair_table(source, kind), split=split).slice(0, limit)
        return fetch_bytes(pairs, options)
    fs, path = storage.filesystem_for(source, storage_options)
    data = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive",
                        exclude_invalid_files=True)
    table = data.head(limit, columns=["id", "source_uri", "mask_uri", "image_bytes",
                                      "mask_bytes"], filter=pads.field("split") == split)
    return table.rename_columns(["id", "image_uri", "mask_uri", "image_bytes", "mask_bytes"]
                                ).append_column("refused", pa.nulls(table.num_rows, pa.string()))


def shard_to_rows(batch: pa.Table, split: str | None = None,
                  folds: list[int] | None = None) -> pa.Table:
    """Shard rows -> :data:`ROW_SCHEMA` rows, keeping only ``split`` / ``folds`` if given."""
    import pyarrow.compute as pc

    renamed = {"id": "id", "image_uri": "source_uri", "mask_uri": "mask_uri", "split": "split",
               "fold": "fold", "image_bytes": "image_bytes", "mask_bytes": "mask_bytes"}
    table = pa.Table.from_arrays(   # packed bytes were read at pack time: nothing refused
        [batch[renamed[f.name]].cast(f.type) if f.name in renamed
         else pa.nulls(batch.num_rows, f.type) for f in ROW_SCHEMA], schema=ROW_SCHEMA)
    split_values = pc.if_else(pc.equal(table["split"], _HIVE_NULL), None, table["split"])
    table = table.set_column(table.schema.get_field_index("split"), "split", split_values)
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    if folds is not None:
        table = table.filter(pc.is_in(table["fold"], pa.array(folds, pa.int32())))
    return table


def fetch_bytes(batch: pa.Table, storage_options: dict[str, Any],
                max_bytes: int = DEFAULT_MAX_BYTES) -> pa.Table:
    """Add ``image_bytes`` and ``mask_bytes`` (null where a file is missing) to a pair batch.

    Refused rows are not read; a file that is not regular or is over ``max_bytes`` refuses its
    row (``refused`` set, bytes null), so it becomes a quarantine row downstream.
    """
    refused = batch["refused"].to_pylist()

    def fetch(i: int) -> tuple[bytes | None, bytes | None, str | None]:
        if refused[i]:
            return None, None, refused[i]
        try:
            return (_read_or_none(batch["image_uri"][i].as_py(), storage_options, max_bytes),
                    read_mask_bytes(batch["mask_uri"][i].as_py(), storage_options, max_bytes),
                    None)
        except InputError as error:
            return None, None, refusal_json(error)
        except (OSError, pa.ArrowException) as error:   # permissions, bad paths, I/O errors
            return None, None, refusal_json(InputError(
                "unreadable", f"{type(error).__name__}: {error}",
                source=batch["image_uri"][i].as_py() or "<row>",
                hint="check the path and the read permissions"))

    with ThreadPoolExecutor(max_workers=_FETCH_THREADS) as pool:
        image_bytes, mask_bytes, refused = zip(*pool.map(fetch, range(batch.num_rows))) \
            if batch.num_rows else ((), (), ())
    columns = [batch[name].cast(field.type) for name, field in zip(PAIR_SCHEMA.names, PAIR_SCHEMA)
               if name != "refused"]
    columns += [pa.array(refused, pa.string()), pa.array(image_bytes, pa.binary()),
                pa.array(mask_bytes, pa.binary())]
    return pa.Table.from_arrays(columns, schema=ROW_SCHEMA)


def _read_or_none(uri: str | None, storage_options: dict[str, Any] | None,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> bytes | None:
    return None if uri is None else read_limited(uri, storage_options, max_bytes)


def read_mask_bytes(uri: str | None, storage_options: dict[str, Any] | None = None,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> bytes | None:
    """One mask file's bytes, or the per-class files of ``a.png;b.png`` packed into one blob
    (:func:`pack_mask_parts`); ``None`` when any file is missing."""
    if uri is None or (MASK_SEPARATOR not in uri and not uri.startswith(IGNORE_PREFIX)):
        return _read_or_none(uri, storage_options, max_bytes)
    parts = []
    for part in uri.split(MASK_SEPARATOR):
        data = _read_or_none(part.removeprefix(IGNORE_PREFIX), storage_options, max_bytes)
        if data is None:
            return None
        parts.append(IGNORE_PART + data if part.startswith(IGNORE_PREFIX) else data)
    return pack_mask_parts(parts)


def read_mask(uri: str, spec: MaskSpec, storage_options: dict[str, Any] | None = None
              ) -> np.ndarray:
    """Read and decode the truth mask of a manifest cell (one file, or ``a.png;b.png`` per class).

    Raises ``FileNotFoundError`` when a file is missing, :class:`InputError` when it is bad.
    """
    data = read_mask_bytes(uri, storage_options)
    if data is None:
        raise FileNotFoundError(f"{uri}: a mask file is missing")
    return decode_mask(data, spec, source=uri)
