"""``report.html``: the evaluation report as one self-contained page, beside ``report.md``.

Everything is inside the file: the metrics tables, the confusion matrix as a heat map (a table
whose cells are shaded by the share of their truth row), the per-class bar chart (SVG), the best
and worst overlays, the worst images' "why" panels (Grad-CAM of the class each got most wrong,
when the predicting model can be opened) and the training learning curve (PNG), each image a
base64 data URI, so the
page opens offline and still works when copied alone.  The charts are SVG and HTML written here
rather than matplotlib figures: every evaluation writes this file, and like the overlays it must
stay cheap.  The learning curve is the ``learning_curve.png`` that ``rayseg train`` saved in the
artifact named by the predictions' model record; without one, the section says why it is empty.
"""
from __future__ import annotations

import base64
import html
import math
from typing import Any, Mapping, Sequence

from pipelines import storage
from seg_core.metrics import SCORES

BAR_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")   # one per score, in SCORES order
_HEAT_RGB = "8, 81, 156"   # the heat map's ink; its alpha is the cell's share of the row

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d1d1f; margin: 0 auto; max-width: 1200px;
       padding: 1rem 1.5rem 3rem; }
table { border-collapse: collapse; margin: 0.8rem 0; }
th, td { padding: 0.3rem 0.6rem; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
small { color: #666; }
table.heat td { border: 1px solid #fff; min-width: 4.5rem; }
img { max-width: 100%; height: auto; }
#per-class-chart { width: min(100%, 560px); }
figure { margin: 0.6rem 0 1.2rem; }
figure.overlay img { min-width: min(100%, 768px); image-rendering: pixelated; }  /* small: 2x */
figcaption, .note { color: #555; font-size: 0.9rem; }
"""


def write_html(report: Mapping[str, Any], out: str) -> str:
    """Read the overlays (``report["overlays"]``, under ``out``) and the learning curve, and
    write ``<out>/report.html``; returns its URI."""
    overlays = {group: [storage.read_bytes(storage.join_uri(out, path)) if path else None
                        for path in paths]
                for group, paths in {**report.get("overlays", {}),
                                     "why": report.get("why") or [],
                                     "reliability": [(report.get("calibration") or {}).get(
                                         "diagram")]}.items()}
    curve, note = learning_curve(report)
    uri = storage.join_uri(out, "report.html")
    storage.write_bytes(uri, render_html(report, overlays, curve, note).encode())
    return uri


def learning_curve(report: Mapping[str, Any]) -> tuple[bytes | None, str]:
    """The trained artifact's ``learning_curve.png`` and ``""``, or None and why there is none."""
    uri = (report.get("model") or {}).get("uri")
    if not uri:
        return None, ("the predictions' model record names no artifact, so the training "
                      "history is not known")
    path = storage.join_uri(uri, "learning_curve.png")
    try:
        return storage.read_bytes(path), ""
    except OSError as error:   # FileNotFoundError, or storage that refuses the read
        return None, (f"{path} could not be read ({type(error).__name__}); `rayseg train` "
                      f"saves one with every artifact it writes")


def render_html(report: Mapping[str, Any], overlays: Mapping[str, Sequence[bytes | None]],
                curve_png: bytes | None, curve_note: str = "") -> str:
    """The whole page; ``overlays`` maps ``best``/``worst`` to PNG bytes in ``report`` order."""
    model = report["model"]
    title = f"Evaluation: {model.get('name')} {model.get('version')}"
    sections = [f"<h1>{_e(title)}</h1>", _facts(report), "<h2>Metrics</h2>",
                _metrics_table(report), _training_note(report),
                "<h2>Per class <small>(counts summed over images)</small></h2>",
                _per_class_table(report), _img(_svg_uri(per_class_svg(report)),
                                               "per-class scores", "per-class-chart"),
                "<h2>Confusion matrix <small>(rows: truth, columns: prediction; pixels, shaded "
                "by the share of the truth row)</small></h2>", _confusion(report)]
    for group in ("best", "worst"):
        sections += [f"<h2>{group.capitalize()} images <small>(per-image mean IoU)</small></h2>",
                     _overlays(report, group, overlays.get(group, ()))]
    sections += ["<h2>Calibration of pixel confidence</h2>",
                 _calibration(report, (overlays.get("reliability") or [None])[0])]
    sections += ["<h2>Why the worst images look as they do <small>(Grad-CAM of the class each "
                 "got most wrong, in red)</small></h2>", _why(report, overlays.get("why", ()))]
    sections += ["<h2>Learning curve</h2>",
                 _img(_png_uri(curve_png), "learning curve", "learning-curve") if curve_png
                 else f'<p class="note" id="learning-curve-note">No learning curve: '
                      f'{_e(curve_note)}.</p>']
    if report.get("unscored"):
        sections += ["<h2>Unscored</h2><ul>", *(f"<li><code>{_e(u['id'])}</code>: "
                     f"{_e(u['reason'])}: {_e(u['message'])}</li>" for u in report["unscored"]),
                     "</ul>"]
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def per_class_svg(report: Mapping[str, Any]) -> str:
    """Grouped bars: each class's IoU, Dice, precision and recall on a 0..1 axis."""
    names = report["class_names"]
    per_class = report["metrics"]["macro"]["per_class"]
    bar, gap, left, top, plot_h = 14, 24, 40, 30, 180
    width = max(left + len(names) * (len(SCORES) * bar + gap), left + len(SCORES) * 80) + 10
    height = top + plot_h + 40

    def y(score: float) -> float:
        return top + plot_h * (1 - score)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="#fff"/>']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     f'stroke="#ddd"/><text x="{left - 4}" y="{y(tick) + 4:.1f}" '
                     f'text-anchor="end">{tick:g}</text>')
    for k, name in enumerate(names):
        x0 = left + gap / 2 + k * (len(SCORES) * bar + gap)
        for i, score in enumerate(SCORES):
            value = per_class[score][k]
            if value is None or math.isnan(value):
                continue
            parts.append(f'<rect x="{x0 + i * bar:.1f}" y="{y(value):.1f}" width="{bar - 1}" '
                         f'height="{plot_h * value:.1f}" fill="{BAR_COLOURS[i]}">'
                         f'<title>{_e(name)} {score} {value:.4f}</title></rect>')
        parts.append(f'<text x="{x0 + len(SCORES) * bar / 2:.1f}" y="{top + plot_h + 16}" '
                     f'text-anchor="middle">{_e(name)}</text>')
    for i, score in enumerate(SCORES):
        x = left + i * 80
        parts.append(f'<rect x="{x}" y="8" width="10" height="10" fill="{BAR_COLOURS[i]}"/>'
                     f'<text x="{x + 14}" y="17">{score}</text>')
    return "".join(parts) + "</svg>"


# ------------------------------------------------------------------------------ sections
def _facts(report: Mapping[str, Any]) -> str:
    ci = report["bootstrap_ci95"]
    items = [
        f"predictions: <code>{_e(report['predictions'])}</code>",
        f"ground truth: <code>{_e(report['manifest'])}</code> (split: "
        f"{_e(report['split'] or 'all')})",
        f"images scored: {report['images_scored']} of {report['images_in_split']} (missing "
        f"predictions: {len(report['missing_predictions'])}, unscored: "
        f"{len(report['unscored'])})",
        f"empty-mask policy <code>{_e(report['empty_policy'])}</code>: "
        f"{_e(report['empty_policy_meaning'])}",
        f"95% intervals: percentile bootstrap over images, {ci.get('resamples', 0)} resamples, "
        f"seed {ci.get('seed')}",
    ]
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _metrics_table(report: Mapping[str, Any]) -> str:
    ci = report["bootstrap_ci95"]
    rows = [[reduction, *(score_with_interval(metrics[s], ci.get(reduction, {}).get(s)) for s in SCORES),
             score_text(metrics["pixel_accuracy"])]
            for reduction, metrics in report["metrics"].items()]
    return _table("metrics", ["reduction", *SCORES, "pixel accuracy"], rows)


def _training_note(report: Mapping[str, Any]) -> str:
    compared = report.get("training_reported") or {}
    reported = compared.get("reported") or {}
    if not reported:
        return ""
    text = ", ".join(f"{k} {score_text(v)} (here {score_text(v + compared['difference'][k])}, difference "
                     f"{compared['difference'][k]:+.4f})" for k, v in reported.items())
    return f"<p>Training reported on its validation split: {_e(text)}</p>"


def _per_class_table(report: Mapping[str, Any]) -> str:
    per_class = report["metrics"]["macro"]["per_class"]
    ci = report["bootstrap_ci95"].get("per_class", {})
    rows = []
    for k, name in enumerate(report["class_names"]):
        cells = [score_with_interval(per_class[s][k], (ci.get(s) or [None] * (k + 1))[k])
                 if s in ("iou", "dice") else score_text(per_class[s][k]) for s in SCORES]
        rows.append([_e(name), *cells, str(per_class["support"][k])])
    return _table("per-class", ["class", *SCORES, "support (pixels)"], rows)


def _confusion(report: Mapping[str, Any]) -> str:
    matrix = report.get("confusion_matrix")
    if matrix is None:
        return ('<p class="note">No confusion matrix: multi-label classes overlap, so pixels '
                'are not assigned to one class each.</p>')
    names = report["class_names"]
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    body = []
    for name, row in zip(names, matrix):
        total = sum(row) or 1
        cells = []
        for value in row:
            share = value / total
            ink = "#fff" if share > 0.5 else "#1d1d1f"
            cells.append(f'<td style="background: rgba({_HEAT_RGB}, {share:.3f}); '
                         f'color: {ink}" title="{share:.1%} of truth {_e(name)}">{value}</td>')
        body.append(f"<tr><th>{_e(name)}</th>{''.join(cells)}</tr>")
    return (f'<table id="confusion" class="heat"><thead><tr><th>truth \\ pred</th>{head}</tr>'
            f"</thead><tbody>{''.join(body)}</tbody></table>")


def _overlays(report: Mapping[str, Any], group: str, pngs: Sequence[bytes | None]) -> str:
    if not pngs:
        return '<p class="note">None (the evaluation was asked for no overlays).</p>'
    figures = []
    refused = {r["id"]: r["message"] for r in report.get("overlays_refused", [])}
    for image_id, png in zip(report[group], pngs):
        score = score_text(report["per_image_iou"].get(image_id))
        if png is None:
            figures.append(f'<p class="note"><code>{_e(image_id)}</code>: mean IoU {score}; no '
                           f"overlay: {_e(refused.get(image_id, ''))}</p>")
            continue
        figures.append(f'<figure class="overlay {group}">'
                       f'{_img(_png_uri(png), f"{group}: {image_id}")}<figcaption>'
                       f"<code>{_e(image_id)}</code>: mean IoU {score} (image | truth | "
                       f"prediction | errors)</figcaption></figure>")
    return "".join(figures)


def _calibration(report: Mapping[str, Any], diagram: bytes | None) -> str:
    found = report.get("calibration") or {}
    if found.get("ece") is None:
        return f'<p class="note">Not measured: {_e(found.get("why_none", ""))}.</p>'
    text = (f'<p id="ece">Expected calibration error (15 bins, pixel-weighted): '
            f'<strong>{found["ece"]:.4f}</strong>; temperature applied '
            f'{_e(found.get("temperature"))}.</p>')
    return text + (_img(_png_uri(diagram), "reliability diagram", "reliability") if diagram
                   else "")


def _why(report: Mapping[str, Any], pngs: Sequence[bytes | None]) -> str:
    """The worst images' attribution panels (:func:`pipelines.evaluate.overlays.render_why`)."""
    if not any(pngs):
        why = report.get("why_missing") or "the class was nowhere in those images"
        return f'<p class="note" id="why-note">No map: {_e(why)}.</p>'
    names = report["class_names"]
    return "".join(
        f'<figure class="why">{_img(_png_uri(png), f"why: {image_id}")}<figcaption>'
        f'<code>{_e(image_id)}</code>: what the model looked at for '
        f'{_e(names[report["worst_classes"][image_id]])}</figcaption></figure>'
        for image_id, png in zip(report["worst"], pngs) if png is not None)


# ------------------------------------------------------------------------------ helpers
def _table(table_id: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(src: str, alt: str, img_id: str = "") -> str:
    ident = f' id="{img_id}"' if img_id else ""
    return f'<img{ident} src="{src}" alt="{_e(alt)}">'


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _svg_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode("ascii")


def score_with_interval(value: float | None, interval: Sequence[float | None] | None,
             template: str = "{value} <small>[{low}, {high}]</small>") -> str:
    """A score with its 95% interval; ``template`` places them (report.md has no ``<small>``)."""
    if not interval or interval[0] is None:
        return score_text(value)
    return template.format(value=score_text(value), low=score_text(interval[0]), high=score_text(interval[1]))


def score_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def _e(text: Any) -> str:
    return html.escape(str(text))
