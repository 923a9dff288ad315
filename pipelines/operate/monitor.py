"""Drift monitoring: live predictions against the model's own baseline on its val split.

At training time :func:`write_baseline` predicts up to :data:`BASELINE_IMAGES` val images with
the new artifact and stores, in ``<artifact>/baseline.json``, the per-image figures every
prediction row already carries: the area share of each class (``class_pixel_counts`` / pixels),
whether the mask is empty (no foreground: multi-class, nothing but class 0; multi-label, no class
on), and ``mean_confidence``.  Baseline and live rows go through the same
:func:`row_features`, so they are measured the same way.

:func:`compare` (``rayseg monitor``) reads prediction Parquet (the endpoint's log or a
``rayseg predict`` output) and tests, per class, whether the live area shares come from the
baseline's distribution:

- two-sample Kolmogorov-Smirnov statistic and its asymptotic p-value, and the population
  stability index (PSI) over the baseline's quintile bins; a class is *shifted* when the KS
  p-value is under ``alpha`` **and** PSI is over ``min_psi`` (significant and large enough);
- the empty-mask rate, flagged when it moves by more than ``max_empty_change``;
- the low-confidence share: images whose mean confidence is under the baseline's 10th
  percentile (10% of the baseline by construction), flagged when it grows by more than
  ``max_low_confidence_change``; the mean confidence gets the same KS/PSI test as a class.

It writes ``report.md`` (tables and plots), ``report.json`` and the plots to ``out``; the job exits
3 when something is flagged, so a CronJob alerts.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from pipelines import storage
from pipelines.config import DriftThresholds as Thresholds

if TYPE_CHECKING:
    from pipelines.model import LoadedModel
    from seg_core.config import MaskSpec

BASELINE_FILE = "baseline.json"
BASELINE_IMAGES = 64          # val images predicted for the baseline (all of a smaller split)
LOW_CONFIDENCE_QUANTILE = 0.1
PSI_BINS = 5                  # quintiles: stable with a few dozen images per side
DRIFT_EXIT = 3


# ------------------------------------------------------------------------------- features


def row_features(rows: Iterable[Mapping[str, Any]], spec: "MaskSpec") -> dict[str, Any]:
    """Per-image figures of prediction rows (``class_pixel_counts``, ``height``, ``width``,
    ``mean_confidence``): ``{"area": K lists, "empty": [bool], "confidence": [float]}``."""
    k = spec.num_classes
    area: list[list[float]] = [[] for _ in range(k)]
    empty, confidence = [], []
    for row in rows:
        counts = np.asarray(row["class_pixel_counts"], np.float64)
        pixels = max(int(row["height"]) * int(row["width"]), 1)
        for index in range(k):
            area[index].append(float(counts[index] / pixels))
        foreground = counts.sum() if spec.multilabel else counts[1:].sum()
        empty.append(bool(foreground == 0))
        confidence.append(float(row["mean_confidence"]))
    return {"area": area, "empty": empty, "confidence": confidence}


def write_baseline(artifact_dir: Path, blobs: Sequence[bytes | None]) -> dict[str, Any]:
    """Predict ``blobs`` (val image bytes) with the artifact in ``artifact_dir`` and write
    ``baseline.json`` there; returns the baseline.  The images are decoded and predicted as
    ``rayseg predict`` would (:meth:`pipelines.model.LoadedModel.predict_rows`: the artifact's
    ``max_pixels`` and ``tiff_page``); images it refuses are left out of the baseline."""
    model = baseline_model(artifact_dir)
    inputs = [{"id": str(index), "image_uri": None, "image_bytes": blob}
              for index, blob in enumerate(blobs)]
    return save_baseline(artifact_dir, model, model.predict_rows(inputs, with_confidence=False))


def baseline_model(artifact_dir: Path) -> "LoadedModel":
    """The artifact in ``artifact_dir`` as the baseline predicts with it: the torch engine on
    the CPU (the baseline is about masks, not engine speed), its post-processing and
    temperature as recorded."""
    from pipelines.model import open_model

    return open_model(str(artifact_dir), engine="torch", device="cpu")


def save_baseline(artifact_dir: Path, model: "LoadedModel",
                  rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """``baseline.json`` in ``artifact_dir`` from ``model``'s prediction rows of the val images
    (quarantine rows, with a ``reason``, are left out); returns the baseline."""
    rows = [row for row in rows if row.get("reason") is None]
    artifact = model.artifact
    features = row_features(rows, artifact.mask_spec)
    baseline = {"images": len(rows), "class_names": list(artifact.mask_spec.names),
                "multilabel": artifact.mask_spec.multilabel, "split": "val",
                "weights_sha256": artifact.weights_key, **features}
    (artifact_dir / BASELINE_FILE).write_text(json.dumps(baseline) + "\n")
    return baseline


def val_images(source: str, *, kind: str, split: str,
               limit: int = BASELINE_IMAGES) -> list[bytes | None]:
    """The bytes of up to ``limit`` images of ``split``, read on this process (no Ray job):
    shards through :func:`pipelines.ingest.read_shards`' reader, files through ingest's fetch."""
    from pipelines import ingest

    return ingest.read_split_bytes(source, kind=kind, split=split,
                                   limit=limit)["image_bytes"].to_pylist()


# ----------------------------------------------------------------------------- statistics


def ks_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: ``(D, asymptotic p-value)`` (Numerical Recipes 14.3)."""
    x, y = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    if not len(x) or not len(y):
        return 0.0, 1.0
    grid = np.concatenate([x, y])
    d = float(np.max(np.abs(np.searchsorted(x, grid, side="right") / len(x)
                            - np.searchsorted(y, grid, side="right") / len(y))))
    n = len(x) * len(y) / (len(x) + len(y))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 1e-3:
        return d, 1.0
    p = 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101))
    return d, float(min(max(p, 0.0), 1.0))


def psi(baseline: Sequence[float], live: Sequence[float], bins: int = PSI_BINS) -> float:
    """Population stability index over the baseline's quantile bins (ties merge bins)."""
    base = np.asarray(baseline, np.float64)
    now = np.asarray(live, np.float64)
    if not len(base) or not len(now):
        return 0.0
    edges = np.unique(np.quantile(base, np.linspace(0, 1, bins + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(edges, base, side="right"), minlength=len(edges) + 1)
    actual = np.bincount(np.searchsorted(edges, now, side="right"), minlength=len(edges) + 1)
    p = np.maximum(expected / len(base), 1e-4)
    q = np.maximum(actual / len(now), 1e-4)
    return float(np.sum((q - p) * np.log(q / p)))


def compare(baseline: Mapping[str, Any], live: Mapping[str, Any],
            thresholds: Thresholds = Thresholds()) -> dict[str, Any]:
    """The drift figures of ``live`` features against ``baseline`` features, with flags."""
    rows = len(live["confidence"])
    judged = rows >= thresholds.min_rows

    def test(name: str, before: Sequence[float], after: Sequence[float]) -> dict[str, Any]:
        d, p = ks_test(before, after)
        index = psi(before, after)
        return {"name": name, "baseline_mean": _mean(before), "live_mean": _mean(after),
                "ks": round(d, 4), "p_value": p, "psi": round(index, 4),
                "shifted": judged and p < thresholds.alpha and index > thresholds.min_psi}

    classes = [test(name, before, after) for name, before, after in
               zip(baseline["class_names"], baseline["area"], live["area"])]
    confidence = test("mean_confidence", baseline["confidence"], live["confidence"])
    cut = float(np.quantile(baseline["confidence"], LOW_CONFIDENCE_QUANTILE)) \
        if baseline["confidence"] else 0.0
    low = {"threshold": round(cut, 4),
           "baseline": _share([c < cut for c in baseline["confidence"]]),
           "live": _share([c < cut for c in live["confidence"]])}
    low["flagged"] = judged and low["live"] - low["baseline"] > thresholds.max_low_confidence_change
    empty = {"baseline": _share(baseline["empty"]), "live": _share(live["empty"])}
    empty["flagged"] = judged and abs(empty["live"] - empty["baseline"]) > \
        thresholds.max_empty_change
    flags = [f"class {c['name']}: area distribution shifted (KS {c['ks']}, p {c['p_value']:.2g}, "
             f"PSI {c['psi']})" for c in classes if c["shifted"]]
    if confidence["shifted"]:
        flags.append(f"mean confidence shifted (KS {confidence['ks']}, PSI {confidence['psi']})")
    if low["flagged"]:
        flags.append(f"low-confidence share {low['live']:.2f} (baseline {low['baseline']:.2f})")
    if empty["flagged"]:
        flags.append(f"empty-mask rate {empty['live']:.2f} (baseline {empty['baseline']:.2f})")
    return {"live_rows": rows, "baseline_rows": baseline["images"], "judged": judged,
            "thresholds": dataclasses.asdict(thresholds), "classes": classes,
            "confidence": confidence, "low_confidence": low, "empty": empty, "flags": flags,
            "drift": bool(flags)}


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 5) if len(values) else None


def _share(flags: Sequence[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else 0.0


# ----------------------------------------------------------------------------------- job


def read_predictions(uri: str, *, since: str | None = None,
                     weights_sha256: str | None = None) -> list[dict[str, Any]]:
    """The rows' figures under ``uri`` (:func:`pipelines.predictions.scan`: either layout),
    created at or after ``since`` (ISO time) and, when given, from those weights only."""
    from pipelines.predictions import prediction_files, scan

    if not prediction_files(uri):
        raise ValueError(f"{uri}: no prediction Parquet found (expected the --out of rayseg "
                         f"predict or the out_uri of rayseg serve)")
    return scan(uri, ["class_pixel_counts", "height", "width", "mean_confidence"], since=since,
                weights=weights_sha256).to_pylist()


def run_monitor(predictions: str, model: str, out: str, *, since: str | None = None,
                thresholds: Thresholds = Thresholds(), same_weights: bool = False,
                log: Any = print) -> dict[str, Any]:
    """``rayseg monitor``: compare, write the report, return the result (``drift`` flag)."""
    from pipelines import registry
    from seg_core.artifact import read_artifact_meta
    from seg_core.config import MaskSpec, from_dict

    source = registry.resolve_source(model)
    local = storage.fetch_artifact(source)
    baseline_file = local / BASELINE_FILE
    if not baseline_file.is_file():
        raise ValueError(f"{model}: the artifact has no {BASELINE_FILE} (trained before rayseg "
                         f"0.2); retrain it, or monitor with a newer model")
    baseline = json.loads(baseline_file.read_text())
    meta = read_artifact_meta(local)
    spec = from_dict(MaskSpec, meta["mask_spec"])
    rows = read_predictions(predictions, since=since,
                            weights_sha256=meta.get("weights_sha256") if same_weights else None)
    live = row_features(rows, spec)
    result = compare(baseline, live, thresholds)
    result.update(model=model, model_source=source, predictions=predictions, since=since)
    write_report(result, baseline, live, out)
    log(format_result(result, out))
    return result


def format_result(result: Mapping[str, Any], out: str) -> str:
    head = (f"monitor: {result['live_rows']} live rows against {result['baseline_rows']} "
            f"baseline images; ")
    if not result["judged"]:
        return head + f"too few live rows to judge (report: {out}/report.md)"
    if not result["drift"]:
        return head + f"no drift (report: {out}/report.md)"
    return head + "DRIFT: " + "; ".join(result["flags"]) + f" (report: {out}/report.md)"


def write_report(result: Mapping[str, Any], baseline: Mapping[str, Any],
                 live: Mapping[str, Any], out: str) -> None:
    """``report.json``, ``report.md`` and ``drift.png`` under ``out`` (local or object storage)."""
    if not storage.is_local(out):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            write_report(result, baseline, live, tmp)
            storage.copy_dir_from_local(tmp, out)
        return
    directory = Path(storage.strip_scheme(out))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    _plot(baseline, live, directory / "drift.png")
    lines = [f"# Drift report: {result['model']}", "",
             f"{result['live_rows']} live prediction rows from `{result['predictions']}`"
             f"{' since ' + str(result['since']) if result['since'] else ''}, against "
             f"{result['baseline_rows']} val images predicted at training time.", "",
             "**Verdict: " + ("drift: " + "; ".join(result["flags"]) if result["drift"]
                              else "no drift") + "**" + ("" if result["judged"] else
                                                         " (too few rows to judge)"), "",
             "## Class areas (share of pixels per image)", "",
             "| class | baseline mean | live mean | KS | p-value | PSI | shifted |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for c in [*result["classes"], result["confidence"]]:
        lines.append(f"| {c['name']} | {c['baseline_mean']} | {c['live_mean']} | {c['ks']} | "
                     f"{c['p_value']:.3g} | {c['psi']} | {'**yes**' if c['shifted'] else 'no'} |")
    low, empty = result["low_confidence"], result["empty"]
    lines += ["", "## Rates", "", "| figure | baseline | live | flagged |", "|---|---:|---:|---|",
              f"| empty masks | {empty['baseline']} | {empty['live']} | "
              f"{'**yes**' if empty['flagged'] else 'no'} |",
              f"| mean confidence < {low['threshold']} | {low['baseline']} | {low['live']} | "
              f"{'**yes**' if low['flagged'] else 'no'} |",
              "", "![class areas and confidence, baseline vs live](drift.png)", "",
              f"Thresholds: {result['thresholds']}", ""]
    (directory / "report.md").write_text("\n".join(lines))


def _plot(baseline: Mapping[str, Any], live: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(baseline["class_names"]) + ["mean confidence"]
    series = list(zip(baseline["area"], live["area"])) + \
        [(baseline["confidence"], live["confidence"])]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name, (before, after) in zip(axes[0], names, series):
        top = max([*before, *after, 1e-6])
        bins = np.linspace(0, top, 16)
        ax.hist(before, bins=bins, alpha=0.55, density=True, label="baseline (val)")
        ax.hist(after, bins=bins, alpha=0.55, density=True, label="live")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
