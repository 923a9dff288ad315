"""``rayseg validate``: CLI (or a config's ``mask:`` section) -> MaskSpec -> pipelines.validate."""
from __future__ import annotations

import argparse
import datetime as dt
import posixpath

from jobs.options import add_config_options, resolve_config_path

DESCRIPTION = """\
Label QA before any training time is spent: a Ray Data job decodes every image/mask pair and
checks that the image decodes, the mask exists and is lossless (no JPEG), the sizes match, the
mask values lie within the K classes (or --mask-values / --palette), and no image exceeds the
pixel limit.  It counts empty masks and the pixel frequency of each class.

SOURCE is a manifest (CSV/Parquet with image, mask[, id, split, fold] columns; relative paths
resolve against the manifest), a prefix holding images/ and masks/, or shards from `rayseg pack`.
Local paths, file:// and s3:// all work (S3 endpoint/keys from the AWS_* variables).

Writes to --out: report.json, report.md (the table printed here), class_frequency.png and
quarantine.parquet (one row per rejected pair: source, reason, hint).  Exits 1 when the rejected
fraction exceeds --max-bad.
"""

EPILOG = """\
examples:
  rayseg validate data/isbi/manifest.csv --num-classes 2 --mask-values 0,255
  rayseg validate s3://bucket/data/manifest.csv --num-classes 3 --out s3://bucket/qa/run1 --max-bad 0.01
  rayseg validate data/colour/manifest.csv --num-classes 3 --palette "0,0,0;255,0,0;0,255,0"
  rayseg validate data/manifest.csv --config jobs/configs/train_sample.yaml   # its mask: section
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "validate", help="label QA: decode and check every pair, write a report and quarantine",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_and_mask_options(parser)
    parser.add_argument("--max-bad", type=float,
                        help="fail when more than this fraction of pairs is rejected (default 0)")
    parser.add_argument("--out", help="output URI (default rayseg_work/validate/<name>-<time>)")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    return parser


def add_source_and_mask_options(parser: argparse.ArgumentParser) -> None:
    """SOURCE, the mask flags, --config/--set and --max-pixels (``validate`` and ``plan``)."""
    parser.add_argument("source", metavar="SOURCE", help="manifest, images/+masks/ prefix or shards")
    parser.add_argument("--num-classes", type=int, help="K, the number of classes")
    parser.add_argument("--mask-values", help="raw mask value of each class, in class order, e.g. 0,255")
    parser.add_argument("--palette", help='RGB colour of each class, e.g. "0,0,0;255,0,0"')
    parser.add_argument("--class-names", help="comma-separated class names")
    parser.add_argument("--multilabel", action="store_true", default=None,
                        help="one binary mask per class (';'-joined files or a K-channel TIFF)")
    parser.add_argument("--ignore-index", type=int, help="mask value that means 'not labelled' (255)")
    add_config_options(parser, "ValidateConfig keys (mask, max_pixels, max_bad, out); a training "
                               "config works too: its mask: section is used")
    parser.add_argument("--max-pixels", type=int,
                        help="reject images with more pixels (decompression-bomb guard, "
                             "default 64000000)")


def validate_config(args: argparse.Namespace):
    """ValidateConfig from --config (a training config lends its ``mask:`` section), the flags
    given, then --set."""
    import dataclasses

    from pipelines.config import ValidateConfig, load_config, read_yaml

    flags = {"source": args.source, "out": args.out, "max_pixels": args.max_pixels,
             "max_bad": args.max_bad, "address": args.address,
             "mask.num_classes": args.num_classes, "mask.ignore_index": args.ignore_index,
             "mask.multilabel": args.multilabel, "mask.mask_values": _ints(args.mask_values, ","),
             "mask.palette": [_ints(c, ",") for c in args.palette.split(";")]
             if args.palette else None,
             "mask.class_names": args.class_names.split(",") if args.class_names else None}
    data = read_yaml(resolve_config_path(args.config)) if args.config else {}
    own = {f.name for f in dataclasses.fields(ValidateConfig)}
    if not set(data) <= own and "mask" in data:          # a training config: its mask only
        data = {"mask": data["mask"]}
    if "num_classes" not in (data.get("mask") or {}) and args.num_classes is None and not any(
            item.startswith("mask.num_classes=") for item in args.overrides):
        job = getattr(args, "command", None) or "validate"
        raise SystemExit(f"rayseg {job}: give --num-classes K (or a --config with "
                         f"mask.num_classes)")
    flags = {key: value for key, value in flags.items() if value is not None}
    return load_config(ValidateConfig, data, args.overrides, flags=flags)


def mask_spec_from_args(args: argparse.Namespace):
    """The MaskSpec of :func:`validate_config`."""
    return validate_config(args).mask


def run(args: argparse.Namespace) -> int:
    from pipelines.raycluster import check_manifest_shared, ensure_ray
    from pipelines.validate import validate

    cfg = validate_config(args)
    out = cfg.out or _default_out(cfg.source)
    ensure_ray(address=cfg.address)
    check_manifest_shared("SOURCE", cfg.source)   # the report is written here, may be local
    report = validate(cfg.source, cfg.mask, out_uri=out, max_pixels=cfg.max_pixels,
                      max_bad=cfg.max_bad, log=lambda line: print(line, flush=True))
    print(report.table())
    print(f"outputs: {out}  (report.json, report.md, class_frequency.png, quarantine.parquet, "
          f"fingerprint.json)")
    if not report.passed:
        print(f"FAILED: {report.rejected_fraction:.1%} of pairs rejected > --max-bad "
              f"{report.max_bad:.1%}; see quarantine.parquet for reasons and hints")
    return 0 if report.passed else 1


def _ints(text: str | None, sep: str) -> list[int] | None:
    return [int(v) for v in text.split(sep)] if text else None


def _default_out(source: str, job: str = "validate") -> str:
    name = posixpath.basename(posixpath.dirname(source.rstrip("/")) or "data") or "data"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"rayseg_work/{job}/{name}-{stamp}"
