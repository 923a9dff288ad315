"""Training input: decode and deterministic preprocessing in Ray Data, random augmentation per batch.

- :func:`training_dataset`: rows ``{id, image, mask}`` with ``image`` the float32 C x H x W tensor
  from ``seg_core.inference.prepare_image`` (exactly what inference feeds the model) and ``mask``
  resized to match with nearest-neighbour (int64 H x W, or uint8 K x H x W for multi-label).
  Streaming and bounded: nothing is materialised; a seed fixes the pair order.
- :class:`Augment`: random crop / flips / rot90 from ``seg_core.transforms``, applied by the
  training loop to each batch with a generator from ``augment.rng(epoch, rank)``, so the
  augmentation differs per epoch and stays reproducible.
- :func:`decoded_dataset`: decoded rows ``{id, image (H x W x C raw), mask}`` for validation,
  which runs the full-resolution ``Segmenter`` path.

Bad pairs never crash the pipeline: they are dropped from the dataset and, when
``quarantine_uri`` is given, each task writes them to ``<quarantine_uri>/part-<hash>.parquet``
(named by the batch's ids, so a re-executed task overwrites rather than duplicates).

CPU shares (notes §3.2): decode tasks ask for ``num_cpus=0.5`` by default, so Ray Data can keep
running beside Train workers that reserve fractional CPUs on a 2-core machine.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.ingest import SourceKind, decode_pairs, quarantine_row, read_pairs
from seg_core.config import MaskSpec, Preprocessing, as_hw
from seg_core.errors import InputError

if TYPE_CHECKING:
    import ray.data


@dataclass(frozen=True)
class Augment:
    """Per-batch paired augmentation of preprocessed C x H x W images and their masks.

    ``crop_size`` (a side, or ``(H, W)``) crops a random window (padding with 0 = the normalised mean, and the mask with
    ``ignore_index``); without it, images in a batch must already share one size.  ``rot90`` only
    applies to square inputs, so a batch keeps one shape.
    """

    crop_size: int | tuple[int, int] | None = None
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    ignore_index: int = 255
    seed: int = 0

    def rng(self, epoch: int, rank: int = 0) -> np.random.Generator:
        """The generator for one epoch on one worker: new per epoch, fixed by the seed."""
        return np.random.default_rng([self.seed, epoch, rank])

    def __call__(self, batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Augment every row of a numpy batch; returns stacked ``image`` N,C,h,w and ``mask``."""
        from seg_core import transforms as T

        steps: list[Any] = []
        if self.crop_size:
            steps.append(T.RandomCrop(as_hw(self.crop_size, "crop_size"), fill=0.0,
                                      ignore_index=self.ignore_index))
        if self.hflip:
            steps.append(T.HorizontalFlip(0.5))
        if self.vflip:
            steps.append(T.VerticalFlip(0.5))
        images, masks = [], []
        for image, mask in zip(batch["image"], batch["mask"]):
            hwc = np.moveaxis(np.asarray(image), 0, -1)  # C,H,W -> H,W,C (transforms' layout)
            hwc, mask = T.Compose(steps)(hwc, np.asarray(mask), rng)
            if self.rot90 and hwc.shape[0] == hwc.shape[1]:
                hwc, mask = T.RandomRot90()(hwc, mask, rng)
            images.append(np.ascontiguousarray(np.moveaxis(hwc, -1, 0)))
            masks.append(mask)
        shapes = {i.shape for i in images}
        if len(shapes) > 1:
            raise ValueError(f"Augment: batch images differ in size {sorted(shapes)}; set "
                             f"crop_size or preprocessing.resize so that a batch stacks")
        return {**batch, "image": np.stack(images), "mask": np.stack(masks)}


@dataclass(frozen=True)
class TrainingData:
    """A streaming dataset of preprocessed rows and the augmentation the loop applies per batch."""

    dataset: "ray.data.Dataset"
    augment: Augment


def training_dataset(source: str, mask_spec: MaskSpec, preprocessing: Preprocessing, *,
                     crop_size: int | tuple[int, int] | None = None, seed: int = 0, split: str | None = None,
                     folds: Sequence[int] | None = None, hflip: bool = True, vflip: bool = True,
                     rot90: bool = True, kind: SourceKind = "auto",
                     quarantine_uri: str | None = None, num_cpus: float = 0.5,
                     rows_per_block: int = 16,
                     storage_options: storage.StorageOptions | None = None) -> TrainingData:
    """Rows of ``split`` / ``folds`` from ``source``, decoded and preprocessed, in seeded order."""
    rows = read_pairs(source, kind=kind, split=split, folds=folds, shuffle_seed=seed,
                      rows_per_block=rows_per_block, storage_options=storage_options)
    dataset = rows.map_batches(
        prepare_batch, batch_format="numpy", num_cpus=num_cpus,
        fn_kwargs={"mask_spec": mask_spec, "preprocessing": preprocessing,
                   "quarantine_uri": quarantine_uri,
                   "storage_options": storage.resolve_options(storage_options)})
    augment = Augment(crop_size=crop_size, hflip=hflip, vflip=vflip, rot90=rot90,
                      ignore_index=mask_spec.ignore_index, seed=seed)
    return TrainingData(dataset=dataset, augment=augment)


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
                   "quarantine_uri": quarantine_uri,
                   "storage_options": storage.resolve_options(storage_options)})


def prepare_batch(batch: dict[str, np.ndarray], mask_spec: MaskSpec,
                  preprocessing: Preprocessing | None, *, max_pixels: int | None = None,
                  quarantine_uri: str | None = None, storage_options: dict | None = None,
                  stage: str = "train") -> dict[str, np.ndarray]:
    """Fetched rows -> good rows ``{id, image, mask}``; bad rows go to the quarantine.

    With ``preprocessing`` the image becomes ``prepare_image``'s float32 C x H x W and the mask is
    resized to match; without it both stay as decoded.
    """
    limit = max_pixels or (preprocessing.max_pixels if preprocessing else 64_000_000)
    ok, bad = decode_pairs(batch, mask_spec, limit, stage=stage)
    ids, images, masks = [], [], []
    for row in ok:
        image, mask = row["image"], row["mask"]
        if preprocessing is not None:
            from seg_core.inference import prepare_image   # torch: only when preprocessing

            try:
                image = prepare_image(image, preprocessing).numpy()  # C x H' x W'
            except InputError as error:
                bad.append(quarantine_row(row, error.with_source(row["image_uri"]), stage))
                continue
            mask = resize_mask_nearest(mask, image.shape[-2:])
        ids.append(row["id"])
        images.append(image)
        masks.append(mask)
    if bad and quarantine_uri:
        write_quarantine(bad, quarantine_uri, storage_options)
    return {"id": np.array(ids, dtype=object), "image": _column(images),
            "mask": _column(masks)}


def class_pixel_counts(dataset: "ray.data.Dataset", mask_spec: MaskSpec
                       ) -> tuple[np.ndarray, int]:
    """``(pixels per class, labelled pixels)`` over every mask of ``dataset``: K int64 and int.

    Ignored pixels count nowhere.  Multi-label masks count the pixels where each class is on;
    labelled pixels are those not ignored (per image, as the ignore mask spans every class).
    One Ray Data pass; cheap on a materialised training set.
    """
    k = mask_spec.num_classes
    counted = dataset.map_batches(_count_classes, batch_format="numpy", num_cpus=0.25,
                                  fn_kwargs={"mask_spec": mask_spec})
    total = np.zeros(k + 1, np.int64)
    for batch in counted.iter_batches(batch_format="numpy", batch_size=None):
        total += np.asarray(np.stack(batch["class_pixels"]), np.int64).sum(axis=0)
    return total[:k], int(total[k])


def _count_classes(batch: dict[str, np.ndarray], mask_spec: MaskSpec) -> dict[str, np.ndarray]:
    """Per row: K class pixel counts, then the number of labelled (not ignored) pixels."""
    k, counts = mask_spec.num_classes, []
    for mask in batch["mask"]:
        mask = np.asarray(mask)
        if mask_spec.multilabel:  # K x H x W; ignore_index marks skipped pixel-channels
            on = (mask == 1).reshape(k, -1).sum(axis=1)
            counts.append(np.append(on, (mask[0] != mask_spec.ignore_index).sum()))
        else:
            labelled = mask[(mask >= 0) & (mask < k)].ravel().astype(np.int64)
            counts.append(np.append(np.bincount(labelled, minlength=k)[:k], labelled.size))
    return {"class_pixels": np.stack(counts).astype(np.int64) if counts
            else np.zeros((0, k + 1), np.int64)}


def write_quarantine(rows: list[dict[str, Any]], quarantine_uri: str,
                     storage_options: storage.StorageOptions | None = None) -> str:
    """Write quarantine rows to ``<quarantine_uri>/part-<hash of ids>.parquet``; returns its URI."""
    digest = hashlib.sha1("\n".join(str(r["id"]) for r in rows).encode()).hexdigest()[:16]
    uri = storage.join_uri(quarantine_uri, f"part-{digest}.parquet")
    table = pa.Table.from_pylist(rows, schema=storage.QUARANTINE_SCHEMA)
    return storage.write_table(table, uri, storage_options)


def resize_mask_nearest(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of H x W or K x H x W to ``size`` (pixel centres, as transforms)."""
    height, width = int(size[0]), int(size[1])
    if mask.shape[-2:] == (height, width):
        return mask
    rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[-2] / height).astype(np.int64),
                      mask.shape[-2] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[-1] / width).astype(np.int64),
                      mask.shape[-1] - 1)
    return np.ascontiguousarray(np.take(np.take(mask, rows, axis=-2), cols, axis=-1))


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """One stacked array when shapes agree, else an object array (Ray: variable-shaped tensors)."""
    if arrays and len({(a.shape, a.dtype) for a in arrays}) == 1:
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):   # element-wise: slice assignment would broadcast
        column[i] = array
    return column
