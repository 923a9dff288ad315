"""``rayseg plan SOURCE``: validate's one pass, its fingerprint, and the plan derived from it."""
from __future__ import annotations

from typing import Any, Callable

import yaml

from pipelines import storage
from pipelines.plan.rules import Plan, plan_from
from seg_core.config import MaskSpec


def plan_source(source: str, mask: MaskSpec, out_uri: str, *, max_pixels: int | None = None,
                split: str | None = None, gpu: bool | None = None,
                storage_options: storage.StorageOptions | None = None,
                log: Callable[[str], None] | None = None) -> tuple[Any, Plan]:
    """Validate ``source`` (only its ``split`` rows when given; report, quarantine and
    ``fingerprint.json`` under ``out_uri``), then write ``plan.yaml`` there: the plan's
    ``TrainConfig`` fragment, its reasons as comments.  ``gpu``: plan for GPU workers (None:
    when the cluster has GPUs).  ``log``: as :func:`pipelines.validate.validate`'s.  Returns
    ``(validation report, plan)``."""
    import ray

    from pipelines.validate import validate

    extra = {} if max_pixels is None else {"max_pixels": max_pixels}
    report = validate(source, mask, out_uri=out_uri, storage_options=storage_options,
                      split=split, log=log, **extra)
    if gpu is None:
        gpu = ray.cluster_resources().get("GPU", 0) > 0
    plan = plan_from(report.fingerprint, gpu=gpu)
    plan.config["mask"] = mask_section(mask)
    plan.config.setdefault("model", {})["num_classes"] = mask.num_classes
    storage.write_bytes(storage.join_uri(out_uri, "plan.yaml"), plan_yaml(plan, source).encode(),
                        storage_options)
    return report, plan


def mask_section(mask: MaskSpec) -> dict[str, Any]:
    """The ``mask:`` keys the plan was made with (so that the fragment trains as planned)."""
    section: dict[str, Any] = {"num_classes": mask.num_classes}
    for key in ("class_names", "mask_values", "palette"):
        if getattr(mask, key):
            section[key] = [list(v) if isinstance(v, tuple) else v for v in getattr(mask, key)]
    if mask.multilabel:
        section["multilabel"] = True
    section["ignore_index"] = mask.ignore_index
    return section


def plan_yaml(plan: Plan, source: str) -> str:
    """``plan.yaml``: the reasons as comments, then the fragment (``rayseg train --config``)."""
    head = [f"# rayseg plan for {source}", "# rayseg train --config plan.yaml --set "
            "data.manifest=... (any key you set wins)", "#"]
    head += [f"# - {reason}" for reason in plan.reasons]
    return "\n".join(head) + "\n" + yaml.safe_dump(plan.config, sort_keys=False)
