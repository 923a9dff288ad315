"""What training fits on the val split after the weights: post-processing and calibration.

At the end of training (``tune_postprocess: true``, the default) and by ``rayseg
tune-postprocess``: up to :data:`POSTPROCESS_IMAGES` val pairs are read on this process (no Ray
job, like the drift baseline), predicted by the artifact with no post-processing, and
:func:`seg_core.postprocess.choose` keeps, per class, the rules that raise that class's val Dice
by more than its tolerance without lowering another's.  The rules and the evidence (every rule
tried, Dice before and after) go into ``artifact.json`` (:func:`seg_core.artifact.
write_postprocess`), where every engine applies them, and into ``metrics.json`` for training.
The same pass fits the confidence temperature (:mod:`seg_core.calibration`; ``calibrate: true``)
on the raw probabilities of those pairs, recorded in ``artifact.json`` under ``calibration``, and,
at the end of training, finishes the drift baseline from those probabilities once both are
recorded (:meth:`seg_core.inference.Segmenter.finish`): the val images go through the network
once, not once more for the baseline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

POSTPROCESS_IMAGES = 64   # val pairs the choice is made on (read and predicted on one process)
# Probabilities kept for the drift baseline (float32, K x H x W per image): 64 val images of
# 512 x 512 with 3 classes take 192 MiB.  Past it the baseline predicts the images again.
HELD_PROBS_BYTES = 512 * 2**20


def tune_postprocess(artifact_dir: Path, source: str, *, kind: str, split: str,
                     log: Callable[[str], None] = print,
                     limit: int = POSTPROCESS_IMAGES) -> tuple[Any, dict[str, Any]]:
    """Choose and record the post-processing of the local artifact in ``artifact_dir`` from the
    ``split`` rows of ``source`` (``kind``: manifest, prefix or shards); returns the rules and
    the evidence.  Pairs that do not decode are skipped (they were quarantined in training)."""
    found = fit_on_val(artifact_dir, source, kind=kind, split=split, log=log, limit=limit,
                       calibrate=False)
    return found["rules"], found["evidence"]


def fit_on_val(artifact_dir: Path, source: str, *, kind: str, split: str,
               log: Callable[[str], None] = print, limit: int = POSTPROCESS_IMAGES,
               postprocess: bool = True, calibrate: bool = True,
               baseline: bool = False) -> dict[str, Any]:
    """One pass over up to ``limit`` ``split`` pairs with the raw model (no post-processing,
    temperature 1): the post-processing rules (``postprocess``) and the confidence temperature
    (``calibrate``, :mod:`seg_core.calibration`), both written into the artifact's
    ``artifact.json``; with ``baseline``, then the drift baseline of the artifact as it now
    stands (:func:`pipelines.operate.monitor.write_baseline`'s ``baseline.json``) from the same
    probabilities.  Returns ``{"rules", "evidence", "calibration", "baseline"}`` (None where
    not asked)."""
    from pipelines.ingest import decode_pair, read_split_bytes
    from pipelines.model import open_model
    from pipelines.operate import monitor
    from seg_core.artifact import write_calibration, write_postprocess
    from seg_core.calibration import fit_temperature, sample_pixels
    from seg_core.config import PostProcess
    from seg_core.errors import InputError
    from seg_core.postprocess import choose

    model = open_model(str(artifact_dir), engine="torch", device="cpu",
                       postprocess=PostProcess())   # raw masks: the rules are what is chosen
    model.segmenter.temperature = 1.0              # raw confidences: T is what is fitted
    spec, limits = model.mask_spec, model.limits
    fields = frozenset({"mask", "probs"} if calibrate or baseline else {"mask"})
    rows = read_split_bytes(source, kind=kind, split=split, limit=limit).to_pylist()
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    samples: list[tuple[np.ndarray, np.ndarray]] = []
    # every image's probabilities, for the baseline; None once one is missing or they are
    # over HELD_PROBS_BYTES (the baseline then predicts the images again, on its own terms)
    held: list[np.ndarray] | None = [] if baseline else None
    held_bytes = 0
    rng = np.random.default_rng(0)
    for row in rows:
        try:
            image, truth = decode_pair(row["image_bytes"], row["mask_bytes"], spec,
                                       image_uri=row["image_uri"], mask_uri=row["mask_uri"],
                                       max_pixels=limits.max_pixels, refused=row["refused"],
                                       tiff_page=limits.tiff_page)
            prediction = model.segmenter.predict(image, fields=fields)
        except InputError:
            held = None
            continue
        pairs.append((prediction.mask, truth))
        if calibrate:
            samples.append(sample_pixels(prediction.probs, truth, multilabel=spec.multilabel,
                                         ignore_index=spec.ignore_index, rng=rng))
        if held is not None and len(held) < monitor.BASELINE_IMAGES:   # the baseline's share
            if held_bytes + prediction.probs.nbytes <= HELD_PROBS_BYTES:
                held.append(prediction.probs)
                held_bytes += prediction.probs.nbytes
            else:
                held = None
    found: dict[str, Any] = {"rules": None, "evidence": None, "calibration": None,
                             "baseline": None}
    if postprocess:
        rules, evidence = (choose(pairs, spec) if pairs else
                           (PostProcess(), {"images": 0, "skipped": f"no {split} pairs decoded"}))
        write_postprocess(artifact_dir, rules, evidence)
        found.update(rules=rules, evidence=evidence)
        log(f"post-processing chosen on {len(pairs)} {split} image(s): "
            f"{rules.describe(spec.names)}" + (
                f" (mean val Dice {evidence['mean_dice_before']:.4f} -> "
                f"{evidence['mean_dice_after']:.4f})" if pairs else ""))
    if calibrate and samples:
        fitted = {**fit_temperature(samples, multilabel=spec.multilabel), "images": len(samples)}
        write_calibration(artifact_dir, fitted)
        found["calibration"] = fitted
        log(f"confidence calibrated on {len(samples)} {split} image(s): temperature "
            f"{fitted['temperature']:.3f}, pixel ECE {fitted['ece_before']:.4f} -> "
            f"{fitted['ece_after']:.4f}")
    if baseline:
        found["baseline"] = finish_baseline(artifact_dir, [row["image_bytes"] for row in rows],
                                            held)
    return found


def finish_baseline(artifact_dir: Path, blobs: list[bytes | None],
                    held: list[np.ndarray] | None) -> dict[str, Any]:
    """The drift baseline of the artifact in ``artifact_dir`` (rules and temperature as now
    recorded) over the val images ``blobs``: finished from ``held``, their probabilities at
    temperature 1 (one per image, in order), or predicted again when ``held`` is None."""
    import torch

    from pipelines.operate import monitor
    from seg_core.errors import InputError

    blobs = blobs[:monitor.BASELINE_IMAGES]
    if held is None or len(held) != len(blobs):
        return monitor.write_baseline(artifact_dir, blobs)
    model = monitor.baseline_model(artifact_dir)
    rows = []
    for index, (blob, probs) in enumerate(zip(blobs, held)):
        prediction = model.segmenter.finish(torch.from_numpy(probs), model.fields)
        try:
            rows.append(model.row(prediction, id=str(index), source_uri=None, data=blob or b"",
                                  with_confidence=False))
        except InputError:   # too many objects to label: predict_rows would quarantine it
            continue
    return monitor.save_baseline(artifact_dir, model, rows)


def tune_artifact(cfg: Any, log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]]:
    """``rayseg tune-postprocess``: :func:`tune_postprocess` on the artifact ``cfg.model``
    (local, ``s3://`` or ``models:/``) with ``cfg.split`` of ``cfg.manifest``; a remote
    artifact is copied here and its ``artifact.json`` replaced whole."""
    import tempfile

    from pipelines import registry, storage

    uri = registry.resolve(cfg.model).source if registry.is_models_uri(cfg.model) else cfg.model
    with tempfile.TemporaryDirectory(prefix="rayseg-tune-") as tmp:
        local = (Path(storage.strip_scheme(uri)) if storage.is_local(uri)
                 else storage.copy_dir_to_local(uri, Path(tmp) / "artifact"))
        found = tune_postprocess(local, cfg.manifest, kind="auto", split=cfg.split, log=log)
        if not storage.is_local(uri):
            storage.write_bytes(storage.join_uri(uri, "artifact.json"),
                                (local / "artifact.json").read_bytes())
    log(f"tune-postprocess: recorded in {storage.join_uri(uri, 'artifact.json')}")
    return found
