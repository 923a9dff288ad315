"""The one source parser: manifests (CSV, TSV, Parquet), ``images/`` + ``masks/`` prefixes and pack
shards, as :data:`records.PAIR_SCHEMA` pair tables, metadata only, on the driver."""
from __future__ import annotations

import io
import posixpath
from typing import Sequence

import pyarrow as pa

from pipelines import storage
from pipelines.ingest.policy import (
    IGNORE_PREFIX,
    IMAGE_SUFFIXES,
    MASK_SEPARATOR,
    path_refusal,
    SourceKind,
)
from pipelines.records import PAIR_SCHEMA, refusal_json


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


def read_manifest_table(uri: str, storage_options: storage.StorageOptions | None = None
                        ) -> pa.Table:
    """A manifest's columns as written: Parquet, CSV, or TSV (by extension)."""
    if uri.lower().endswith(".parquet"):
        return storage.read_table(uri, storage_options)
    import pyarrow.csv as pcsv

    delimiter = "\t" if uri.lower().endswith(".tsv") else ","
    return pcsv.read_csv(io.BytesIO(storage.read_bytes(uri, storage_options)),
                         parse_options=pcsv.ParseOptions(delimiter=delimiter),
                         convert_options=pcsv.ConvertOptions(strings_can_be_null=True))


def read_manifest(uri: str, storage_options: storage.StorageOptions | None = None, *,
                  allowed_roots: Sequence[str] = ()) -> pa.Table:
    """Parse a CSV/Parquet manifest into :data:`PAIR_SCHEMA` with absolute URIs.

    Rows whose paths break the :func:`path_refusal` policy keep their URIs (for the report) and
    get ``refused`` set: they are quarantined when fetched, never read.
    """
    raw = read_manifest_table(uri, storage_options)
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


def list_images(prefix: str, storage_options: storage.StorageOptions | None = None) -> pa.Table:
    """:data:`PAIR_SCHEMA` rows for a bare prefix of images (no masks): id = path under it."""
    root = prefix.rstrip("/")
    uris = storage.list_uri(root, suffixes=IMAGE_SUFFIXES, storage_options=storage_options)
    ids = [u[len(root) + 1:] for u in uris]
    nulls = [None] * len(uris)
    return pa.table([ids, uris, nulls, nulls, nulls, nulls], schema=PAIR_SCHEMA)
