"""Training input: decode and deterministic preprocessing in Ray Data, random augmentation per batch.

- :func:`training_dataset`: rows ``{id, image, mask}``.  Without a resize, ``image`` is the
  decoded integers as C x H x W (uint8, or uint16 when ``preprocessing.bit_depth`` is set:
  :func:`seg_core.pixels.compact_pixels`) and the training worker turns each batch into the
  network's input on its device (:func:`seg_core.inference.normalise_pixels`, bit for bit what
  ``prepare_image`` gives).  With a resize, ``image`` is ``prepare_image``'s float32 C x H' x W'.
  ``mask`` is resized to match by nearest neighbour and stored in the smallest integer type
  that holds the class ids and ``ignore_index`` (:func:`mask_dtype`; K x H x W for multi-label).
  Streaming and bounded: nothing is materialised; a seed fixes the pair order.
- :func:`build_train_data`: one run's train and val datasets (by split, or by fold), their
  counts, the source's digest, class pixel counts, and the per-batch augmentation
  (:class:`seg_core.transforms.Augment`) the training loop applies.
- :func:`decoded_dataset`: decoded rows ``{id, image (H x W x C raw), mask}`` for validation,
  which runs the full-resolution ``Segmenter`` path.

Bad pairs never crash the pipeline: they are dropped from the dataset and, when
``quarantine_uri`` is given, each task writes them to ``<quarantine_uri>/part-<hash>.parquet``
(named by the batch's ids, so a re-executed task overwrites rather than duplicates).

CPU shares (notes §3.2): decode tasks ask for ``num_cpus=0.5`` by default, so Ray Data can keep
running beside Train workers that reserve fractional CPUs on a 2-core machine.  A decode task
imports no torch (:mod:`seg_core.pixels`) unless training resizes: each of the up to eight
worker processes a 2-core node starts would spend about 1.4 s of CPU on that import.
"""
from __future__ import annotations

import hashlib
import threading
import zlib
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.config import TrainConfig
from pipelines.ingest import SourceKind, decode_pairs, pair_table, read_pairs
from pipelines.records import QUARANTINE_SCHEMA, quarantine_row
from seg_core.config import MaskSpec, Preprocessing
from seg_core.errors import InputError
from seg_core.pixels import compact_pixels, resize_mask_nearest

if TYPE_CHECKING:
    import ray.data
    import torch

    from seg_core.transforms import Augment


def training_dataset(source: str, mask_spec: MaskSpec, preprocessing: Preprocessing, *,
                     seed: int = 0, split: str | None = None, folds: Sequence[int] | None = None,
                     kind: SourceKind = "auto", quarantine_uri: str | None = None,
                     num_cpus: float = 0.5, rows_per_block: int = 16,
                     storage_options: storage.StorageOptions | None = None) -> "ray.data.Dataset":
    """Rows of ``split`` / ``folds`` from ``source``, decoded and preprocessed, in seeded order."""
    rows = read_pairs(source, kind=kind, split=split, folds=folds, shuffle_seed=seed,
                      rows_per_block=rows_per_block, storage_options=storage_options)
    pixels, masks = cache_types(preprocessing, mask_spec)
    return rows.map_batches(
        prepare_batch, batch_format="numpy", num_cpus=num_cpus,
        fn_kwargs={"mask_spec": mask_spec, "preprocessing": preprocessing,
                   "quarantine_uri": quarantine_uri, "pixel_dtype": pixels, "mask_dtype": masks,
                   "storage_options": storage.resolve_options(storage_options)})


def decoded_dataset(source: str, mask_spec: MaskSpec, *, max_pixels: int = 64_000_000,
                    split: str | None = None, folds: Sequence[int] | None = None,
                    kind: SourceKind = "auto", quarantine_uri: str | None = None,
                    num_cpus: float = 0.5, rows_per_block: int = 16,
                    storage_options: storage.StorageOptions | None = None) -> "ray.data.Dataset":
    """Rows ``{id, image (H x W x C as decoded), mask}`` of good pairs, in manifest order."""
    rows = read_pairs(source, kind=kind, split=split, folds=folds, rows_per_block=rows_per_block,
                      storage_options=storage_options)
    return rows.map_batches(
        prepare_batch, batch_format="numpy", num_cpus=num_cpus,
        fn_kwargs={"mask_spec": mask_spec, "preprocessing": None, "max_pixels": max_pixels,
                   "quarantine_uri": quarantine_uri, "mask_dtype": mask_dtype(mask_spec),
                   "storage_options": storage.resolve_options(storage_options)})


# ------------------------------------------------------------------------------ one run's data

TASK_CPUS = 0.25  # Ray Data tasks stay small so that they fit next to fractional Train workers


@dataclass(frozen=True)
class TrainData:
    """Ray Datasets of one run and the augmentation the loop applies per batch."""

    train: Any  # rows {id, image C,h,w (compact integers, or float32 when resized), mask}
    val: dict[str, Any]  # {"val_<rank>": that worker's decoded originals {id, image, mask}}
    augment: Augment  # applied by the loop to every training batch
    num_train: int
    num_val: int
    source_sha256: str
    class_pixels: tuple[int, ...] = ()  # labelled training pixels per class (at training size)
    labelled_pixels: int = 0  # training pixels not ignored (multi-label: per image, not class)
    cached: bool = False  # decoded once into the object store: epochs only read it back
    # content hash of the training rows (data_sha256): from the cached set's one pass; None
    # when the set is streamed (hashing it would be a second full read)
    data_sha256: str | None = None


def build_train_data(cfg: TrainConfig) -> TrainData:
    """Datasets from ``cfg.data``: by split, or by fold when cross-validating.

    Bad pairs are dropped and written to ``<storage_path>/<run_name>/quarantine/``.  With
    ``data.cache_decoded`` the deterministic work (fetch, decode, resize, normalise) runs once
    here, before the trainer reserves CPUs; random augmentation stays per batch in the loop.
    """
    from seg_core.transforms import Augment   # torch: here on the driver, not in decode tasks

    source = cfg.data.manifest or cfg.data.shards
    kind = "manifest" if cfg.data.manifest else "shards"
    train_sel: dict[str, Any] = {"split": cfg.data.train_split}
    val_sel: dict[str, Any] = {"split": cfg.data.val_split}
    if cfg.fold is not None:  # CV partitions the training rows only
        others = [f for f in range(cfg.nfolds) if f != cfg.fold]
        train_sel, val_sel = {**train_sel, "folds": others}, {**train_sel, "folds": [cfg.fold]}
    if kind == "manifest":
        digest = sha256_hex(storage.read_bytes(source))
    else:
        digest = sha256_hex("\n".join(storage.list_uri(source, suffixes=(".parquet",))).encode())
    common = {"kind": kind, "num_cpus": TASK_CPUS, "quarantine_uri": storage.join_uri(
        cfg.storage.storage_path, cfg.run_name, "quarantine")}
    aug = cfg.augment
    train = training_dataset(source, cfg.mask, cfg.preprocessing, seed=cfg.seed, **train_sel,
                             **common)
    val = decoded_dataset(source, cfg.mask, max_pixels=cfg.preprocessing.max_pixels, **val_sel,
                          **common)
    cache, why = cache_decision(cfg, source, kind, train_sel, val_sel)
    print(f"[{cfg.run_name}] data: {why}", flush=True)
    if cache:
        train, val = train.materialize(), val.materialize()
    counts = [train.count(), val.count()]  # after bad pairs were dropped
    if min(counts) == 0:
        raise ValueError(f"{source}: {counts[0]} usable train and {counts[1]} val rows for "
                         f"{train_sel} / {val_sel}; both must be non-empty (check split names, "
                         f"folds and the quarantine)")
    # one cheap pass over the cached set (a second decode otherwise: only when auto needs it)
    class_pixels: tuple[int, ...] = ()
    labelled, data_sha256 = 0, None
    if cache or "auto" in (cfg.class_weights, cfg.pos_weight):
        per_class, labelled, data_sha256 = class_pixel_counts(train, cfg.mask)
        class_pixels = tuple(int(c) for c in per_class)
    augment = Augment(crop_size=aug.crop_hw, hflip=aug.hflip, vflip=aug.vflip, rot90=aug.rot90,
                      ignore_index=cfg.mask.ignore_index, seed=cfg.seed, elastic_px=aug.elastic)
    val = val_shards(val, cfg.scaling.num_workers, materialize=cache)
    return TrainData(train=train, val=val, augment=augment, num_train=counts[0], cached=cache,
                     num_val=counts[1], source_sha256=digest, class_pixels=class_pixels,
                     labelled_pixels=labelled, data_sha256=data_sha256)


def val_shards(val: "ray.data.Dataset", workers: int, *,
               materialize: bool) -> dict[str, "ray.data.Dataset"]:
    """``{"val_<rank>": rows of that worker}``: the val set partitioned by a hash of each id.

    Ray Train's own split (``streaming_split(equal=True)``) drops rows to even out the shares,
    which validation must not do; these unsplit per-rank datasets keep every row exactly once,
    and each worker reads only its own.  A cached val set is partitioned once, here; one
    worker reads the set as it is (no partition pass).
    """
    if workers == 1:
        return {"val_0": val}
    shards = {f"val_{rank}": val.map_batches(_rows_of_rank, batch_format="numpy",
                                             num_cpus=TASK_CPUS,
                                             fn_kwargs={"rank": rank, "workers": workers})
              for rank in range(workers)}
    return {name: ds.materialize() for name, ds in shards.items()} if materialize else shards


def _rows_of_rank(batch: dict[str, np.ndarray], rank: int, workers: int
                  ) -> dict[str, np.ndarray]:
    keep = [i for i, id_ in enumerate(batch["id"])
            if zlib.crc32(str(id_).encode()) % workers == rank]
    return {name: column[keep] for name, column in batch.items()}


CACHE_SHARE = 0.5     # decoded sets may take this share of the object store to be cached
_SIZE_SAMPLE = 16     # images whose headers give the mean size


def cache_decision(cfg: TrainConfig, source: str, kind: str, train_sel: dict[str, Any],
                   val_sel: dict[str, Any]) -> tuple[bool, str]:
    """Whether to materialise the decoded sets, and the sentence that says why.

    ``data.cache_decoded: auto`` estimates the decoded sizes in the types they are cached in
    (:func:`bytes_per_pixel`: uint8 pixels and masks in the common case, 4 bytes per RGB pixel)
    from the row counts and the mean image size of a sample of headers, and caches when they
    take at most :data:`CACHE_SHARE` of the object store; a dataset that would not fit streams
    (decoded again every epoch).
    """
    import ray

    from pipelines.raycluster import store_note

    rows, pixels = _rows_and_mean_pixels(source, kind, train_sel, val_sel)
    trained = cfg.preprocessing.resize[0] * cfg.preprocessing.resize[1] \
        if cfg.preprocessing.resize else pixels
    train_bpp, val_bpp = bytes_per_pixel(cfg.preprocessing, cfg.mask)
    need = rows[0] * trained * train_bpp + rows[1] * pixels * val_bpp
    store = float(ray.cluster_resources().get("object_store_memory", 0))
    setting = cfg.data.cache_decoded
    cache = need <= CACHE_SHARE * store if setting == "auto" else bool(setting)
    action = ("caching them" if cache else "streaming them (decoded again every epoch)") + (
        f" as data.cache_decoded={str(setting).lower()} says" if setting != "auto" else
        "" if cache else "; data.cache_decoded=true forces caching")
    stored, masks = cache_types(cfg.preprocessing, cfg.mask)
    return cache, (f"decoded train + val ~{need / 2**20:,.0f} MiB ({stored or 'float32'} "
                   f"pixels, {masks} masks: {train_bpp} B per training pixel), object store "
                   f"{store / 2**20:,.0f} MiB{store_note()}: {action}")


def _rows_and_mean_pixels(source: str, kind: str, train_sel: dict[str, Any],
                          val_sel: dict[str, Any]) -> tuple[tuple[int, int], float]:
    """(train rows, val rows) and the mean H x W of a sample of images (header reads only)."""
    import random

    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from pipelines.ingest import header_size

    if kind == "shards":
        fs, path = storage.filesystem_for(source)
        table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive",
                             exclude_invalid_files=True).to_table(
            columns=["split", "fold", "height", "width"])
        sizes = [h * w for h, w in zip(table["height"].to_pylist(), table["width"].to_pylist())
                 if h and w]
    else:
        table = pair_table(source, kind)
        uris = table["image_uri"].to_pylist()
        picks = random.Random(0).sample(range(len(uris)), min(_SIZE_SAMPLE, len(uris)))
        sizes = []
        for i in picks:
            try:
                found = header_size(storage.read_bytes(uris[i])) if uris[i] else None
            except (OSError, ValueError):
                found = None
            if found:
                sizes.append(found[0] * found[1])

    def count(sel: dict[str, Any]) -> int:
        mask = pc.equal(table["split"], sel["split"])
        if "folds" in sel:
            mask = pc.and_(mask, pc.is_in(table["fold"], pa.array(sel["folds"], pa.int32())))
        return int(pc.sum(pc.fill_null(mask, False)).as_py() or 0)

    return (count(train_sel), count(val_sel)), (sum(sizes) / len(sizes) if sizes else 0.0)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare_batch(batch: dict[str, np.ndarray], mask_spec: MaskSpec,
                  preprocessing: Preprocessing | None, *, max_pixels: int | None = None,
                  quarantine_uri: str | None = None, storage_options: dict | None = None,
                  stage: str = "train", pixel_dtype: str | None = None,
                  mask_dtype: str | None = None) -> dict[str, np.ndarray]:
    """Fetched rows -> good rows ``{id, image, mask}``; bad rows go to the quarantine.

    With ``preprocessing`` the image becomes C x H x W: ``compact_pixels`` of ``pixel_dtype``
    when given, else ``prepare_image``'s float32; the mask is resized to match.  Without it
    both stay as decoded.  ``mask_dtype`` stores the masks in that type (see
    :func:`cache_types`).
    """
    limit = max_pixels or (preprocessing.max_pixels if preprocessing else 64_000_000)
    ok, bad = decode_pairs(batch, mask_spec, limit, stage=stage,
                           tiff_page=preprocessing.tiff_page if preprocessing else None)
    digests = {_scalar_id(id_): row_sha256(image, mask) for id_, image, mask in
               zip(batch["id"], batch["image_bytes"], batch["mask_bytes"])}
    ids, images, masks = [], [], []
    for row in ok:
        image, mask = row["image"], row["mask"]
        if preprocessing is not None:
            try:
                image = compact_pixels(image, preprocessing, pixel_dtype) if pixel_dtype \
                    else _prepared(image, preprocessing)
            except InputError as error:
                bad.append(quarantine_row(row, error.with_source(row["image_uri"]), stage))
                continue
            mask = resize_mask_nearest(mask, image.shape[-2:])
        ids.append(row["id"])
        images.append(image)
        masks.append(mask.astype(mask_dtype, copy=False) if mask_dtype else mask)
    if bad and quarantine_uri:
        write_quarantine(bad, quarantine_uri, storage_options)
    return {"id": np.array(ids, dtype=object), "image": _column(images),
            "mask": _column(masks),
            "sha256": np.array([digests[i] for i in ids], dtype=object)}


def _prepared(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """``prepare_image``'s float32 C x H' x W' (a resize is not per-pixel, so it is cached as
    the network's input).  Only this path imports torch into a decode task."""
    from seg_core.inference import prepare_image

    return prepare_image(image, preprocessing).numpy()


def cache_types(pre: Preprocessing, spec: MaskSpec) -> tuple[str | None, str]:
    """How training stores its decoded rows: (pixel dtype, or None for ``prepare_image``'s
    float32 when training resizes; mask dtype).  Pixels stay the integers they were decoded as,
    uint8, or uint16 when ``pre.bit_depth`` declares a high bit depth (an image of the other
    depth is put on that scale, rounded: :func:`seg_core.pixels.compact_pixels`)."""
    pixels = None if pre.resize is not None else ("uint16" if pre.bit_depth else "uint8")
    return pixels, mask_dtype(spec)


def mask_dtype(spec: MaskSpec) -> str:
    """The smallest integer type that holds every class id (or 0/1 label) and ``ignore_index``."""
    low = min(0, spec.ignore_index)
    high = max(1 if spec.multilabel else spec.num_classes - 1, spec.ignore_index)
    for name in ("uint8", "int16", "int32"):
        info = np.iinfo(name)
        if info.min <= low and high <= info.max:
            return name
    return "int64"


def bytes_per_pixel(pre: Preprocessing, spec: MaskSpec) -> tuple[int, int]:
    """(train, val) bytes per pixel as cached: pixels in :func:`cache_types`' types (float32
    when resized) plus the mask; val keeps the decoded pixels (1 byte per channel assumed)."""
    pixels, masks = cache_types(pre, spec)
    mask_bytes = np.dtype(masks).itemsize * (spec.num_classes if spec.multilabel else 1)
    c = pre.channels
    train = c * (np.dtype(pixels).itemsize if pixels else 4) + mask_bytes
    return train, c + mask_bytes


def network_input(images: "torch.Tensor", pre: Preprocessing) -> "torch.Tensor":
    """A training batch as the network takes it: compact pixels normalised where they are (the
    training device), float32 rows (resized, or normalised on the host) as they are."""
    import torch

    from seg_core.inference import normalise_pixels

    return normalise_pixels(images, pre) if images.dtype in (torch.uint8, torch.uint16) \
        else images


def float_if_padded(batch: dict[str, Any], augment: Augment,
                    pre: Preprocessing) -> dict[str, Any]:
    """``batch`` with its compact pixels normalised on the host when the crop will pad one of
    its images: the crop pads with 0, the normalised mean, which no integer pixel means."""
    import torch

    from seg_core.config import as_hw
    from seg_core.inference import normalise_pixels

    images = batch["image"]
    if not augment.crop_size or not len(images) or \
            np.asarray(images[0]).dtype not in (np.uint8, np.uint16):
        return batch
    crop_h, crop_w = as_hw(augment.crop_size, "crop_size")
    if all(np.shape(i)[-2] >= crop_h and np.shape(i)[-1] >= crop_w for i in images):
        return batch
    floats = [normalise_pixels(torch.from_numpy(np.array(i)), pre).numpy()
              for i in images]
    return {**batch, "image": _column(floats)}


def _scalar_id(value: Any) -> str:
    return str(value.item() if isinstance(value, np.generic) else value)


def class_pixel_counts(dataset: "ray.data.Dataset", mask_spec: MaskSpec
                       ) -> tuple[np.ndarray, int, str]:
    """``(pixels per class, labelled pixels, content hash)`` over every row of ``dataset``.

    Ignored pixels count nowhere.  Multi-label masks count the pixels where each class is on;
    labelled pixels are those not ignored (per image, as the ignore mask spans every class).
    The content hash combines each row's ``sha256`` (of the bytes ingest read, see
    :func:`row_sha256`) in id order: the same pairs give the same hash whatever the file
    layout, and one changed byte changes it.  One Ray Data pass; cheap on a materialised set.
    """
    k = mask_spec.num_classes
    counted = dataset.map_batches(_count_classes, batch_format="numpy", num_cpus=TASK_CPUS,
                                  fn_kwargs={"mask_spec": mask_spec})
    total = np.zeros(k + 1, np.int64)
    rows: list[str] = []
    for batch in counted.iter_batches(batch_format="numpy", batch_size=None):
        total += np.asarray(np.stack(batch["class_pixels"]), np.int64).sum(axis=0)
        rows += [f"{id_}\t{sha}" for id_, sha in zip(batch["id"], batch["sha256"])]
    return total[:k], int(total[k]), sha256_hex("\n".join(sorted(rows)).encode())


def row_sha256(image_bytes: bytes | None, mask_bytes: bytes | None) -> str:
    """One training row's content hash: SHA-256 over the image's and the mask's SHA-256."""
    parts = [hashlib.sha256(b or b"").digest() for b in (image_bytes, mask_bytes)]
    return hashlib.sha256(b"".join(parts)).hexdigest()


def mask_class_pixels(masks: Any, mask_spec: MaskSpec) -> np.ndarray:
    """K class pixel counts, then the labelled (not ignored) pixel count, over ``masks`` (one
    mask, a stacked batch or an object array of masks).  Multi-label: pixels where each class is
    on, and labelled pixels per image (the ignore mask spans every class)."""
    k = mask_spec.num_classes
    total = np.zeros(k + 1, np.int64)
    single = isinstance(masks, np.ndarray) and masks.dtype != object and \
        masks.ndim == (3 if mask_spec.multilabel else 2)
    for mask in ([masks] if single else masks):
        mask = np.asarray(mask)
        if mask_spec.multilabel:  # [N x] K x H x W; ignore_index marks skipped pixel-channels
            planes = mask.reshape(-1, k, *mask.shape[-2:])
            total[:k] += (planes == 1).sum(axis=(0, 2, 3))
            total[k] += int((planes[:, 0] != mask_spec.ignore_index).sum())
        else:
            labelled = mask[(mask >= 0) & (mask < k)].ravel().astype(np.int64)
            total[:k] += np.bincount(labelled, minlength=k)[:k]
            total[k] += labelled.size
    return total


def _count_classes(batch: dict[str, np.ndarray], mask_spec: MaskSpec) -> dict[str, np.ndarray]:
    """Per row: K class pixel counts, then the number of labelled (not ignored) pixels; the
    row's id and content hash pass through."""
    k = mask_spec.num_classes
    counts = [mask_class_pixels(np.asarray(mask), mask_spec) for mask in batch["mask"]]
    return {"class_pixels": np.stack(counts).astype(np.int64) if counts
            else np.zeros((0, k + 1), np.int64), "id": batch["id"], "sha256": batch["sha256"]}


def write_quarantine(rows: list[dict[str, Any]], quarantine_uri: str,
                     storage_options: storage.StorageOptions | None = None) -> str:
    """Write quarantine rows to ``<quarantine_uri>/part-<hash of ids>.parquet``; returns its URI."""
    digest = hashlib.sha1("\n".join(str(r["id"]) for r in rows).encode()).hexdigest()[:16]
    uri = storage.join_uri(quarantine_uri, f"part-{digest}.parquet")
    table = pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)
    return storage.write_table(table, uri, storage_options)


def shuffled_batches(blocks: Iterable[dict[str, np.ndarray]], batch_size: int, buffer_rows: int,
                     rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """The rows of ``blocks`` (column -> array batches, as ``iter_batches`` yields them) regrouped
    into batches of ``batch_size`` drawn at random from a buffer of more than ``buffer_rows``
    rows, then the buffer drained at random (the last batch may be short); ``buffer_rows`` 0
    keeps the order.

    The local shuffle of the training loop.  The buffer holds references to the rows (views into
    the blocks), so a batch copies only its own rows, where Ray Data's
    ``local_shuffle_buffer_size`` copies its buffer as it refills: with images of a megapixel
    that cost 15% of the steady images/s on the 2-core box (issue 30).
    """
    columns: list[str] = []
    buffer: list[tuple[Any, ...]] = []
    for block in blocks:
        columns = columns or list(block)
        buffer.extend(zip(*(block[name] for name in columns)))
        while len(buffer) > buffer_rows and len(buffer) >= batch_size:
            yield _draw(buffer, columns, batch_size, rng, in_order=buffer_rows == 0)
    while buffer:
        yield _draw(buffer, columns, min(batch_size, len(buffer)), rng,
                    in_order=buffer_rows == 0)


def _draw(buffer: list[tuple[Any, ...]], columns: list[str], n: int, rng: np.random.Generator,
          *, in_order: bool) -> dict[str, np.ndarray]:
    """Take ``n`` rows out of ``buffer`` (the first ``n``, or ``n`` at random) as one batch."""
    if in_order:
        rows = buffer[:n]
        del buffer[:n]
    else:
        picks = rng.choice(len(buffer), size=n, replace=False)
        rows = [buffer[i] for i in picks]
        for i in sorted(picks.tolist(), reverse=True):   # swap with the last row, drop it
            buffer[i] = buffer[-1]
            buffer.pop()
    return {name: _column([row[k] for row in rows]) for k, name in enumerate(columns)}


def _column(arrays: list[Any]) -> np.ndarray:
    """One stacked array when shapes agree, else an object array (Ray: variable-shaped tensors);
    scalars (ids, digests) as one array of them."""
    if arrays and not isinstance(arrays[0], np.ndarray):
        return np.array(arrays, dtype=object)
    if arrays and len({(a.shape, a.dtype) for a in arrays}) == 1:
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):   # element-wise: slice assignment would broadcast
        column[i] = array
    return column


class EpochPrefetch:
    """The blocks of successive epochs, read by a thread that starts the next epoch as soon as
    this one's last block is in.

    ``open_epoch()`` gives one epoch's blocks (column -> array batches: a Ray Data shard's
    ``iter_batches``, called once per epoch).  :meth:`epoch` yields the next epoch's blocks in
    order.  Without the thread, a streamed epoch began by waiting while its first blocks were
    decoded: until :func:`shuffled_batches` held more than its buffer, which on a set smaller
    than the buffer is the whole epoch (a quarter of a streamed epoch on the 2-core box,
    issue 30).  Now that decode runs while the previous epoch's last steps train.

    The thread stays at most ``ahead_rows`` rows and ``ahead_bytes`` bytes ahead of the reader,
    and always one block; it opens at most ``epochs`` epochs.  An epoch the reader leaves
    unfinished (a fixed number of steps per epoch) has its remaining blocks dropped.  An error
    in the thread is raised in the reader.  :meth:`close` stops the thread.
    """

    def __init__(self, open_epoch: Callable[[], Iterable[dict[str, np.ndarray]]], *,
                 ahead_rows: int, ahead_bytes: int = 256 << 20, epochs: int | None = None
                 ) -> None:
        self._open = open_epoch
        self._ahead_rows, self._ahead_bytes, self._epochs = ahead_rows, ahead_bytes, epochs
        self._ready = threading.Condition()
        self._items: deque[tuple[int, dict[str, np.ndarray] | None, int, int]] = deque()
        self._rows = self._bytes = 0   # what the queue holds
        self._error: BaseException | None = None
        self._closed = False
        self._next = 0   # the epoch the reader asks for next
        self._thread: threading.Thread | None = None

    def epoch(self) -> Iterator[dict[str, np.ndarray]]:
        """The next epoch's blocks."""
        epoch, self._next = self._next, self._next + 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, name="epoch-prefetch",
                                            daemon=True)
            self._thread.start()
        while True:
            with self._ready:
                while not self._items and self._error is None:
                    self._ready.wait()
                if not self._items:
                    raise self._error   # type: ignore[misc]  # the thread's own error
                of, block, rows, size = self._items.popleft()
                self._rows, self._bytes = self._rows - rows, self._bytes - size
                self._ready.notify_all()
            if of < epoch:
                continue   # the rest of an epoch the reader left
            if block is None:
                return
            yield block

    def close(self) -> None:
        """Stop reading ahead (the thread ends at its next block)."""
        with self._ready:
            self._closed = True
            self._items.clear()
            self._ready.notify_all()

    def _read(self) -> None:
        epoch = 0
        try:
            while not self._closed and (self._epochs is None or epoch < self._epochs):
                blocks = self._open()
                for block in blocks:
                    if not self._put(epoch, block):
                        getattr(blocks, "close", lambda: None)()
                        return
                if not self._put(epoch, None):
                    return
                epoch += 1
        except BaseException as error:   # handed to the reader, raised there
            with self._ready:
                self._error = error
                self._ready.notify_all()
            return
        with self._ready:   # no more epochs: a reader asking for one gets an error, not a hang
            self._error = RuntimeError(f"EpochPrefetch: only {self._epochs} epoch(s) to read")
            self._ready.notify_all()

    def _put(self, epoch: int, block: dict[str, np.ndarray] | None) -> bool:
        rows = size = 0
        if block is not None:
            columns = list(block.values())
            rows = len(columns[0]) if columns else 0
            size = sum(_nbytes(column) for column in columns)
        with self._ready:
            while not self._closed and self._items and (
                    self._rows >= self._ahead_rows or self._bytes >= self._ahead_bytes):
                self._ready.wait()
            if self._closed:
                return False
            self._items.append((epoch, block, rows, size))
            self._rows, self._bytes = self._rows + rows, self._bytes + size
            self._ready.notify_all()
        return True


def _nbytes(column: np.ndarray) -> int:
    """Bytes of a block's column, an object column's arrays included."""
    if column.dtype == object:
        return sum(getattr(value, "nbytes", 0) for value in column)
    return column.nbytes
