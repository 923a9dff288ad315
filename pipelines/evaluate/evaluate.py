"""Score predictions against ground truth: per-class metrics, confusion matrix, bootstrap CIs.

``rayseg evaluate --predictions OUT --manifest MANIFEST [--model URI] [--split val] --out DIR``::

    predictions (predictions.scan) --map_batches(score_batch)--> per-image counts (tp, fp, fn, tn)
    manifest masks (same MaskSpec) ---^                          -> summed on the driver
                                                                 -> report.json, report.md, overlays

``OUT`` is a ``rayseg predict`` output or an endpoint's log (``out_uri`` of ``rayseg serve``).
A batch row is matched to its truth row by id; a logged request has no manifest id, so it is
matched by content: the truth image whose bytes have the row's ``source_sha256``.

Predicted masks are stored at the input's full resolution, and truth masks are decoded from the
original files with the artifact's own :class:`MaskSpec` (recorded beside the predictions:
:func:`pipelines.predictions.model_record`), so scores are computed pixel for pixel at full
resolution.  Counts are integers per image; every
reduction (micro, macro, per-image; :func:`seg_core.metrics.compute_metrics`) and every bootstrap
resample is computed from those counts, never by averaging batch scores.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
import typing
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage
from pipelines.config import EvaluateConfig
from pipelines.model import InputLimits
from pipelines.predictions import model_record, read_quarantine, scan
from pipelines.records import COUNT_SCHEMA, decode_prediction
from seg_core.codecs import instance_classes
from seg_core.config import EmptyPolicy, MaskSpec, from_dict
from seg_core.errors import InputError
from seg_core.metrics import SCORES, Reduction

REDUCTIONS = typing.get_args(Reduction)
# ------------------------------------------------------------------------ per-image counting


def score_mask(pred: np.ndarray, truth: np.ndarray, spec: MaskSpec) -> dict[str, np.ndarray]:
    """Counts ``tp, fp, fn, tn`` (K each) and ``confusion`` (K x K, multi-class) of one image.

    ``pred`` is H x W class ids (or K x H x W {0, 1} multi-label); ``truth`` is what
    :func:`seg_core.codecs.decode_mask` gives for ``spec``.  Shapes must match exactly.
    """
    from seg_core.metrics import confusion_matrix, mask_counts

    if pred.shape != truth.shape:
        raise InputError("size_mismatch", f"prediction is {pred.shape}, truth mask is "
                         f"{truth.shape}", hint="predictions must be at the mask's resolution")
    counts = mask_counts(pred, truth, spec)
    if spec.multilabel:
        return {**counts, "confusion": np.zeros(0, np.int64)}
    return {**counts, "confusion": confusion_matrix(pred, truth, spec.num_classes,
                                                    spec.ignore_index)}


def score_batch(batch: pa.Table, truth: dict[str, tuple[str | None, str | None]],
                spec: dict[str, Any], storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Ray Data stage: prediction rows -> :data:`COUNT_SCHEMA` rows (ids not in ``truth`` dropped).

    ``truth`` maps id -> (image URI, mask URI).  A prediction is scored only if it was made from
    that very image: same source URI and same SHA-256 of its bytes (an id can name another
    image in another manifest, or the file changed since); else its row gets ``source_mismatch``.
    A truth mask that cannot be read or does not fit gives a row with its reason as ``status``
    and no counts, so it is reported rather than silently skipped.
    """
    from pipelines.ingest import read_limited, read_mask

    mask_spec = from_dict(MaskSpec, spec)
    out = []
    for row in batch.to_pylist():
        if row["id"] not in truth:
            continue
        image_uri, uri = truth[row["id"]]
        try:
            if uri is None:
                raise InputError("missing_mask", "the manifest gives no mask for this image")
            _check_source(row, image_uri, read_limited, storage_options)
            labels = None
            if mask_spec.instance_labels:   # the truth's objects, and the classes they give
                labels = _truth_labels(uri, storage_options)
                mask = instance_classes(labels, mask_spec)
            else:
                mask = read_mask(uri, mask_spec, storage_options)  # multi-label: one per class
            predicted = decode_prediction(row, mask_spec)
            counts = score_mask(predicted, mask, mask_spec)
            counts.update(calibration_sums(row, predicted, mask, mask_spec))
            objects = _object_scores(row, labels)
        except FileNotFoundError:
            out.append(_unscored(row["id"], "missing_mask", f"{uri}: no such file"))
            continue
        except InputError as error:
            out.append(_unscored(row["id"], error.reason, str(error)))
            continue
        out.append({"id": row["id"], "status": "ok", "message": None, "instances": objects,
                    **{k: v.reshape(-1).tolist() for k, v in counts.items()}})
    return pa.Table.from_pylist(out, schema=COUNT_SCHEMA)


def _truth_labels(uri: str, storage_options: dict[str, Any] | None) -> np.ndarray:
    from pipelines.ingest import read_mask_bytes
    from seg_core.codecs import decode_instance_labels

    data = read_mask_bytes(uri, storage_options)
    if data is None:
        raise FileNotFoundError(f"{uri}: a mask file is missing")
    return decode_instance_labels(data, source=uri)


def _object_scores(row: dict[str, Any], truth: np.ndarray | None) -> dict[str, float] | None:
    """:func:`seg_core.instances.instance_metrics` of the row's objects against the truth's,
    when both are there (instance-labelled truth, a prediction made with ``instances``)."""
    from PIL import Image

    from seg_core.instances import instance_metrics

    if truth is None or row.get("instance_png") is None:
        return None
    predicted = np.asarray(Image.open(io.BytesIO(row["instance_png"])), np.int32)
    if predicted.shape != truth.shape:
        return None   # score_mask refused the masks already
    found = instance_metrics(truth, predicted)
    return {key: float(found[key]) for key in ("map", "tp", "fp", "fn", "iou_sum", "splits",
                                               "merges", "truth_objects", "pred_objects")}


def calibration_sums(row: dict[str, Any], predicted: np.ndarray, truth: np.ndarray,
                     spec: MaskSpec) -> dict[str, np.ndarray]:
    """Per confidence bin (:data:`seg_core.calibration.BINS`), the pixels, their confidence
    summed and how many were right, from the row's 8-bit confidence map; empty without one, and
    for multi-label rows (whose map is the least sure class decision, not each class's)."""
    from PIL import Image

    from seg_core.calibration import calibration_bins

    if spec.multilabel or row.get("confidence_png") is None:
        return {}
    confidence = np.asarray(Image.open(io.BytesIO(row["confidence_png"])), np.float64) / 255.0
    valid = truth != spec.ignore_index
    bins = calibration_bins(confidence[valid], (predicted == truth)[valid])
    pixels = np.asarray(bins["pixels"], np.int64)
    return {"calibration_pixels": pixels,
            "calibration_confidence": np.asarray(bins["confidence"]) * pixels,
            "calibration_correct": np.rint(np.asarray(bins["accuracy"]) * pixels).astype(np.int64)}


def _check_source(row: dict[str, Any], image_uri: str | None, read: Callable[..., Any],
                  storage_options: dict[str, Any] | None) -> None:
    """Refuse to score a prediction of another image than the truth row's."""
    if row.get("source_uri") and image_uri and row["source_uri"] != image_uri:
        raise InputError("source_mismatch", f"the prediction was made from {row['source_uri']}, "
                         f"the truth row's image is {image_uri}", source=image_uri,
                         hint="ids collide between the two sources: predict this manifest into "
                              "a fresh --out, or give both the same explicit ids")
    data = read(image_uri, storage_options) if image_uri and row.get("source_sha256") else None
    if data is not None and hashlib.sha256(data).hexdigest() != row["source_sha256"]:
        raise InputError("source_mismatch", "the image changed since it was predicted "
                         "(SHA-256 differs)", source=image_uri,
                         hint="predict it again (into a fresh --out) before scoring")


def _unscored(id_: str, reason: str, message: str) -> dict[str, Any]:
    return {"id": id_, "status": reason, "message": message}


def _quarantined(predictions: str, truth: Mapping[str, Any]) -> pa.Table:
    """Truth rows that ``rayseg predict`` quarantined: unscored, with predict's reason, rather
    than reported as missing predictions."""
    rows = read_quarantine(predictions).to_pylist()
    return pa.Table.from_pylist([_unscored(r["id"], r["reason"], f"quarantined by predict: "
                                           f"{r['message']}") for r in rows if r["id"] in truth],
                                schema=COUNT_SCHEMA)


# ------------------------------------------------------------------------- aggregate scores


def summarize(counts: dict[str, np.ndarray], spec: MaskSpec, empty_policy: EmptyPolicy
              ) -> dict[str, Any]:
    """Micro, macro and per-image metrics from per-image counts (each N x K int64)."""
    from seg_core.metrics import compute_metrics

    args = (counts["tp"], counts["fp"], counts["fn"], counts["tn"])
    return {reduction: compute_metrics(*args, reduction=reduction, empty_policy=empty_policy,
                                       multilabel=spec.multilabel)
            for reduction in REDUCTIONS}


def bootstrap_ci(counts: dict[str, np.ndarray], spec: MaskSpec, empty_policy: EmptyPolicy, *,
                 resamples: int, seed: int) -> dict[str, Any]:
    """95% percentile intervals over images: resample image indices with replacement.

    Each resample re-sums the integer counts and re-scores them, so micro and macro intervals
    honour the same reductions as the point estimates.  Seeded, hence reproducible.
    """
    n = counts["tp"].shape[0]
    if resamples == 0 or n == 0:
        return {"resamples": 0, "seed": seed}
    rng = np.random.default_rng(seed)
    draws: dict[str, dict[str, list[float]]] = {r: {s: [] for s in SCORES} for r in REDUCTIONS}
    per_class: dict[str, list[list[float]]] = {s: [] for s in ("iou", "dice")}
    for _ in range(resamples):
        index = rng.integers(0, n, size=n)
        metrics = summarize({k: v[index] for k, v in counts.items()}, spec, empty_policy)
        for reduction in REDUCTIONS:
            for score in SCORES:
                draws[reduction][score].append(metrics[reduction][score])
        for score in per_class:
            per_class[score].append(metrics["macro"]["per_class"][score])
    return {"resamples": resamples, "seed": seed,
            **{r: {s: _interval(v) for s, v in draws[r].items()} for r in REDUCTIONS},
            "per_class": {s: [_interval(col) for col in np.asarray(v, float).T]
                          for s, v in per_class.items()}}


def _interval(values: Any) -> list[float | None]:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return [None, None]
    low, high = np.percentile(arr, [2.5, 97.5])
    return [float(low), float(high)]


# ----------------------------------------------------------------------------------- the run


def run_evaluate(cfg: EvaluateConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Predict first if asked, score, and write ``report.json``, ``report.md`` and overlays."""
    import ray
    from ray.data import DataContext

    from pipelines.evaluate.report import write_report
    from pipelines.ingest import pair_table, select_rows, table_dataset
    from pipelines.raycluster import wait_note

    started = time.perf_counter()
    DataContext.get_current().enable_progress_bars = cfg.progress
    predictions = _predict_first(cfg, log) if cfg.model else cfg.predictions
    record = model_record(predictions)
    spec = from_dict(MaskSpec, record["mask_spec"])
    if cfg.mask_values is not None:
        spec = dataclasses.replace(spec, mask_values=tuple(cfg.mask_values))
    truth = select_rows(pair_table(cfg.manifest), split=cfg.split)
    truth_masks = {id_: (image, mask) for id_, image, mask in zip(
        truth["id"].to_pylist(), truth["image_uri"].to_pylist(), truth["mask_uri"].to_pylist())}
    rows = scan(predictions, [*_SCORED, "request_id"], weights=record.get("weights_sha256"))
    if not rows.num_rows:
        raise ValueError(f"{predictions}: no prediction rows; run `rayseg predict` first (or "
                         f"send the endpoint requests)")
    if pc.any(pc.is_valid(rows["request_id"])).as_py():
        rows = match_by_content(rows, truth_masks)
    rows = rows.select(_SCORED)
    kwargs = {"truth": truth_masks, "spec": _spec_dict(spec),
              "storage_options": storage.resolve_options()}
    if note := wait_note("evaluate", {"CPU": 1.0}):   # a scoring task
        log(note)
    scored = table_dataset(rows, _ROWS_PER_TASK).map_batches(
        score_batch, batch_format="pyarrow", fn_kwargs=kwargs).to_arrow_refs()
    table = pa.concat_tables([*ray.get(scored), _quarantined(predictions, truth_masks)]
                             ).sort_by("id")
    report = build_report(table, spec, cfg, truth_ids=truth_masks, predictions=predictions,
                          record=record)
    report["seconds"] = round(time.perf_counter() - started, 2)
    write_report(report, cfg.out, spec, truth=truth, predictions=rows,
                 limits=InputLimits.of_record(record))
    write_reproducibility(cfg, record, predictions)
    unscored = f", {len(report['unscored'])} not scored" if report["unscored"] else ""
    log(f"evaluate: {report['images_scored']} images scored{unscored} "
        f"(split={cfg.split}); macro IoU {report['metrics']['macro']['iou']:.4f}, "
        f"micro IoU {report['metrics']['micro']['iou']:.4f}; report in {cfg.out}")
    return report


_SCORED = ["id", "source_uri", "source_sha256", "mask_png", "class_mask_pngs", "confidence_png",
           "instance_png"]
_ROWS_PER_TASK = 64   # scoring reads each row's truth mask: blocks of this many run in parallel


def match_by_content(rows: pa.Table, truth: Mapping[str, tuple[str | None, str | None]],
                     storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Logged requests -> the truth rows they were made from, by the SHA-256 of the image bytes.

    A request's id is its request id, and its source an upload name; the image it carried is
    known by ``source_sha256``.  Each row becomes the truth row's id and image URI (the first
    request per truth image counts; requests of images outside the truth are left out)."""
    from pipelines.ingest import read_limited

    by_digest: dict[str, tuple[str, str | None]] = {}
    for id_, (image_uri, _) in truth.items():
        data = read_limited(image_uri, storage_options) if image_uri else None
        if data is not None:
            by_digest.setdefault(hashlib.sha256(data).hexdigest(), (id_, image_uri))
    keep, ids, sources, seen = [], [], [], set()
    for index, digest in enumerate(rows["source_sha256"].to_pylist()):
        match = by_digest.get(digest)
        if match is None or match[0] in seen:
            continue
        seen.add(match[0])
        keep.append(index)
        ids.append(match[0])
        sources.append(match[1])
    matched = rows.take(keep)
    matched = matched.set_column(matched.schema.get_field_index("id"), "id",
                                 pa.array(ids, pa.string()))
    return matched.set_column(matched.schema.get_field_index("source_uri"), "source_uri",
                              pa.array(sources, pa.string()))


def write_reproducibility(cfg: EvaluateConfig, record: dict[str, Any], predictions: str) -> None:
    """``<out>/reproducibility.json``: the scored model by weights hash, the truth manifest by
    content hash, the predictions scored, package versions."""
    from seg_core.artifact import package_versions

    manifest_sha = hashlib.sha256(storage.read_bytes(cfg.manifest)).hexdigest()
    body = {"model": {k: record.get(k) for k in ("uri", "source", "registry_uri", "name",
                                                 "version", "weights_sha256", "tta", "engine")},
            "manifest": {"uri": cfg.manifest, "sha256": manifest_sha, "split": cfg.split},
            "predictions": predictions, "empty_policy": cfg.empty_policy,
            "packages": package_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_bytes(storage.join_uri(cfg.out, "reproducibility.json"),
                        (json.dumps(body, indent=2) + "\n").encode())


def build_report(table: pa.Table, spec: MaskSpec, cfg: EvaluateConfig, *,
                 truth_ids: dict[str, Any], predictions: str,
                 record: dict[str, Any]) -> dict[str, Any]:
    """The content of ``report.json`` from scored rows (:data:`COUNT_SCHEMA`)."""
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise ValueError(f"evaluate: no image could be scored ({len(truth_ids)} truth rows in "
                         f"split {cfg.split!r}, {len(rows)} with predictions); check that "
                         f"--manifest and --split match the predicted inputs")
    counts = {k: np.asarray([r[k] for r in ok], dtype=np.int64) for k in ("tp", "fp", "fn", "tn")}
    metrics = summarize(counts, spec, cfg.empty_policy)
    k = spec.num_classes
    confusion = None if spec.multilabel else \
        np.asarray([r["confusion"] for r in ok], np.int64).sum(axis=0).reshape(k, k).tolist()
    image_iou = metrics["per_image"]["per_image"]["iou"]
    ranked = sorted(zip([r["id"] for r in ok], image_iou), key=lambda p: (-_rank(p[1]), p[0]))
    scored_ids = {r["id"] for r in rows}
    reported = record.get("reported_metrics") or {}
    return {
        "predictions": predictions, "manifest": cfg.manifest, "split": cfg.split,
        "model": {k_: record.get(k_) for k_ in ("uri", "source", "name", "version",
                                                "weights_sha256", "registry_uri", "tta")},
        "mask_spec": _spec_dict(spec), "class_names": list(spec.names),
        "empty_policy": cfg.empty_policy,
        "empty_policy_meaning": _POLICY_TEXT[cfg.empty_policy],
        "images_in_split": len(truth_ids), "images_scored": len(ok),
        "missing_predictions": sorted(set(truth_ids) - scored_ids),
        "unscored": [{"id": r["id"], "reason": r["status"], "message": r["message"]}
                     for r in rows if r["status"] != "ok"],
        "metrics": metrics, "confusion_matrix": confusion,
        "training_reported": _compare(reported, metrics["macro"]),
        "bootstrap_ci95": bootstrap_ci(counts, spec, cfg.empty_policy,
                                       resamples=cfg.bootstrap, seed=cfg.seed),
        "calibration": _calibration(ok, record),
        "instances": _instances(ok, spec),
        "per_image_iou": dict(ranked),
        "best": [i for i, _ in ranked[: cfg.overlays]],
        "worst": [i for i, _ in ranked[::-1][: cfg.overlays]],
        "worst_classes": _worst_classes(ok, spec, [i for i, _ in ranked[::-1][: cfg.overlays]]),
    }


def _worst_classes(rows: list[dict[str, Any]], spec: MaskSpec,
                   ids: list[str]) -> dict[str, int]:
    """Per image of ``ids``, the class with the most wrong pixels (false positives plus false
    negatives; the background left out of a multi-class mask): what report.html explains."""
    by_id = {r["id"]: r for r in rows}
    first = 0 if spec.multilabel or spec.num_classes == 1 else 1
    found = {}
    for image_id in ids:
        errors = np.add(by_id[image_id]["fp"], by_id[image_id]["fn"])[first:]
        found[image_id] = first + int(np.argmax(errors))
    return found


def _instances(rows: list[dict[str, Any]], spec: MaskSpec) -> dict[str, Any] | None:
    """The objects' scores over the images (:func:`seg_core.instances.aggregate_instance_metrics`),
    or None when the truth is not instance-labelled; why none were scored otherwise."""
    from seg_core.instances import aggregate_instance_metrics

    if not spec.instance_labels:
        return None
    scored = [r["instances"] for r in rows if r.get("instances")]
    if not scored:
        return {"images": 0, "why_none": "no prediction carries objects: predict with "
                                          "instances: components or watershed"}
    counts = ("tp", "fp", "fn", "splits", "merges", "truth_objects", "pred_objects")
    return aggregate_instance_metrics([{**r, **{k: int(r[k]) for k in counts}}
                                       for r in scored])


def _calibration(rows: list[dict[str, Any]], record: dict[str, Any]) -> dict[str, Any]:
    """Pixel calibration of the scored rows: ECE and the reliability bins (from the rows'
    confidence maps), with the temperature the model applied and, from its artifact, the val
    ECE before and after training fitted it."""
    from seg_core.calibration import expected_calibration_error

    fitted = record.get("calibration") or {}
    found: dict[str, Any] = {"temperature": record.get("temperature", 1.0),
                             "val_ece_before_scaling": fitted.get("ece_before"),
                             "val_ece_after_scaling": fitted.get("ece_after")}
    with_maps = [r for r in rows if r.get("calibration_pixels")]
    if not with_maps:
        found["ece"] = None
        found["why_none"] = ("no confidence maps in these predictions (predict with "
                             "--confidence-maps; multi-label maps do not say each class's)")
        return found
    pixels = np.sum([r["calibration_pixels"] for r in with_maps], axis=0)
    safe = np.maximum(pixels, 1)
    bins = {"pixels": pixels.tolist(),
            "confidence": (np.sum([r["calibration_confidence"] for r in with_maps], axis=0)
                           / safe).tolist(),
            "accuracy": (np.sum([r["calibration_correct"] for r in with_maps], axis=0)
                         / safe).tolist()}
    found.update(ece=round(expected_calibration_error(bins), 6), images=len(with_maps),
                 bins=bins)
    return found


def _compare(reported: dict[str, Any], macro: dict[str, Any]) -> dict[str, Any]:
    """Training's validation mIoU/mDice (from the artifact) next to ours, and the differences."""
    pairs = {"miou": macro["iou"], "mdice": macro["dice"]}
    found = {k: reported[k] for k in pairs if isinstance(reported.get(k), (int, float))}
    return {"reported": found,
            "difference": {k: pairs[k] - v for k, v in found.items()}}


_POLICY_TEXT = {
    "nan": "a class absent from both truth and prediction is left out of the means (0/0 = nan)",
    "one": "a class absent from both truth and prediction scores 1",
    "zero": "a class absent from both truth and prediction scores 0",
}


def _rank(value: float) -> float:
    return -1.0 if value is None or np.isnan(value) else value


def _spec_dict(spec: MaskSpec) -> dict[str, Any]:
    from seg_core.config import to_dict

    return to_dict(spec)


def _predict_first(cfg: EvaluateConfig, log: Callable[[str], None]) -> str:
    """Predict the split with ``cfg.model`` into ``--predictions`` (or ``<out>/predictions``);
    resumable like any ``rayseg predict`` run, so a second evaluate only scores."""
    from pipelines.predict.predict import PredictConfig, run_predict

    out = cfg.predictions or storage.join_uri(cfg.out, "predictions")
    run_predict(PredictConfig(model=cfg.model, input=cfg.manifest, out=out, split=cfg.split,
                              confidence_maps=True,   # the report's calibration needs them
                              engine=cfg.engine, postprocess=cfg.postprocess,
                              instances=cfg.instances,
                              address=cfg.address, progress=cfg.progress),
                log=log)
    return out
