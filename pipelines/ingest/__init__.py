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

from pipelines.ingest.decode import (
    decode_pair,
    decode_pairs,
)
from pipelines.ingest.fetch import (
    IO_CPUS_LEFT,
    IO_TASK_CPUS,
    read_pairs,
    seeded_order,
    fetch_pairs,
    read_shards,
    read_split_bytes,
    shard_to_rows,
    fetch_bytes,
    read_mask_bytes,
    read_mask,
    table_dataset,
)
from pipelines.ingest.policy import (
    SourceKind,
    MASK_SEPARATOR,
    IGNORE_PREFIX,
    IMAGE_SUFFIXES,
    DEFAULT_MAX_BYTES,
    ALLOWED_ROOTS_ENV,
    path_refusal,
    read_limited,
    header_size,
)
from pipelines.ingest.sources import (
    detect_kind,
    read_manifest_table,
    read_manifest,
    list_prefix_pairs,
    pair_table,
    select_rows,
    resolve_mask_parts,
    mask_part_uris,
    list_images,
)

__all__ = [
    "ALLOWED_ROOTS_ENV",
    "DEFAULT_MAX_BYTES",
    "IGNORE_PREFIX",
    "IMAGE_SUFFIXES",
    "IO_CPUS_LEFT",
    "IO_TASK_CPUS",
    "MASK_SEPARATOR",
    "SourceKind",
    "decode_pair",
    "decode_pairs",
    "detect_kind",
    "fetch_bytes",
    "fetch_pairs",
    "header_size",
    "list_images",
    "list_prefix_pairs",
    "mask_part_uris",
    "pair_table",
    "path_refusal",
    "read_limited",
    "read_manifest",
    "read_manifest_table",
    "read_mask",
    "read_mask_bytes",
    "read_pairs",
    "read_shards",
    "read_split_bytes",
    "resolve_mask_parts",
    "seeded_order",
    "select_rows",
    "shard_to_rows",
    "table_dataset",
]
