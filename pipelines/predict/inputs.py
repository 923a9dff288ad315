"""Which inputs a ``rayseg predict`` run still has to do, as a Ray Dataset of ingest rows.

Every ingest source works (:mod:`pipelines.ingest`): a manifest, an ``images/`` (+ ``masks/``)
prefix, shards from ``rayseg pack``, and here also a bare prefix of images, since predicting needs
no masks.  Ids already committed under the output are dropped *before* any bytes are fetched
(manifests and prefixes are metadata on the driver); shards carry their bytes, so their done rows
are dropped right after the read.  Masks are never fetched.  Ids must be unique: exactly-once is
defined per id.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage

if TYPE_CHECKING:
    import ray.data


@dataclass(frozen=True)
class InputPlan:
    """The inputs of one run: every input id, and a dataset of the ones still to do."""

    dataset: "ray.data.Dataset | None"
    ids: pa.Array
    skipped: int

    @property
    def todo(self) -> int:
        return len(self.ids) - self.skipped


def plan_inputs(source: str, done: pa.Array, *, split: str | None = None) -> InputPlan:
    """Ingest rows of ``source`` (of ``split``, if given) whose id is not in ``done``."""
    from pipelines import ingest

    kind = _kind(source)
    if kind == "shards":
        ids = _shard_ids(source, split)
        _check_unique(ids, source)
        skipped = int(pc.sum(pc.is_in(ids, value_set=done)).as_py() or 0)
        ds = ingest.read_shards(source, split=split)
        if skipped:
            ds = ds.map_batches(_drop_done, batch_format="pyarrow", num_cpus=0.25,
                                fn_kwargs={"done": done})
        return InputPlan(ds, ids, skipped)
    table = ingest.list_images(_absolute(source)) if kind == "images" else \
        ingest.pair_table(source, kind)
    table = ingest.select_rows(table, split=split)
    ids = table["id"].combine_chunks()
    _check_unique(ids, source)
    todo = table.filter(pc.invert(pc.is_in(ids, value_set=done)))
    todo = todo.set_column(todo.schema.get_field_index("mask_uri"), "mask_uri",
                           pa.nulls(todo.num_rows, pa.string()))
    dataset = ingest.fetch_pairs(todo) if todo.num_rows else None
    return InputPlan(dataset, ids, len(ids) - todo.num_rows)


def _kind(source: str) -> str:
    """ingest's source kinds, plus ``images``: a bare prefix of images (masks optional here)."""
    from pipelines.ingest import detect_kind, list_images

    try:
        return detect_kind(source)
    except ValueError:
        if list_images(_absolute(source)).num_rows:
            return "images"
        raise


def _absolute(source: str) -> str:
    return storage.strip_scheme(source) if storage.is_local(source) else source


def _shard_ids(source: str, split: str | None) -> pa.Array:
    """Ids of the shard rows (of ``split``), reading only the id and split columns."""
    import pyarrow.dataset as pads

    files = storage.list_uri(source, suffixes=(".parquet",))
    fs, _ = storage.filesystem_for(source)
    dataset = pads.dataset([storage.strip_scheme(f) for f in files], filesystem=fs,
                           format="parquet")
    table = dataset.to_table(columns=["id", "split"])
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    return table.column("id").combine_chunks()


def _drop_done(batch: pa.Table, done: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch["id"], value_set=done)))


def _check_unique(ids: pa.Array | pa.ChunkedArray, source: str) -> None:
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        raise ValueError(f"{source}: ids must be unique for exactly-once output, but "
                         f"{len(repeated)} repeat (e.g. {repeated.field('values')[:3].to_pylist()}); "
                         f"give the manifest an explicit unique 'id' column")
