"""Image/mask pairs from object storage into Ray Data, and the decode step that splits off bad rows.

Three sources give the same rows (:data:`records.ROW_SCHEMA`: ``id, image_uri, mask_uri, split,
fold, refused, image_bytes, mask_bytes``); a default id is the image's path under the source's
root, so a manifest and a prefix of the same folder agree:

- a **manifest** (CSV or Parquet) with ``image`` and ``mask`` columns and optional ``id``, ``split``,
  ``fold``.  Relative paths resolve against the manifest's own location.  A mask cell may hold
  several ``;``-joined files (one binary mask per class, multi-label).
- a **prefix** holding ``images/`` and ``masks/``, paired by path stem (``images/a/x.jpg`` with
  ``masks/a/x.png``).  An unpaired image becomes a row without mask (quarantined as missing_mask).
- **shards** written by :func:`pipelines.pack.pack` (Parquet, :data:`records.SHARD_SCHEMA`).

Manifests and listings are metadata, parsed on the driver; the bytes are fetched inside Ray tasks
(I/O threads per task), so the dataset itself never passes through the driver.  A missing file
gives null bytes, and a path the policy refuses (:func:`path_refusal`: out of the manifest's
directory, a local file named by a remote manifest, /proc ...) or a file that is not regular or
too big (:func:`read_limited`) sets ``refused``; the decode step turns both into quarantine rows:
bad input never crashes a job, and nothing refused is read.
"""
from __future__ import annotations

import io
import os
import posixpath
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipelines import storage
from pipelines.records import PAIR_SCHEMA, ROW_SCHEMA, quarantine_row, refusal, refusal_json
from seg_core.codecs import (DEFAULT_MAX_PIXELS, IGNORE_PART, decode_image, decode_mask,
                             pack_mask_parts)
from seg_core.config import MaskSpec
from seg_core.errors import InputError

if TYPE_CHECKING:
    import ray.data

SourceKind = Literal["auto", "manifest", "prefix", "shards"]

MASK_SEPARATOR = ";"
IGNORE_PREFIX = "ignore="  # a multi-label mask part naming a binary ignore mask
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
_FETCH_THREADS = 16
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"   # how Ray writes a null partition value (pack)
DEFAULT_MAX_BYTES = 4 * DEFAULT_MAX_PIXELS    # per object read: 256 MiB at the 64 Mpx guard
_SPECIAL_ROOTS = ("/proc", "/dev", "/sys", "/run")   # never image files, sometimes secrets
ALLOWED_ROOTS_ENV = "RAYSEG_ALLOWED_ROOTS"   # prefixes a manifest may reach outside its dir


# ------------------------------------------------------------------------------ path policy


def path_refusal(raw: str, resolved: str, manifest_dir: str,
                 allowed_roots: Sequence[str] = ()) -> InputError | None:
    """Why the manifest cell ``raw`` (resolved to ``resolved``) may not be read, or None.

    - a relative path stays inside the manifest's directory (no ``../`` out of it);
    - a manifest in object storage names no local file (absolute path or ``file://``);
    - nothing under ``/proc``, ``/dev``, ``/sys`` or ``/run``.
    ``allowed_roots`` (URI prefixes; default: the comma-separated ``RAYSEG_ALLOWED_ROOTS``)
    lifts the first two rules for paths under them.
    """
    def refuse(why: str) -> InputError:
        return InputError("path_refused", why, source=resolved,
                          hint=f"keep data under the manifest's directory, or allow its root "
                               f"explicitly: {ALLOWED_ROOTS_ENV}=<prefix>[,<prefix>...]")

    local = storage.is_local(resolved)
    path = storage.strip_scheme(resolved) if local else ""
    if local and any(path == root or path.startswith(root + "/") for root in _SPECIAL_ROOTS):
        return refuse(f"{path} is a system path, not a data file")
    roots = allowed_roots or [r for r in os.environ.get(ALLOWED_ROOTS_ENV, "").split(",") if r]
    if any(resolved == root.rstrip("/") or resolved.startswith(root.rstrip("/") + "/")
           for root in map(storage.as_uri, roots)):
        return None
    if local and not storage.is_local(manifest_dir):
        return refuse(f"a manifest in object storage ({manifest_dir}) names the local file "
                      f"{path}")
    relative = "://" not in raw and not raw.startswith("/")
    root = manifest_dir.rstrip("/") + "/"
    if relative and not resolved.startswith(root):
        return refuse(f"the relative path {raw!r} leaves the manifest's directory "
                      f"{manifest_dir}")
    return None


def read_limited(uri: str, storage_options: storage.StorageOptions | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> bytes | None:
    """The bytes of a regular file or object of at most ``max_bytes``; None when missing.

    Raises :class:`InputError` (``not_a_file``, ``too_large``) for a FIFO, device, directory or
    an object over the limit: a manifest row naming ``/dev/zero`` or a 30 GB object costs one
    metadata call, not the task's memory.
    """
    fs, path = storage.filesystem_for(uri, storage_options)
    if storage.is_local(uri):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(mode):
            raise InputError("not_a_file", "not a regular file (a directory, device, pipe or "
                             "socket)", source=uri, hint="point the manifest at image files")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.File:
        raise InputError("not_a_file", "not a file or object", source=uri,
                         hint="point the manifest at image files")
    limit = _too_large(uri, info.size, max_bytes)
    if limit:
        raise limit
    with fs.open_input_stream(path) as stream:
        data = stream.read(max_bytes + 1)      # the object may have grown since the listing
    if len(data) > max_bytes:
        raise _too_large(uri, len(data), max_bytes)
    return data


def _too_large(uri: str, size: int | None, max_bytes: int) -> InputError | None:
    if size is None or size <= max_bytes:
        return None
    return InputError("too_large", f"{size / 2**20:.1f} MiB is over the {max_bytes / 2**20:.0f} "
                      f"MiB limit per file", source=uri,
                      hint="raise max_bytes (and max_pixels) if such files are expected, or "
                           "tile the image before ingest")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding pixels; None if unreadable."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


# ------------------------------------------------------------------------------ pair metadata


def detect_kind(source: str, storage_options: storage.StorageOptions | None = None) -> SourceKind:
    """Guess the source kind: ``.csv`` / ``.parquet`` manifest, shard directory, or prefix."""
    lowered = source.lower().rstrip("/")
    if lowered.endswith((".csv", ".tsv")):
        return "manifest"
    if lowered.endswith(".parquet"):
        import pyarrow.parquet as pq

        with storage.open_uri(source, storage_options) as handle:
            names = pq.read_schema(handle).names
        return "shards" if "image_bytes" in names else "manifest"
    if storage.exists(storage.join_uri(source, "images"), storage_options):
        return "prefix"
    if storage.list_uri(source, suffixes=(".parquet",), storage_options=storage_options):
        return "shards"
    raise ValueError(
        f"{source}: expected a manifest (.csv/.parquet), a prefix with images/ and masks/, or a "
        f"directory of Parquet shards from `rayseg pack`; found none of these"
    )


def read_manifest(uri: str, storage_options: storage.StorageOptions | None = None, *,
                  allowed_roots: Sequence[str] = ()) -> pa.Table:
    """Parse a CSV/Parquet manifest into :data:`PAIR_SCHEMA` with absolute URIs.

    Rows whose paths break the :func:`path_refusal` policy keep their URIs (for the report) and
    get ``refused`` set: they are quarantined when fetched, never read.
    """
    if uri.lower().endswith(".parquet"):
        raw = storage.read_table(uri, storage_options)
    else:
        import pyarrow.csv as pcsv

        delimiter = "\t" if uri.lower().endswith(".tsv") else ","
        raw = pcsv.read_csv(io.BytesIO(storage.read_bytes(uri, storage_options)),
                            parse_options=pcsv.ParseOptions(delimiter=delimiter),
                            convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    names = set(raw.schema.names)
    image_col = next((c for c in ("image", "image_uri", "image_path") if c in names), None)
    mask_col = next((c for c in ("mask", "mask_uri", "mask_path") if c in names), None)
    if image_col is None or mask_col is None:
        raise ValueError(f"{uri}: manifest needs 'image' and 'mask' columns, got {sorted(names)}")
    base = storage.parent_uri(uri)
    raw_images, raw_masks = _strings(raw[image_col]), _strings(raw[mask_col])
    images = [_resolve(base, v) for v in raw_images]
    masks = [_resolve(base, v) for v in raw_masks]
    ids = _strings(raw["id"]) if "id" in names else _default_ids(images, base)
    splits = _strings(raw["split"]) if "split" in names else [None] * len(images)
    folds = _folds(raw["fold"], uri) if "fold" in names else [None] * len(images)
    refused = [_row_refusal(raw_cells, base, allowed_roots)
               for raw_cells in zip(raw_images, raw_masks)]
    return pa.table([ids, images, masks, splits, folds, refused], schema=PAIR_SCHEMA)


def _row_refusal(cells: tuple[str | None, str | None], base: str,
                 allowed_roots: Sequence[str]) -> str | None:
    """The ``refused`` cell of one manifest row: its first path that breaks the policy."""
    for cell in cells:
        for part in (p.strip() for p in (cell or "").split(MASK_SEPARATOR) if p.strip()):
            raw_part = part.removeprefix(IGNORE_PREFIX)
            error = path_refusal(raw_part, storage.resolve_against(base, raw_part), base,
                                 allowed_roots)
            if error is not None:
                return refusal_json(error)
    return None


def list_prefix_pairs(uri: str, storage_options: storage.StorageOptions | None = None) -> pa.Table:
    """Pair ``<uri>/images/**`` with ``<uri>/masks/**`` by relative path without extension."""
    def by_stem(sub: str) -> dict[str, str]:
        root = storage.join_uri(uri, sub)
        found: dict[str, str] = {}
        for file_uri in storage.list_uri(root, suffixes=IMAGE_SUFFIXES,
                                         storage_options=storage_options):
            found.setdefault(posixpath.splitext(file_uri[len(root) + 1:])[0], file_uri)
        return found

    images, masks = by_stem("images"), by_stem("masks")
    stems = sorted(set(images) | set(masks))
    root = uri.rstrip("/") + "/"
    ids = [(images.get(s) or masks[s])[len(root):] for s in stems]   # as a manifest there would
    rows = [ids, [images.get(s) for s in stems], [masks.get(s) for s in stems],
            [None] * len(stems), [None] * len(stems), [None] * len(stems)]
    return pa.table(rows, schema=PAIR_SCHEMA)


def pair_table(source: str, kind: SourceKind = "auto",
               storage_options: storage.StorageOptions | None = None) -> pa.Table:
    """Pair metadata of a manifest or prefix source (shards carry their bytes: use read_pairs)."""
    kind = detect_kind(source, storage_options) if kind == "auto" else kind
    if kind == "manifest":
        return read_manifest(source, storage_options)
    if kind == "prefix":
        return list_prefix_pairs(source, storage_options)
    raise ValueError(f"pair_table: kind must be 'manifest' or 'prefix', got {kind!r}")


def select_rows(table: pa.Table, *, split: str | None = None,
                folds: Sequence[int] | None = None) -> pa.Table:
    """Rows of ``split`` (if given) whose fold is in ``folds`` (if given)."""
    import pyarrow.compute as pc

    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    if folds is not None:
        table = table.filter(pc.is_in(table["fold"], pa.array(list(folds), pa.int32())))
    return table


def _strings(column: pa.ChunkedArray) -> list[str | None]:
    values = column.cast(pa.string()).to_pylist()
    return [None if v is None or not v.strip() else v.strip() for v in values]


def _folds(column: pa.ChunkedArray, uri: str) -> list[int | None]:
    values = _strings(column)
    try:
        return [None if v is None else int(float(v)) for v in values]
    except ValueError as error:
        raise ValueError(f"{uri}: fold column must hold integers (or be empty), got "
                         f"{sorted({v for v in values if v is not None})[:5]}") from error


def _resolve(base: str, value: str | None) -> str | None:
    if value is None:
        return None
    return resolve_mask_parts(base, value) or None


def resolve_mask_parts(base: str, value: str) -> str:
    """Each ``;``-separated part resolved against ``base``; an ``ignore=`` prefix is kept."""
    resolved = []
    for part in (p.strip() for p in value.split(MASK_SEPARATOR)):
        if part:
            prefix = IGNORE_PREFIX if part.startswith(IGNORE_PREFIX) else ""
            resolved.append(prefix + storage.resolve_against(base, part[len(prefix):]))
    return MASK_SEPARATOR.join(resolved)


def mask_part_uris(value: str | None) -> list[str]:
    """The file URIs of a (resolved) mask value, ``ignore=`` prefixes removed."""
    parts = [p.strip() for p in (value or "").split(MASK_SEPARATOR) if p.strip()]
    return [p.removeprefix(IGNORE_PREFIX) for p in parts]


def _default_ids(images: list[str | None], base: str) -> list[str]:
    """Each image's path relative to the manifest's directory (``images/a.png``); the full URI
    for an image outside it.

    An id depends on the image's own path only, never on its row or on the other rows: adding or
    reordering rows keeps every id, so a resumed predict skips exactly the images it did.
    """
    root = base.rstrip("/") + "/"
    return [(u[len(root):] if u.startswith(root) else u) if u else "" for u in images]


# -------------------------------------------------------------------------------- reading bytes


def read_pairs(source: str, *, kind: SourceKind = "auto", split: str | None = None,
               folds: Sequence[int] | None = None, shuffle_seed: int | None = None,
               rows_per_block: int = 32, num_cpus: float = 0.25,
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


def fetch_pairs(table: pa.Table, *, rows_per_block: int = 32, num_cpus: float = 0.25,
                storage_options: storage.StorageOptions | None = None) -> "ray.data.Dataset":
    """Pair metadata (:data:`PAIR_SCHEMA`, e.g. a filtered :func:`pair_table`) -> fetched rows.

    The table is cut into blocks of ``rows_per_block`` rows on the driver (metadata only); each
    block's objects are read by one Ray task with I/O threads.  Null URIs give null bytes.
    """
    import ray

    step = max(1, rows_per_block)
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]
    options = storage.resolve_options(storage_options)   # driver's endpoint, shipped to tasks
    return ray.data.from_arrow(blocks).map_batches(
        fetch_bytes, batch_format="pyarrow", batch_size=None, num_cpus=num_cpus,
        fn_kwargs={"storage_options": options}, udf_modifying_row_count=False)


def read_shards(uri: str, *, split: str | None = None, folds: Sequence[int] | None = None,
                shuffle_seed: int | None = None, num_cpus: float = 0.25,
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


def list_images(prefix: str, storage_options: storage.StorageOptions | None = None) -> pa.Table:
    """:data:`PAIR_SCHEMA` rows for a bare prefix of images (no masks): id = path under it."""
    root = prefix.rstrip("/")
    uris = storage.list_uri(root, suffixes=IMAGE_SUFFIXES, storage_options=storage_options)
    ids = [u[len(root) + 1:] for u in uris]
    nulls = [None] * len(uris)
    return pa.table([ids, uris, nulls, nulls, nulls, nulls], schema=PAIR_SCHEMA)


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


# ------------------------------------------------------------------------------------- decoding


def decode_pair(image_bytes: bytes | None, mask_bytes: bytes | None, spec: MaskSpec, *,
                image_uri: str | None = None, mask_uri: str | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, refused: str | None = None,
                tiff_page: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode and cross-check one pair -> (H x W x C image, H x W or K x H x W mask).

    Raises :class:`InputError` for every kind of bad pair (refused path or file, missing file,
    undecodable bytes, lossy mask, unknown label, pixel limit, size mismatch).
    """
    if (error := refusal(refused)) is not None:
        raise error
    image_src, mask_src = image_uri or "<image>", mask_uri or "<mask>"
    if image_bytes is None:
        raise InputError("missing_image", "no image file for this mask", source=image_src,
                         hint="check the image path, or remove the row from the manifest")
    if mask_bytes is None:
        raise InputError("missing_mask", "no mask file for this image", source=mask_src,
                         hint="add the mask (same stem under masks/) or drop the image")
    image = decode_image(image_bytes, source=image_src, max_pixels=max_pixels, tiff_page=tiff_page)
    mask = decode_mask(mask_bytes, spec, source=mask_src, max_pixels=max_pixels)
    if image.shape[:2] != mask.shape[-2:]:
        raise InputError("size_mismatch", f"image is {image.shape[0]}x{image.shape[1]} (HxW), "
                         f"mask is {mask.shape[-2]}x{mask.shape[-1]}", source=mask_src,
                         hint="masks must have exactly the image's height and width")
    return image, mask


def decode_pairs(batch: dict[str, np.ndarray], mask_spec: MaskSpec,
                 max_pixels: int = DEFAULT_MAX_PIXELS, *, stage: str = "decode",
                 tiff_page: int | None = None
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Decode a batch of fetched rows -> ``(ok_rows, quarantine_rows)``; never raises on bad data.

    ``ok_rows`` keep ``id, image_uri, mask_uri, split, fold`` and add ``image`` / ``mask`` arrays;
    ``quarantine_rows`` follow :data:`records.QUARANTINE_SCHEMA`.  ``len(ok) + len(bad)`` always
    equals the batch size.
    """
    ok, bad = [], []
    for i in range(len(batch["id"])):
        row = {k: _scalar(batch[k][i]) for k in PAIR_SCHEMA.names if k in batch}
        try:
            image, mask = decode_pair(_scalar(batch["image_bytes"][i]), _scalar(batch["mask_bytes"][i]),
                                      mask_spec, image_uri=row.get("image_uri"),
                                      mask_uri=row.get("mask_uri"), max_pixels=max_pixels,
                                      refused=row.get("refused"), tiff_page=tiff_page)
        except InputError as error:
            bad.append(quarantine_row(row, error, stage))
            continue
        ok.append({**row, "image": image, "mask": mask})
    return ok, bad


def _scalar(value: Any) -> Any:
    """numpy scalars/None from a numpy batch -> plain Python values."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value
