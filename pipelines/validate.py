"""``rayseg validate``: label QA as a Ray Data job, before any training time is spent.

Every pair is decoded in Ray tasks and checked (image decodes, mask exists and is lossless, sizes
match, values within the classes / palette, pixel limit).  Tasks return one small summary row per
pair (class pixel counts, size, or the rejection); the driver streams over those summaries, so it
never holds image data.  Outputs under ``out_uri``:

- ``report.json``: counts, reasons, class pixel frequencies, empty masks, sizes, pass/fail;
- ``report.md``: the same as a readable table (also printed by the job);
- ``class_frequency.png``: bar chart of class pixel frequencies;
- ``quarantine.parquet``: one :data:`records.QUARANTINE_SCHEMA` row per rejected pair;
- ``fingerprint.json``: the accepted pairs' sizes, channels, intensities, class shares and
  positions (:mod:`pipelines.plan.fingerprint`), which ``rayseg plan`` derives a plan from.

Invariant (tested): ``total == ok + quarantined``; bad input never crashes the job.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.ingest import SourceKind, decode_pair, read_pairs
from pipelines.plan.fingerprint import CHANNEL_SLOTS, FingerprintTotals, class_pixels, pair_stats
from pipelines.records import QUARANTINE_SCHEMA, quarantine_row
from seg_core.codecs import DEFAULT_MAX_PIXELS
from seg_core.config import MaskSpec
from seg_core.errors import InputError

STAGE = "validate"


@dataclass(frozen=True)
class ValidationReport:
    """Result of :func:`validate`; ``passed`` is ``rejected_fraction <= max_bad``."""

    source: str
    class_names: tuple[str, ...]
    total: int
    ok: int
    quarantined: int
    max_bad: float
    reasons: dict[str, int]
    empty_masks: int
    class_pixels: tuple[int, ...]
    ignore_pixels: int
    min_size: tuple[int, int] | None
    max_size: tuple[int, int] | None
    ok_pixels: int = 0                 # H x W summed over accepted masks
    multilabel: bool = False
    outputs: dict[str, str] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict, repr=False)  # fingerprint.json

    @property
    def rejected_fraction(self) -> float:
        return self.quarantined / self.total if self.total else 0.0

    @property
    def passed(self) -> bool:
        return self.total > 0 and self.rejected_fraction <= self.max_bad

    @property
    def class_frequency(self) -> tuple[float, ...]:
        """Share of labelled pixels per class (multi-label: share of all pixels that are on)."""
        denom = self.ok_pixels if self.multilabel else sum(self.class_pixels)
        return tuple(c / denom if denom else 0.0 for c in self.class_pixels)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("fingerprint")   # fingerprint.json
        data.update(rejected_fraction=self.rejected_fraction, passed=self.passed,
                    class_frequency=list(self.class_frequency))
        return data

    def table(self) -> str:
        """Markdown summary: counts, rejection reasons and the class-frequency table."""
        verdict = "PASS" if self.passed else "FAIL"
        lines = [f"# Validation of {self.source}: {verdict}", "",
                 "| pairs | ok | quarantined | rejected | max bad | empty masks |",
                 "|---:|---:|---:|---:|---:|---:|",
                 f"| {self.total} | {self.ok} | {self.quarantined} | "
                 f"{self.rejected_fraction:.1%} | {self.max_bad:.1%} | {self.empty_masks} |", ""]
        if self.min_size:
            lines += [f"Image sizes (H x W): {self.min_size[0]}x{self.min_size[1]} .. "
                      f"{self.max_size[0]}x{self.max_size[1]}", ""]
        lines += ["| class | pixels | frequency |", "|---|---:|---:|"]
        lines += [f"| {i}: {name} | {n} | {f:.2%} |" for i, (name, n, f) in
                  enumerate(zip(self.class_names, self.class_pixels, self.class_frequency))]
        if self.ignore_pixels:
            lines.append(f"| ignore | {self.ignore_pixels} | |")
        if self.reasons:
            lines += ["", "| rejection reason | pairs |", "|---|---:|"]
            lines += [f"| {r} | {n} |" for r, n in sorted(self.reasons.items())]
        return "\n".join(lines) + "\n"


def validate(source: str, mask_spec: MaskSpec, *, out_uri: str | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS, max_bad: float = 0.0,
             kind: SourceKind = "auto", num_cpus: float = 1.0, rows_per_block: int = 16,
             split: str | None = None,
             storage_options: storage.StorageOptions | None = None,
             log: Callable[[str], None] | None = None) -> ValidationReport:
    """Decode and check every pair of ``source`` (only the rows of ``split`` when given); write
    the outputs when ``out_uri`` is given.  ``log`` gets a line when other work holds the CPU
    a decode task asks for (:func:`pipelines.raycluster.wait_note`): the run waits for it."""
    from pipelines.raycluster import wait_note

    if not 0.0 <= max_bad <= 1.0:
        raise ValueError(f"validate: max_bad is a fraction in [0, 1], got {max_bad}")
    summaries = read_pairs(source, kind=kind, rows_per_block=rows_per_block, split=split,
                           storage_options=storage_options).map_batches(
        summarize_pairs, batch_format="numpy", num_cpus=num_cpus, udf_modifying_row_count=False,
        fn_kwargs={"mask_spec": mask_spec, "max_pixels": max_pixels})
    if log is not None and (note := wait_note("validate", {"CPU": num_cpus})):
        log(note)
    totals = _Totals(mask_spec)
    for batch in summaries.iter_batches(batch_format="pyarrow", batch_size=1024):
        totals.add(batch)
    k = mask_spec.num_classes
    report = ValidationReport(
        source=source, class_names=mask_spec.names, total=totals.total,
        ok=totals.total - len(totals.bad), quarantined=len(totals.bad), max_bad=max_bad,
        reasons=dict(Counter(r["reason"] for r in totals.bad)), empty_masks=totals.empty,
        class_pixels=tuple(int(c) for c in totals.class_pixels[:k]),
        ignore_pixels=int(totals.class_pixels[k]), min_size=totals.min_size,
        max_size=totals.max_size, ok_pixels=totals.pixels, multilabel=mask_spec.multilabel,
        fingerprint=totals.fingerprint.result())
    if out_uri is not None:
        report = _write_outputs(report, totals.bad, out_uri, storage_options)
    return report


def summarize_pairs(batch: dict[str, np.ndarray], mask_spec: MaskSpec,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """Per pair: size, class pixel counts (last entry: ignore), emptiness and the fingerprint's
    figures (:func:`pipelines.plan.fingerprint.pair_stats`), or the rejection."""
    k = mask_spec.num_classes
    out: dict[str, list] = {n: [] for n in ("id", "image_uri", "mask_uri", "reason", "message",
                                            "hint", "height", "width", "class_pixels", "empty",
                                            *_NO_STATS)}
    for i in range(len(batch["id"])):
        row = {n: _py(batch[n][i]) for n in ("id", "image_uri", "mask_uri")}
        counts, height, width, empty, bad = np.zeros(k + 1, np.int64), 0, 0, False, None
        stats = _no_stats(k)
        try:
            image, mask = decode_pair(_py(batch["image_bytes"][i]), _py(batch["mask_bytes"][i]),
                                  mask_spec, image_uri=row["image_uri"], mask_uri=row["mask_uri"],
                                  max_pixels=max_pixels,
                                  refused=_py(batch["refused"][i]) if "refused" in batch else None)
            height, width = mask.shape[-2:]
            counts = class_pixels(mask, mask_spec)
            empty = bool(counts[:k].sum() == 0) if mask_spec.multilabel else \
                bool(counts[1:k].sum() == 0)
            stats = pair_stats(image, mask, mask_spec)
        except InputError as error:
            bad = quarantine_row(row, error, STAGE)
        for name in ("id", "image_uri", "mask_uri"):
            out[name].append(row[name])
        for name in ("reason", "message", "hint"):
            out[name].append(bad[name] if bad else None)
        out["height"].append(height)
        out["width"].append(width)
        out["class_pixels"].append(counts)
        out["empty"].append(empty)
        for name in _NO_STATS:
            out[name].append(stats[name])
    return {n: np.array(v, dtype=object if n in ("id", "image_uri", "mask_uri", "reason",
                                                  "message", "hint", "pixel_type") else None)
            for n, v in out.items()}


_NO_STATS = ("channels", "pixel_type", "sampled", "channel_sum", "channel_sumsq", "thirds")


def _no_stats(k: int) -> dict[str, Any]:
    """The fingerprint columns of a rejected pair (same shapes, nothing counted)."""
    return {"channels": 0, "pixel_type": "", "sampled": 0,
            "channel_sum": np.zeros(CHANNEL_SLOTS), "channel_sumsq": np.zeros(CHANNEL_SLOTS),
            "thirds": np.zeros((4, k + 2), np.int64)}


class _Totals:
    """Streaming aggregation of summary batches on the driver (keeps only rejected rows)."""

    def __init__(self, spec: MaskSpec):
        num_classes = spec.num_classes
        self.total = self.empty = self.pixels = 0
        self.class_pixels = np.zeros(num_classes + 1, np.int64)
        self.min_size: tuple[int, int] | None = None
        self.max_size: tuple[int, int] | None = None
        self.bad: list[dict[str, Any]] = []
        self.fingerprint = FingerprintTotals(spec)

    def add(self, batch: pa.Table) -> None:
        import datetime as dt

        for row in batch.to_pylist():
            self.total += 1
            if row["reason"] is not None:
                self.bad.append({**{n: row[n] for n in ("id", "image_uri", "mask_uri", "reason",
                                                        "message", "hint")},
                                 "stage": STAGE, "created_at": dt.datetime.now(dt.timezone.utc)})
                continue
            size = (row["height"], row["width"])
            self.min_size = size if self.min_size is None else min(self.min_size, size)
            self.max_size = size if self.max_size is None else max(self.max_size, size)
            self.class_pixels += np.asarray(row["class_pixels"], np.int64)
            self.pixels += size[0] * size[1]
            self.empty += bool(row["empty"])
            self.fingerprint.add(row)


def _write_outputs(report: ValidationReport, bad: list[dict[str, Any]], out_uri: str,
                   storage_options: storage.StorageOptions | None) -> ValidationReport:
    outputs = {name: storage.join_uri(out_uri, name) for name in
               ("report.json", "report.md", "class_frequency.png", "quarantine.parquet",
                "fingerprint.json")}
    report = replace(report, outputs=outputs)
    table = pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA)
    storage.write_table(table, outputs["quarantine.parquet"], storage_options)
    storage.write_bytes(outputs["report.json"],
                        json.dumps(report.to_dict(), indent=2).encode(), storage_options)
    storage.write_bytes(outputs["report.md"], report.table().encode(), storage_options)
    storage.write_bytes(outputs["fingerprint.json"],
                        json.dumps(report.fingerprint, indent=2).encode(), storage_options)
    storage.write_bytes(outputs["class_frequency.png"], frequency_chart(report), storage_options)
    return report


def frequency_chart(report: ValidationReport) -> bytes:
    """PNG bar chart of class pixel frequencies (matplotlib, Agg backend, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.0, 0.8 * len(report.class_names) + 2), 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    freq = [100 * f for f in report.class_frequency]
    bars = axes.bar(range(len(freq)), freq, color="#4C72B0")
    axes.bar_label(bars, labels=[f"{f:.1f}%" for f in freq], fontsize=8)
    axes.set_xticks(range(len(freq)), report.class_names, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("pixels (%)")
    axes.set_title(f"Class frequency ({report.ok} masks)", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
