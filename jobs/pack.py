"""``rayseg pack``: SOURCE -> Parquet shards of bounded size (one pipelines.pack call)."""
from __future__ import annotations

import argparse

from jobs.options import add_config_options, job_config

DESCRIPTION = """\
Pack image/mask pairs into a few large Parquet shards, the layout Ray Data reads fastest (millions
of small objects make S3 slow and throttled).  Each row holds the id, the original image bytes,
the mask bytes, image format, height, width, source URIs, sha256 of the image, split and fold.
Nothing is re-encoded or dropped: run `rayseg validate` first to find bad pairs.

SOURCE is a manifest (CSV/Parquet; relative paths resolve against it), a prefix with images/ and
masks/, or existing shards.  --out is overwritten; it gets part-*.parquet files (or split=<name>/
folders with --partition-by-split) and _rayseg_pack.json describing the run.  Training, predict
and validate all accept the shard prefix as their source.
"""

EPILOG = """\
examples:
  rayseg pack data/manifest.csv --out s3://bucket/shards/
  rayseg pack s3://bucket/raw/ --out s3://bucket/shards/ --shard-mb 128 --partition-by-split
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pack", help="pack pairs into Parquet shards of bounded size",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="manifest, images/+masks/ prefix or shards")
    parser.add_argument("--out", help="output prefix (local path or s3://)")
    parser.add_argument("--shard-mb", type=float, help="target shard size in MB (default 256)")
    parser.add_argument("--partition-by-split", action="store_true", default=None,
                        help="hive layout: <out>/split=<name>/part-*.parquet")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    add_config_options(parser, "PackConfig keys (out, shard_mb, partition_by_split, address)")
    return parser


def run(args: argparse.Namespace) -> int:
    from pipelines.config import PackConfig
    from pipelines.pack import pack
    from pipelines.raycluster import check_manifest_shared, check_shared, ensure_ray

    cfg = job_config(PackConfig, args, {name: getattr(args, name) for name in (
        "source", "out", "shard_mb", "partition_by_split", "address")})
    ensure_ray(address=cfg.address)
    check_manifest_shared("SOURCE", cfg.source)
    check_shared({"out": cfg.out})
    summary = pack(cfg.source, cfg.out, shard_mb=cfg.shard_mb,
                   partition_by_split=cfg.partition_by_split)
    print(f"packed {summary.rows} pairs into {summary.files} shard(s), "
          f"{summary.total_bytes / 1e6:.1f} MB, ~{summary.rows_per_file} rows per shard -> "
          f"{summary.out_uri}")
    return 0
