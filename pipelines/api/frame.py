"""``Frame``: an H2O-style handle on a table of image/mask rows that never holds pixels.

A Frame is the metadata of a dataset (one row per image: ``id``, ``image``, ``mask``, ``split``,
``fold`` and any other manifest columns) plus where it came from.  Pixels stay in storage and are
only read inside Ray tasks, when a Frame is trained on, predicted or scored.

Three kinds, chosen by :func:`import_file` from the path:

- ``files``: a CSV/Parquet manifest or an ``images/`` + ``masks/`` prefix.  ``image`` and ``mask``
  hold file URIs (relative manifest paths are kept as written and resolved against ``base``).
- ``shards``: Parquet shards from ``rayseg pack``.  ``image`` / ``mask`` are the original source
  URIs; the bytes live in the shards.
- ``predictions``: Parquet written by bulk predict (one mask per row).  Binary columns
  (``mask_png`` ...) are left in storage; :meth:`Frame.mask` decodes one row on demand.

Frames behave like H2OFrames where that makes sense: ``nrow``, ``ncol``, ``columns``, ``head()``,
``split_frame(ratios, seed)``, ``kfold_column(n_folds, seed)``, ``frame["col"]`` and
``frame["fold"] = ...``.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage

if TYPE_CHECKING:
    import pandas

FrameKind = Literal["files", "shards", "predictions", "table"]   # table: a leaderboard

# Shard and prediction columns that hold bytes: never read for metadata.
_SHARD_RENAMES = {"source_uri": "image", "mask_uri": "mask"}
_SERVE_ONLY = ("request_id", "latency_ms")


class Frame:
    """Rows of image/mask metadata; pixels stay in storage.  Build one with :func:`import_file`."""

    def __init__(self, table: pa.Table, *, kind: FrameKind, source: str, base: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        self._table = table
        self.kind: FrameKind = kind
        self.source = source                      # the URI this frame was imported from
        self.base = base                          # relative file paths resolve against this
        self.storage_options = dict(storage_options or {})

    # ------------------------------------------------------------------------------ shape
    @property
    def nrow(self) -> int:
        """Number of rows (images)."""
        return self._table.num_rows

    @property
    def ncol(self) -> int:
        """Number of columns."""
        return self._table.num_columns

    @property
    def shape(self) -> tuple[int, int]:
        """``(nrow, ncol)``."""
        return self.nrow, self.ncol

    @property
    def columns(self) -> list[str]:
        """Column names, in order."""
        return list(self._table.column_names)

    @property
    def names(self) -> list[str]:
        """Alias of :attr:`columns` (H2O spelling)."""
        return self.columns

    def __len__(self) -> int:
        return self.nrow

    # ------------------------------------------------------------------------------ viewing
    def head(self, rows: int = 10) -> "pandas.DataFrame":
        """The first ``rows`` rows as a pandas DataFrame (metadata only, no pixels)."""
        return self._table.slice(0, rows).to_pandas()

    def tail(self, rows: int = 10) -> "pandas.DataFrame":
        """The last ``rows`` rows as a pandas DataFrame."""
        return self._table.slice(max(0, self.nrow - rows)).to_pandas()

    def as_data_frame(self) -> "pandas.DataFrame":
        """All rows as a pandas DataFrame (H2O's name; metadata only)."""
        return self._table.to_pandas()

    def to_arrow(self) -> pa.Table:
        """The metadata table itself."""
        return self._table

    def __repr__(self) -> str:
        text = self.head(5).to_string(max_colwidth=48) if self.nrow else "(no rows)"
        more = f"\n[{self.nrow - 5} more rows]" if self.nrow > 5 else ""
        return (f"<Frame {self.nrow} rows x {self.ncol} cols, {self.kind} from {self.source}>\n"
                f"{text}{more}")

    # ------------------------------------------------------------------------------ columns
    def require(self, *names: str, role: str = "column") -> None:
        """Raise a ValueError naming the existing columns when one of ``names`` is missing."""
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise ValueError(
                f"{role} {missing[0]!r} is not a column of this frame; the columns are "
                f"{self.columns} (frame imported from {self.source})"
            )

    def __getitem__(self, key: str | Sequence[str]) -> "Frame":
        """``frame["split"]`` or ``frame[["id", "image"]]``: a frame with only those columns."""
        names = [key] if isinstance(key, str) else list(key)
        self.require(*names)
        return self._derive(self._table.select(names))

    def __setitem__(self, name: str, values: "Frame | Sequence[Any] | np.ndarray") -> None:
        """Add or replace a column: ``frame["fold"] = frame.kfold_column(5, seed=1)``."""
        if isinstance(values, Frame):
            if values.ncol != 1:
                raise ValueError(f"can only assign a one-column frame, got columns {values.columns}")
            column = values._table.column(0)
        else:
            column = pa.chunked_array([pa.array(np.asarray(values).tolist())])
        if len(column) != self.nrow:
            raise ValueError(f"column {name!r} has {len(column)} values, the frame {self.nrow} rows")
        if name in self.columns:
            self._table = self._table.set_column(self.columns.index(name), name, column)
        else:
            self._table = self._table.append_column(name, column)

    def levels(self, column: str) -> list[Any]:
        """Distinct values of ``column``, sorted (e.g. ``frame.levels("split")``)."""
        self.require(column)
        return sorted(v for v in pc.unique(self._table[column]).to_pylist() if v is not None)

    # ------------------------------------------------------------------------------ rows
    def filter(self, **equals: Any) -> "Frame":
        """Rows whose columns equal the given values: ``frame.filter(split="val")``."""
        self.require(*equals)
        mask = None
        for name, value in equals.items():
            column = self._table[name]
            hit = pc.equal(column, pa.scalar(value, column.type))
            mask = hit if mask is None else pc.and_(mask, hit)
        table = self._table if mask is None else self._table.filter(pc.fill_null(mask, False))
        return self._derive(table)

    def take(self, indices: Sequence[int] | np.ndarray) -> "Frame":
        """Rows at ``indices``, in that order."""
        return self._derive(self._table.take(pa.array(np.asarray(indices, dtype=np.int64))))

    def split_frame(self, ratios: Sequence[float] = (0.75,), seed: int | None = None
                    ) -> list["Frame"]:
        """Random disjoint parts: ``len(ratios) + 1`` frames (the last takes the rest).

        Unlike H2O's per-row coin flips, part sizes are exact (``round(ratio * nrow)``); the
        same ``seed`` always gives the same parts.
        """
        ratios = [float(r) for r in ratios]
        if not ratios or any(r <= 0 for r in ratios) or sum(ratios) >= 1.0 + 1e-9:
            raise ValueError(f"split_frame: ratios must be positive and sum to < 1, got {ratios}")
        order = np.random.default_rng(seed).permutation(self.nrow)
        bounds = np.round(np.cumsum(ratios) * self.nrow).astype(int).tolist()
        parts = np.split(order, bounds)
        return [self.take(np.sort(part)) for part in parts]

    def kfold_column(self, n_folds: int = 3, seed: int | None = None) -> "Frame":
        """A one-column frame ``fold`` with balanced random fold ids ``0..n_folds-1``.

        Assign it as in H2O: ``frame["fold"] = frame.kfold_column(n_folds=5, seed=1)``, then
        train with ``fold_column="fold"``.
        """
        if not 2 <= n_folds <= max(self.nrow, 2):
            raise ValueError(f"kfold_column: n_folds must be in 2..{self.nrow}, got {n_folds}")
        folds = np.empty(self.nrow, dtype=np.int32)
        folds[np.random.default_rng(seed).permutation(self.nrow)] = np.arange(self.nrow) % n_folds
        return self._derive(pa.table({"fold": pa.array(folds, pa.int32())}))

    def rbind(self, other: "Frame") -> "Frame":
        """Rows of ``self`` then ``other`` (same kind, same columns, same base)."""
        if (other.kind, other.base, other.columns) != (self.kind, self.base, self.columns):
            raise ValueError(
                f"rbind: frames differ (kind {self.kind}/{other.kind}, columns {self.columns} / "
                f"{other.columns}); import both from the same source")
        return self._derive(pa.concat_tables([self._table, other._table]))

    # ------------------------------------------------------------------------------ storage
    def resolved(self, column: str) -> list[str | None]:
        """Absolute URIs of a file column (``;``-joined parts resolved one by one)."""
        self.require(column)
        values = self._table[column].cast(pa.string()).to_pylist()
        if self.base is None:
            return values
        return [_resolve(self.base, v) for v in values]

    def mask(self, row: int | str) -> np.ndarray:
        """Decode one predicted mask (row number or id) of a ``predictions`` frame.

        Multi-class: H x W class ids.  Multi-label: K x H x W {0, 1}, one plane per class in
        class order (classes may overlap).
        """
        if self.kind != "predictions":
            raise ValueError(f"mask() reads predicted masks; this is a {self.kind} frame")
        from PIL import Image

        from pipelines.predictions import scan

        ident = self._table["id"][row].as_py() if isinstance(row, int) else row
        found = scan(self.source, ["mask_png", "class_mask_pngs"], ids=[ident],
                     storage_options=self.storage_options).to_pylist()
        if not found:
            raise ValueError(f"no prediction with id {ident!r} under {self.source}")
        if self._multilabel():
            planes = [np.asarray(Image.open(io.BytesIO(png)))
                      for png in found[0]["class_mask_pngs"]]
            return (np.stack(planes) > 0).astype(np.uint8)
        return np.asarray(Image.open(io.BytesIO(found[0]["mask_png"])))

    def _multilabel(self) -> bool:
        """Whether the model behind these predictions is multi-label (from ``_model.json``)."""
        from pipelines.predictions import model_records

        records = model_records(self.source, self.storage_options)
        return any(r.get("mask_spec", {}).get("multilabel") for r in records)

    def _derive(self, table: pa.Table) -> "Frame":
        return Frame(table, kind=self.kind, source=self.source, base=self.base,
                     storage_options=self.storage_options)


# ---------------------------------------------------------------------------------- import


def read_frame(path: storage.Uri, storage_options: dict[str, Any] | None = None) -> Frame:
    """Build a :class:`Frame` from a manifest, an images/+masks/ prefix, pack shards or predictions.

    Only metadata is read: the manifest itself, a listing, or the non-binary Parquet columns.
    ``path`` is a URI or a ``pathlib.Path``.
    """
    from pipelines import ingest

    path = storage.as_uri(path)
    if not storage.exists(path, storage_options):
        raise FileNotFoundError(f"import_file: nothing at {path!r} (a manifest .csv/.parquet, a "
                                f"prefix holding images/ and masks/, or a Parquet directory)")
    parquet_dir = _parquet_kind(path, storage_options)
    if parquet_dir is not None:
        return _read_parquet_frame(path, parquet_dir, storage_options)
    manifest = storage.join_uri(path, "manifest.csv")
    if not path.lower().endswith((".csv", ".tsv", ".parquet")) and storage.exists(manifest,
                                                                                  storage_options):
        if not storage.exists(storage.join_uri(path, "images"), storage_options):
            return _read_manifest_frame(manifest, storage_options)   # a dataset directory
    kind = ingest.detect_kind(path, storage_options)
    if kind == "prefix":
        pairs = ingest.list_prefix_pairs(path, storage_options)
        table = pairs.drop_columns(["refused"]).rename_columns(["id", "image", "mask", "split",
                                                                "fold"])
        return Frame(table, kind="files", source=path, storage_options=storage_options)
    return _read_manifest_frame(path, storage_options)


def _parquet_kind(path: str, storage_options: dict[str, Any] | None) -> str | None:
    """``"shards"`` / ``"predictions"`` when ``path`` holds such Parquet, else None."""
    import pyarrow.parquet as pq

    lowered = path.lower().rstrip("/")
    if lowered.endswith(".parquet"):
        files = [path]
    elif lowered.endswith((".csv", ".tsv")):
        return None
    else:
        files = storage.list_uri(path, suffixes=(".parquet",), storage_options=storage_options)
        if not files or storage.exists(storage.join_uri(path, "images"), storage_options):
            return None
    with storage.open_uri(files[0], storage_options) as handle:
        names = pq.read_schema(handle).names
    if "mask_png" in names:
        return "predictions"
    if "image_bytes" in names:
        return "shards"
    return None


def _read_parquet_frame(path: str, kind: str, storage_options: dict[str, Any] | None) -> Frame:
    import pyarrow.dataset as pads

    if kind == "predictions":   # either layout, one row per request (metadata columns only)
        from pipelines.predictions import scan
        from pipelines.records import PREDICTION_SCHEMA

        keep = [f.name for f in PREDICTION_SCHEMA if not _is_binary(f.type)]
        table = scan(path, keep, storage_options=storage_options)
        unused = [n for n in _SERVE_ONLY if n in table.column_names
                  and table[n].null_count == table.num_rows]   # batch rows carry no request data
        return Frame(table.drop_columns(unused), kind="predictions", source=path,
                     storage_options=storage_options)
    fs, fs_path = storage.filesystem_for(path, storage_options)
    data = pads.dataset(fs_path, filesystem=fs, format="parquet", partitioning="hive",
                        exclude_invalid_files=True)
    keep = [f.name for f in data.schema if not _is_binary(f.type)]
    table = data.to_table(columns=keep)        # metadata columns only; bytes stay in storage
    table = table.rename_columns([_SHARD_RENAMES.get(n, n) for n in table.column_names])
    return Frame(table, kind="shards", source=path, storage_options=storage_options)


def _read_manifest_frame(path: str, storage_options: dict[str, Any] | None) -> Frame:
    """Every manifest column as written, plus ``id`` (derived as ingest derives it) when absent."""
    from pipelines import ingest

    raw = ingest.read_manifest_table(path, storage_options)
    if "fold" in raw.column_names:
        raw = raw.set_column(raw.column_names.index("fold"), "fold", raw["fold"].cast(pa.int32()))
    if "id" not in raw.column_names:
        try:   # ingest's id rule (image stems, or index_stem when stems repeat)
            ids = ingest.read_manifest(path, storage_options)["id"]
        except ValueError:   # non-standard column names: fall back to the row number
            ids = pa.chunked_array([pa.array([f"{i:06d}" for i in range(raw.num_rows)])])
        raw = raw.add_column(0, "id", ids)
    return Frame(raw, kind="files", source=path, base=storage.parent_uri(path),
                 storage_options=storage_options)


def _is_binary(kind: pa.DataType) -> bool:
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _is_binary(kind.value_type)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _resolve(base: str, value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    from pipelines.ingest import resolve_mask_parts

    return resolve_mask_parts(base, value)


def write_manifest(parts: Sequence[tuple[Frame, str | None]], uri: str, *, x: str,
                   y: str | None, fold_column: str | None = None) -> str:
    """Write frames as one CSV manifest (absolute URIs, explicit ids); returns ``uri``.

    ``parts`` pairs each frame with the split its rows get (``None`` keeps the frame's own
    ``split`` column, if any); frames without ``fold_column`` get no folds (validation rows).
    ``y=None`` leaves the mask column empty (prediction input).
    """
    import pyarrow.csv as pcsv

    tables = []
    for frame, split in parts:
        if frame.kind == "predictions":
            raise ValueError("a predictions frame holds masks, not training data; import the "
                             "manifest instead")
        if frame.kind == "shards":
            raise ValueError(
                f"{frame.source}: frames over `rayseg pack` shards cannot be written as a "
                f"manifest (their bytes live in the shards); import the manifest the shards "
                f"were packed from, or use `rayseg train --set data.shards={frame.source}` / "
                f"`rayseg predict --input {frame.source}`")
        frame.require(x, role="x (image column)")
        if y is not None:
            frame.require(y, role="y (mask column)")
        n = frame.nrow
        has_folds = fold_column is not None and fold_column in frame.columns
        own_split = frame.to_arrow()["split"].to_pylist() if "split" in frame.columns else [None] * n
        tables.append(pa.table({
            "id": frame.to_arrow()["id"].cast(pa.string()).to_pylist(),
            "image": frame.resolved(x),
            "mask": frame.resolved(y) if y is not None else [None] * n,
            "split": own_split if split is None else [split] * n,
            "fold": (frame.to_arrow()[fold_column].cast(pa.int32()).to_pylist()
                     if has_folds else [None] * n),
        }, schema=pa.schema([("id", pa.string()), ("image", pa.string()), ("mask", pa.string()),
                             ("split", pa.string()), ("fold", pa.int32())])))
    table = pa.concat_tables(tables)
    if fold_column is None:
        table = table.drop_columns(["fold"])
    ids = table["id"].to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError("the frames share rows (repeated ids); training and validation frames "
                         "must be disjoint, e.g. from split_frame()")
    buffer = io.BytesIO()
    pcsv.write_csv(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())
    return uri
