"""Evaluation report files: ``report.json`` (everything), ``report.md`` and ``report.html`` (for
people; :mod:`.report_html` embeds its tables, charts and images), overlays.

The JSON is strict (NaN written as ``null``); the Markdown shows the headline table with 95%
bootstrap intervals, per-class scores, the confusion matrix (rows = truth, columns = prediction),
the empty-mask policy and the best/worst images with their overlay files.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines import storage
from pipelines.evaluate.overlays import render_overlays, render_why
from pipelines.evaluate.plots import reliability_png
from pipelines.evaluate.report_html import score_text, score_with_interval, write_html
from seg_core.metrics import SCORES

if TYPE_CHECKING:
    from pipelines.model import InputLimits
    from seg_core.config import MaskSpec



def write_report(report: dict[str, Any], out: str, spec: "MaskSpec", *,
                 truth: pa.Table, predictions: pa.Table, limits: "InputLimits") -> None:
    """Render overlays into ``<out>/overlays/``, then write ``report.json``, ``report.md`` and
    ``report.html``.  ``predictions``: the scored rows' ids and masks; ``limits``: how the
    predicting model decodes an image (an image it refuses gets no overlay, and
    ``report["overlays_refused"]`` says why)."""
    report["overlays"], report["overlays_refused"] = {}, []
    for group in ("best", "worst"):
        report["overlays"][group], refused = render_overlays(
            report[group], group, truth=truth, predictions=predictions, spec=spec,
            scores=report["per_image_iou"], out_dir=storage.join_uri(out, "overlays"),
            limits=limits)
        report["overlays_refused"] += refused
    report["why"], report["why_missing"] = _why(report, out, spec, truth=truth,
                                                predictions=predictions, limits=limits)
    calibration = report.get("calibration") or {}
    if calibration.get("ece") is not None:
        with tempfile.TemporaryDirectory() as tmp:
            png = reliability_png(calibration["bins"], Path(tmp) / "reliability.png",
                                  ece=calibration["ece"])
            storage.write_bytes(storage.join_uri(out, "reliability.png"), png.read_bytes())
        calibration["diagram"] = "reliability.png"
    text = json.dumps(_strict(report), indent=2, allow_nan=False) + "\n"
    storage.write_bytes(storage.join_uri(out, "report.json"), text.encode())
    storage.write_bytes(storage.join_uri(out, "report.md"), render_markdown(report).encode())
    write_html(report, out)


def _why(report: dict[str, Any], out: str, spec: "MaskSpec", *, truth: pa.Table,
         predictions: pa.Table, limits: "InputLimits") -> tuple[list[str | None], str]:
    """The worst images' Grad-CAM panels (:func:`render_why`), when the predicting model can be
    opened; else why not."""
    from pipelines import registry

    model = report["model"]
    uri = model.get("source") or model.get("uri")
    if not report.get("worst"):
        return [], "no worst images asked for"
    if not uri:
        return [], "the predictions' model record names no artifact to explain with"
    try:
        uri = registry.resolve(uri).source if registry.is_models_uri(uri) else uri
    except Exception as error:  # noqa: BLE001 - the report stands without this panel
        return [], f"{uri} could not be resolved ({type(error).__name__}: {error})"
    return render_why(report["worst"], report["worst_classes"], truth=truth,
                      predictions=predictions, spec=spec, model_uri=uri,
                      out_dir=storage.join_uri(out, "overlays"), limits=limits)


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: headline metrics with CIs, per-class table, confusion matrix, extremes."""
    ci = report["bootstrap_ci95"]
    names = report["class_names"]
    lines = [
        f"# Evaluation: {report['model'].get('name')} {report['model'].get('version')}",
        "",
        f"- predictions: `{report['predictions']}`",
        f"- ground truth: `{report['manifest']}` (split: {report['split'] or 'all'})",
        f"- images scored: {report['images_scored']} of {report['images_in_split']} "
        f"(missing predictions: {len(report['missing_predictions'])}, "
        f"unscored: {len(report['unscored'])})",
        f"- empty-mask policy `{report['empty_policy']}`: {report['empty_policy_meaning']}",
        f"- 95% intervals: percentile bootstrap over images, {ci.get('resamples', 0)} resamples, "
        f"seed {ci.get('seed')}",
        "",
        "## Metrics",
        "",
        "| reduction | " + " | ".join(SCORES) + " | pixel accuracy |",
        "|---|" + "---|" * (len(SCORES) + 1),
    ]
    for reduction, metrics in report["metrics"].items():
        cells = [_with_ci(metrics[s], ci.get(reduction, {}).get(s)) for s in SCORES]
        lines.append(f"| {reduction} | " + " | ".join(cells)
                     + f" | {score_text(metrics['pixel_accuracy'])} |")
    reported = report.get("training_reported", {}).get("reported", {})
    if reported:
        lines += ["", "Training reported on its validation split: " + ", ".join(
            f"{k} {score_text(v)} (here {score_text(v + report['training_reported']['difference'][k])}, "
            f"difference {report['training_reported']['difference'][k]:+.4f})"
            for k, v in reported.items())]
    per_class = report["metrics"]["macro"]["per_class"]
    lines += ["", "## Per class (counts summed over images)", "",
              "| class | " + " | ".join(SCORES) + " | support (pixels) |",
              "|---|" + "---|" * (len(SCORES) + 1)]
    for k, name in enumerate(names):
        cells = [_with_ci(per_class[s][k], ci.get("per_class", {}).get(s, [None] * (k + 1))[k])
                 if s in ("iou", "dice") else score_text(per_class[s][k]) for s in SCORES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per_class['support'][k]} |")
    if report["confusion_matrix"] is not None:
        lines += ["", "## Confusion matrix (rows: truth, columns: prediction; pixels)", "",
                  "| truth \\ pred | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for name, row in zip(names, report["confusion_matrix"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    for group in ("best", "worst"):
        lines += ["", f"## {group.capitalize()} images (per-image mean IoU)", ""]
        refused = {r["id"]: r["reason"] for r in report.get("overlays_refused", [])}
        for image_id, path in zip(report[group], report["overlays"].get(group, [])):
            link = f"[overlay]({path})" if path else f"no overlay: {refused.get(image_id)}"
            lines.append(f"- `{image_id}`: {score_text(report['per_image_iou'][image_id])} "
                         f"({link})")
    calibration = report.get("calibration") or {}
    lines += ["", "## Calibration of pixel confidence", ""]
    if calibration.get("ece") is None:
        lines.append(f"- not measured: {calibration.get('why_none', 'no confidence maps')}")
    else:
        lines.append(f"- expected calibration error (ECE, 15 bins, pixel-weighted, from the "
                     f"8-bit confidence maps of {calibration['images']} images): "
                     f"**{calibration['ece']:.4f}** ([reliability diagram](reliability.png))")
    lines.append(f"- temperature the model applied: {calibration.get('temperature', 1.0)}")
    if calibration.get("val_ece_before_scaling") is not None:
        lines.append(f"- training's fit on its val split: ECE "
                     f"{calibration['val_ece_before_scaling']:.4f} before temperature scaling, "
                     f"{calibration['val_ece_after_scaling']:.4f} after")
    objects = report.get("instances")
    if objects is not None:
        lines += ["", "## Objects (instance-labelled truth)", ""]
        if not objects.get("images"):
            lines.append(f"- not scored: {objects['why_none']}")
        else:
            lines += [f"- images: {objects['images']}; objects: {int(objects['truth_objects'])} "
                      f"true, {int(objects['pred_objects'])} predicted",
                      f"- mean average precision over IoU 0.5:0.05:0.95 (Data Science Bowl "
                      f"2018): **{objects['map']:.4f}**",
                      f"- panoptic quality {objects['pq']:.4f} (SQ {objects['sq']:.4f} x RQ "
                      f"{objects['rq']:.4f}); at IoU > 0.5 precision {objects['precision']:.4f}, "
                      f"recall {objects['recall']:.4f}",
                      f"- splits {int(objects['splits'])}, merges {int(objects['merges'])}"]
    if report["unscored"]:
        lines += ["", "## Unscored", ""]
        lines += [f"- `{u['id']}`: {u['reason']}: {u['message']}" for u in report["unscored"]]
    return "\n".join(lines) + "\n"


def _with_ci(value: float | None, interval: list[float | None] | None) -> str:
    return score_with_interval(value, interval, "{value} [{low}, {high}]")


def _strict(value: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
