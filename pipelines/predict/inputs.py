"""Which inputs a ``rayseg predict`` run still has to do, as a Ray Dataset of ingest rows.

Every ingest source works (:mod:`pipelines.ingest`): a manifest, an ``images/`` (+ ``masks/``)
prefix, shards from ``rayseg pack``, and here also a bare prefix of images, since predicting needs
no masks.  Ids already committed under the output are dropped *before* any bytes are fetched
(manifests and prefixes are metadata on the driver); shards carry their bytes, so their done rows
are dropped right after the read.  Masks are never fetched.  Ids must be unique: exactly-once is
defined per id.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage
from pipelines.ingest.fetch import IO_CPUS_LEFT, IO_TASK_CPUS

if TYPE_CHECKING:
    import ray.data


@dataclass(frozen=True)
class InputPlan:
    """The inputs of one run: every input id, and a dataset of the ones still to do."""

    dataset: "ray.data.Dataset | None"
    ids: pa.Array
    skipped: int
    conflicts: tuple[str, ...] = ()   # done ids now naming another source (reported, not done)
    rows_per_shard: int | None = None   # shards: selected rows per input file, rounded up

    @property
    def todo(self) -> int:
        return len(self.ids) - self.skipped


def plan_inputs(source: str, done: pa.Array, *, split: str | None = None,
                done_sources: pa.Table | None = None,
                verify_done: bool = False, actors: int = 1) -> InputPlan:
    """Ingest rows of ``source`` (of ``split``, if given) whose id is not in ``done``.

    Manifest and prefix inputs are cut into blocks of at most 32 rows, and into at least 4
    blocks per actor: an actor takes whole blocks, so 40 rows in two blocks of 32 and 8 would
    leave one of two actors idle (Ray Data then stops it) and the run on one process.

    ``done_sources`` (:func:`pipelines.predict.store.done_sources`: ``id``, ``source_uri`` and,
    for ``verify_done``, ``source_sha256`` committed) catches an id that now names
    another file (a manifest edited between runs), and with ``verify_done`` also a file whose
    bytes changed (that reads every done input again): such rows are neither predicted again
    (that would write the id twice) nor silently skipped, but returned as ``conflicts``.
    """
    from pipelines import ingest

    kind = _kind(source)
    if kind == "shards":
        ids, files = _shard_ids(source, split)
        _check_unique(ids, source)
        skipped = int(pc.sum(pc.is_in(ids, value_set=done)).as_py() or 0)
        ds = ingest.read_shards(source, split=split)
        if skipped:
            ds = ds.map_batches(_drop_done, batch_format="pyarrow", num_cpus=IO_TASK_CPUS,
                                fn_kwargs={"done": done})
        return InputPlan(ds, ids, skipped, rows_per_shard=max(1, math.ceil(len(ids) / files)))
    table = ingest.list_images(_absolute(source)) if kind == "images" else \
        ingest.pair_table(source, kind)
    table = ingest.select_rows(table, split=split)
    ids = table["id"].combine_chunks()
    _check_unique(ids, source)
    conflicts = _moved(table, done_sources)
    if verify_done and done_sources is not None:
        conflicts += _changed_since(table.filter(pc.is_in(ids, value_set=done)), done_sources)
    todo = table.filter(pc.invert(pc.is_in(ids, value_set=done)))
    todo = todo.set_column(todo.schema.get_field_index("mask_uri"), "mask_uri",
                           pa.nulls(todo.num_rows, pa.string()))
    per_block = max(1, min(32, math.ceil(todo.num_rows / (4 * max(1, actors)))))
    dataset = ingest.fetch_pairs(todo, rows_per_block=per_block) if todo.num_rows else None
    return InputPlan(dataset, ids, len(ids) - todo.num_rows, conflicts)


def _moved(table: pa.Table, done: pa.Table | None) -> tuple[str, ...]:
    """Ids of ``table`` committed from another source URI than the one they name now (sorted)."""
    if done is None or not done.num_rows or not table.num_rows:
        return ()
    joined = table.select(["id", "image_uri"]).join(done.select(["id", "source_uri"]), "id",
                                                    join_type="inner")
    moved = joined.filter(pc.and_(pc.is_valid(joined["source_uri"]),
                                  pc.not_equal(joined["source_uri"], joined["image_uri"])))
    moved = moved.sort_by("id")
    return tuple(f"{i}: committed from {was}, now {now}" for i, was, now in zip(
        moved["id"].to_pylist(), moved["source_uri"].to_pylist(),
        moved["image_uri"].to_pylist()))


def _changed_since(table: pa.Table, done_sources: pa.Table) -> tuple[str, ...]:
    """Done rows whose image bytes no longer have the committed SHA-256 (reads them all)."""
    import hashlib

    from pipelines import ingest

    if not table.num_rows:
        return ()
    mine = done_sources.filter(pc.is_in(done_sources["id"],
                                        value_set=table["id"].combine_chunks()))
    done = dict(zip(mine["id"].to_pylist(), mine["source_sha256"].to_pylist()))
    table = table.set_column(table.schema.get_field_index("mask_uri"), "mask_uri",
                             pa.nulls(table.num_rows, pa.string()))
    changed = []
    for batch in ingest.fetch_pairs(table).iter_batches(batch_format="pyarrow"):
        for id_, data in zip(batch["id"].to_pylist(), batch["image_bytes"].to_pylist()):
            digest = done.get(id_)
            if digest and data is not None and hashlib.sha256(data).hexdigest() != digest:
                changed.append(f"{id_}: its bytes changed since they were predicted")
    return tuple(changed)


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


def _shard_ids(source: str, split: str | None) -> tuple[pa.Array, int]:
    """Ids of the shard rows (of ``split``), reading only the id and split columns, and the
    number of shard files."""
    import pyarrow.dataset as pads

    files = storage.list_uri(source, suffixes=(".parquet",))
    fs, _ = storage.filesystem_for(source)
    dataset = pads.dataset([storage.strip_scheme(f) for f in files], filesystem=fs,
                           format="parquet")
    table = dataset.to_table(columns=["id", "split"])
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    return table.column("id").combine_chunks(), max(1, len(files))


def _drop_done(batch: pa.Table, done: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch["id"], value_set=done)))


def _check_unique(ids: pa.Array | pa.ChunkedArray, source: str) -> None:
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        raise ValueError(f"{source}: ids must be unique for exactly-once output, but "
                         f"{len(repeated)} repeat (e.g. {repeated.field('values')[:3].to_pylist()}); "
                         f"give the manifest an explicit unique 'id' column")


def actor_cpus(cpus: float, size: int) -> float:
    """The CPUs each of ``size`` actors asks for on ``cpus`` CPUs: all but ``IO_CPUS_LEFT``
    (for the pool's own read and write tasks), shared, and at least one I/O task's worth."""
    return max(IO_TASK_CPUS, (cpus - IO_CPUS_LEFT) / size)


def map_with_actors(plan: InputPlan, cls: type, *, kwargs: dict[str, Any], schema: pa.Schema,
                    batch_size: int, actors: int | None,
                    log: Callable[[str], None] | None = None, what: str = "") -> pa.Table:
    """Every input row through an actor pool of ``cls`` (each actor opens what it needs once,
    as predict's do), gathered on the driver: for per-image results that are small (scores,
    maps), not for masks at scale.  ``actors``: None is one per CPU; each asks for its share of
    the CPUs, half a CPU left to the read tasks.  ``log`` gets the line saying what the job
    (``what``) waits for, when other work holds it (:func:`pipelines.raycluster.wait_note`)."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines.raycluster import wait_note

    cpus = float(ray.cluster_resources().get("CPU", 1))
    size = actors or max(1, int(cpus))
    if plan.dataset is None:
        return schema.empty_table()
    share = min(1.0, actor_cpus(cpus, size))
    if log is not None and (note := wait_note(what, {"CPU": share + IO_TASK_CPUS})):
        log(note)
    refs = plan.dataset.map_batches(
        cls, batch_size=batch_size, batch_format="pyarrow", fn_constructor_kwargs=kwargs,
        compute=ActorPoolStrategy(min_size=1, max_size=size, initial_size=size),
        num_cpus=share).to_arrow_refs()
    tables = ray.get(refs)
    return pa.concat_tables(tables) if tables else schema.empty_table()
