"""The per-class post-processing of an artifact, chosen on the val split (issue 33).

At the end of training (``tune_postprocess: true``, the default) and by ``rayseg
tune-postprocess``: up to :data:`POSTPROCESS_IMAGES` val pairs are read on this process (no Ray
job, like the drift baseline), predicted by the artifact with no post-processing, and
:func:`seg_core.postprocess.choose` keeps, per class, the rules that raise that class's val Dice
by more than its tolerance without lowering another's.  The rules and the evidence (every rule
tried, Dice before and after) go into ``artifact.json`` (:func:`seg_core.artifact.
write_postprocess`), where every engine applies them, and into ``metrics.json`` for training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

POSTPROCESS_IMAGES = 64   # val pairs the choice is made on (read and predicted on one process)


def tune_postprocess(artifact_dir: Path, source: str, *, kind: str, split: str,
                     log: Callable[[str], None] = print,
                     limit: int = POSTPROCESS_IMAGES) -> tuple[Any, dict[str, Any]]:
    """Choose and record the post-processing of the local artifact in ``artifact_dir`` from the
    ``split`` rows of ``source`` (``kind``: manifest, prefix or shards); returns the rules and
    the evidence.  Pairs that do not decode are skipped (they were quarantined in training)."""
    from pipelines.ingest import decode_pair, read_split_bytes
    from pipelines.model import open_model
    from seg_core.artifact import write_postprocess
    from seg_core.config import PostProcess
    from seg_core.errors import InputError
    from seg_core.postprocess import choose

    model = open_model(str(artifact_dir), engine="torch", device="cpu",
                       postprocess=PostProcess())   # raw masks: the rules are what is chosen
    spec, limits = model.mask_spec, model.limits
    table = read_split_bytes(source, kind=kind, split=split, limit=limit)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for row in table.to_pylist():
        try:
            image, truth = decode_pair(row["image_bytes"], row["mask_bytes"], spec,
                                       image_uri=row["image_uri"], mask_uri=row["mask_uri"],
                                       max_pixels=limits.max_pixels, refused=row["refused"],
                                       tiff_page=limits.tiff_page)
            prediction = model.segmenter.predict(image, fields=frozenset({"mask"}))
        except InputError:
            continue
        pairs.append((prediction.mask, truth))
    if not pairs:
        rules, evidence = PostProcess(), {"images": 0, "skipped": f"no {split} pairs decoded"}
    else:
        rules, evidence = choose(pairs, spec)
    write_postprocess(artifact_dir, rules, evidence)
    log(f"post-processing chosen on {len(pairs)} {split} image(s): "
        f"{rules.describe(spec.names)}" + (
            f" (mean val Dice {evidence['mean_dice_before']:.4f} -> "
            f"{evidence['mean_dice_after']:.4f})" if pairs else ""))
    return rules, evidence


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
