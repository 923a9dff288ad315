"""``fingerprint(frame)``: ``rayseg plan`` in a notebook (:mod:`pipelines.plan`)."""
from __future__ import annotations

import uuid
from typing import Any

from pipelines import storage
from pipelines.api.frame import Frame, write_manifest
from pipelines.api.params import infer_num_classes
from pipelines.api.session import _connected, work_directory


def fingerprint(frame: Frame, *, x: str = "image", y: str = "mask",
                num_classes: int | None = None, **mask: Any) -> dict[str, Any]:
    """The dataset fingerprint of ``frame`` (one Ray Data pass, ``rayseg validate``'s) with the
    plan derived from it under ``"plan"``: ``{"config": TrainConfig fragment, "reasons": [...]}``
    (:mod:`pipelines.plan.rules`).  ``num_classes`` is read from the masks when not given;
    ``mask`` takes the other ``MaskSpec`` keys (``mask_values``, ``class_names``, ``palette``,
    ``multilabel``, ``ignore_index``).  ``fingerprint.json``, ``plan.yaml``, the validation
    report and the quarantine go to ``<work_dir>/plans/<token>/``."""
    from pipelines.plan.plan import plan_source
    from seg_core.config import MaskSpec

    _connected()
    token = uuid.uuid4().hex[:8]
    manifest = write_manifest([(frame, None)], storage.join_uri(
        work_directory(), "frames", f"fingerprint-{token}.csv"), x=x, y=y)
    if num_classes is None:
        num_classes = infer_num_classes(manifest, bool(mask.get("multilabel")))
    spec = MaskSpec(num_classes=num_classes, **{k: tuple(v) if isinstance(v, list) else v
                                                 for k, v in mask.items()})
    report, plan = plan_source(manifest, spec, storage.join_uri(work_directory(), "plans",
                                                                 token))
    return {**report.fingerprint, "plan": {"config": plan.config, "reasons": plan.reasons}}
