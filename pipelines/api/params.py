"""The estimator's flat parameters (``lr`` -> ``optim.lr``), and what it infers or reports beside
training: the class count of a manifest's masks, the H2O-style cross-validation summary."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas


# ------------------------------------------------------------------------------- parameters

# TrainConfig sections whose fields become flat estimator parameters (``lr`` -> ``optim.lr``).
_SECTIONS = ("data", "model", "mask", "preprocessing", "augment", "optim", "scaling", "storage")
# Set by the estimator itself (from its frames, x, y, model_id), never by the user.
_MANAGED = {"manifest", "shards", "train_split", "val_split", "fold_column", "fold", "name",
            "version", "in_channels"}


def hyperparameter_names() -> dict[str, tuple[str, ...]]:
    """Flat estimator parameter -> the TrainConfig paths it sets (``num_classes`` sets two)."""
    from pipelines.config import TrainConfig

    paths: dict[str, tuple[str, ...]] = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name in _MANAGED:
            continue
        if field.name in _SECTIONS:
            section = type(getattr(TrainConfig(), field.name))
            for sub in dataclasses.fields(section):
                if sub.name not in _MANAGED:
                    paths[sub.name] = paths.get(sub.name, ()) + (f"{field.name}.{sub.name}",)
        else:
            paths[field.name] = (field.name,)
    paths["channels"] += ("model.in_channels",)   # the model's input is the preprocessed image
    return paths


def _check_params(params: dict[str, Any]) -> None:
    known = hyperparameter_names()
    dotted = {p for paths in known.values() for p in paths}
    unknown = sorted(k for k in params if k not in known and k not in dotted)
    if unknown:
        raise ValueError(f"UNetSegmentationEstimator: unknown parameter(s) {unknown}; expected "
                         f"some of {sorted(known)} (or a dotted TrainConfig key like 'optim.lr')")




def infer_num_classes(manifest: str, multilabel: bool = False) -> int:
    """The class count of the masks in ``manifest``, read by a Ray Data pass (``rayseg
    validate``'s): highest mask value + 1, or the number of files per multi-label mask."""
    from pipelines.ingest import IGNORE_PREFIX, MASK_SEPARATOR, read_manifest
    from pipelines.validate import validate
    from seg_core.config import MaskSpec

    if multilabel:
        masks = [m for m in read_manifest(manifest)["mask_uri"].to_pylist() if m]
        counts = {sum(not p.strip().startswith(IGNORE_PREFIX) for p in m.split(MASK_SEPARATOR)
                      if p.strip()) for m in masks}
        if len(counts) != 1:
            raise ValueError(f"multi-label masks list {sorted(counts)} files per row; they must "
                             f"all list one file per class (pass num_classes=)")
        return counts.pop()
    report = validate(manifest, MaskSpec(num_classes=255, ignore_index=255))
    present = [k for k, n in enumerate(report.class_pixels) if n > 0]
    if report.ok == 0 or not present:
        raise ValueError(f"could not read class ids from the masks ({report.reasons}); pass "
                         f"num_classes= (and mask_values= or palette= for non-index masks)")
    if report.ignore_pixels and len(present) == 1:
        raise ValueError(f"the masks hold only value {present[0]} and 255; if 255 is a class "
                         f"(e.g. ISBI membranes 0/255) pass mask_values=[{present[0]}, 255], "
                         f"else pass num_classes=")
    print(f"rayseg: num_classes={present[-1] + 1} inferred from the mask values "
          f"{present[:6]}{' ...' if len(present) > 6 else ''} (pass num_classes= to skip this "
          f"pass over the masks)", flush=True)
    return present[-1] + 1


def cv_summary_frame(cv: Any) -> "pandas.DataFrame":
    """H2O-style CV summary: one row per metric, columns mean, sd, cv_1_valid .. cv_k_valid."""
    import pandas

    from pipelines.train.cv import fold_metric

    rows = {name: {"mean": stats["mean"], "sd": stats["std"],
                   **{f"cv_{k + 1}_valid": fold_metric(fold, name)
                      for k, fold in enumerate(cv.folds)}}
            for name, stats in cv.summary_metrics.items()}
    return pandas.DataFrame.from_dict(rows, orient="index")


