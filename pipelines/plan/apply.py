"""Training uses the plan by default: the keys a user did not set come from the plan of the
training rows' fingerprint (:mod:`pipelines.plan.rules`); every key the user set wins.

``rayseg train`` and the estimator build the user's settings as plain data (YAML, flags,
``--set``, estimator parameters), then call :func:`plan_settings`.  It fingerprints the
``train_split`` rows in validate's one Ray Data pass (``fingerprint.json``, ``plan.yaml`` and the
validation report go to ``<run>/plan/``), and fills in the planned keys the user left unset.
Keys that only make sense together are decided together: a user who set any of a group's keys
keeps the whole group as they set it (:data:`GROUPS`: a crop planned beside a resize they chose
could exceed it).  ``plan: false`` in the settings trains exactly the config given.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipelines import storage
from pipelines.config import config_from_dict, set_dotted
from pipelines.plan.rules import Plan

# Decided as one: the user's setting of any member keeps the plan out of all of them.
GROUPS = (("augment.crop", "preprocessing.resize", "preprocessing.tile_size"),
          ("preprocessing.channels", "model.in_channels", "preprocessing.mean",
           "preprocessing.std"),
          ("epochs", "max_iterations"))
BUDGET_EPOCHS = 10_000   # with max_runtime_secs and no epochs of the user's: the budget decides
_NOT_PLANNED = ("mask", "model.num_classes")   # the plan's own copy of the user's mask keys


@dataclass
class PlanOutcome:
    """What the plan set (``planned``, dotted key -> value), what the user's settings kept
    (``kept``, dotted key -> the user's value), where the plan was written, the printed lines
    and the fingerprint the plan came from."""

    uri: str
    images: int
    planned: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)


def plan_settings(settings: Mapping[str, Any], *, echo: bool = True
                  ) -> tuple[dict[str, Any], PlanOutcome | None]:
    """``settings`` (a ``TrainConfig`` as plain data, the user's keys only) with the plan's
    keys filled in where the user set none of their group.  Returns the merged settings and the
    outcome (None when ``plan`` is false: no pass).  Needs Ray (one Ray Data pass)."""
    from pipelines.plan.plan import plan_source

    cfg = config_from_dict(copy.deepcopy(dict(settings)))   # the user's errors first, in their terms
    if not cfg.plan:
        return dict(settings), None
    source = cfg.data.manifest or cfg.data.shards
    out_uri = storage.join_uri(cfg.run_uri, "plan")
    report, plan = plan_source(source, cfg.mask, out_uri, split=cfg.data.train_split,
                               gpu=cfg.scaling.use_gpu)
    if cfg.max_runtime_secs is not None:
        plan.set("epochs", BUDGET_EPOCHS,
                 f"epochs {BUDGET_EPOCHS}: as many as max_runtime_secs={cfg.max_runtime_secs:g} "
                 f"allows (the schedule is fitted to end within it)")
    merged, outcome = merge_plan(settings, plan)
    outcome.uri, outcome.images, outcome.fingerprint = out_uri, report.ok, report.fingerprint
    outcome.lines.insert(0, f"rayseg plan: {report.ok} training pair(s) fingerprinted; "
                            f"{len(outcome.planned)} key(s) planned, {len(outcome.kept)} of "
                            f"yours kept ({storage.join_uri(out_uri, 'plan.yaml')}; plan: false "
                            f"trains your config as given)")
    if echo:
        print("\n".join(outcome.lines), flush=True)
    return merged, outcome


def merge_plan(settings: Mapping[str, Any], plan: Plan) -> tuple[dict[str, Any], PlanOutcome]:
    """``settings`` with ``plan``'s keys where the user set none of their group (no I/O): the
    merged settings and the outcome, one line per decision."""
    user = dotted_keys(settings)
    outcome = PlanOutcome(uri="", images=0)
    merged = copy.deepcopy(dict(settings))
    values = dict(_leaves(plan.config))
    kept: dict[str, list[str]] = {}   # the user's keys shown -> the planned reasons they beat
    for reason, keys in zip(plan.reasons, plan.keys):
        keys = tuple(k for k in keys if not k.startswith(_NOT_PLANNED))
        yours = {k: _get(settings, k) for k in group_set(keys, user)}
        if not keys or not yours:
            for key in keys:
                outcome.planned[key] = values[key]
                set_dotted(merged, key, copy.deepcopy(values[key]))
            outcome.lines.append(f"  plan   {reason}")
            continue
        outcome.kept.update(yours)
        shown = ", ".join(f"{k}={_show(v)}" for k, v in yours.items())
        if shown not in kept:   # one line per setting of yours, with every reason it beat
            kept[shown] = []
            outcome.lines.append(shown)
        kept[shown].append(reason)
    outcome.lines = [f"  yours  {line}  (planned: {'; '.join(kept[line])})" if line in kept
                     else line for line in outcome.lines]
    return merged, outcome


def dotted_keys(settings: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Every dotted path the settings set, sections included (``{"optim": {"lr": 1}}`` ->
    ``{"optim", "optim.lr"}``)."""
    keys: set[str] = set()
    for key, value in settings.items():
        path = f"{prefix}{key}"
        keys.add(path)
        if isinstance(value, Mapping):
            keys |= dotted_keys(value, f"{path}.")
    return keys


def group_set(keys: tuple[str, ...], user: set[str]) -> list[str]:
    """The keys of ``user`` among ``keys`` and the groups they belong to (:data:`GROUPS`)."""
    members = set(keys)
    for group in GROUPS:
        if members & set(group):
            members |= set(group)
    return sorted(k for k in members if k in user)


def _leaves(tree: Mapping[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _get(settings: Mapping[str, Any], dotted: str) -> Any:
    node: Any = settings
    for part in dotted.split("."):
        node = node[part]
    return node


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
