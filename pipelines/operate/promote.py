"""Gated promotion: ``rayseg promote --model … --alias champion --gate "miou>=0.80"``.

1. The candidate (a ``models:/`` URI or an artifact, registered first if it is not) and the
   alias's current holder are both evaluated on one fixed split (``rayseg evaluate``, each into
   its own directory under ``out``).  Every metric of an evaluation is kept on the version as a
   registry tag keyed by the evaluation set (manifest hash and split), so a version already
   scored on that set (the holder, when it was promoted on it) is not evaluated again.
2. The alias moves only when every gate condition holds **and** the candidate is no worse than
   the holder on each gated metric beyond ``tolerance``.
3. ``comparison.md`` and ``comparison.json`` are written to ``out`` either way, and the
   decision is tagged on the candidate's registry version.
4. With ``serve_app``, a running endpoint on the connected Ray is pointed at the new holder
   (:func:`pipelines.serve.control.follow_model`): replicas swap models without failing a request.

The job exits 0 when the alias moved, 3 when the candidate was kept out (so a nightly CronJob can
tell "kept the champion" from an error, which exits 1).
"""
from __future__ import annotations

import hashlib
import json
import operator
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from pipelines import registry, storage

if TYPE_CHECKING:
    from seg_core.config import EngineKind

REJECTED_EXIT = 3
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_CONDITION = re.compile(r"^\s*([A-Za-z_.]+)\s*(>=|<=|>|<)\s*([0-9.eE+-]+)\s*$")


@dataclass(frozen=True)
class Condition:
    """One gate condition, ``miou>=0.80``."""

    metric: str
    op: str
    value: float

    def holds(self, measured: float | None) -> bool:
        return measured is not None and measured == measured and _OPS[self.op](measured,
                                                                               self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def gate_metric_names() -> tuple[str, ...]:
    """What a gate may name: ``miou``/``mdice`` (macro IoU/Dice) and ``<reduction>_<score>``."""
    from pipelines.evaluate.evaluate import REDUCTIONS
    from seg_core.metrics import SCORES

    return ("miou", "mdice", *(f"{r}_{s}" for r in REDUCTIONS for s in SCORES))


def parse_gate(text: str) -> tuple[Condition, ...]:
    """``"miou>=0.8, mdice>=0.85"`` -> conditions; names are checked against the metrics."""
    conditions = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _CONDITION.match(part)
        if not match:
            raise ValueError(f"gate: cannot read {part!r}; write conditions like miou>=0.80, "
                             f"separated by commas")
        if match[1] not in gate_metric_names():
            raise ValueError(f"gate: unknown metric {match[1]!r}; known: "
                             f"{', '.join(gate_metric_names())}")
        conditions.append(Condition(match[1], match[2], float(match[3])))
    if not conditions:
        raise ValueError("gate: no condition given (e.g. --gate 'miou>=0.80')")
    return tuple(conditions)


def metric_value(report: Mapping[str, Any], name: str) -> float | None:
    """A gate metric from an evaluate ``report.json``."""
    reduction, score = {"miou": ("macro", "iou"), "mdice": ("macro", "dice")}.get(
        name, tuple(name.rsplit("_", 1)))   # type: ignore[arg-type]
    value = report["metrics"][reduction][score]
    return None if value is None else float(value)


@dataclass(frozen=True)
class Decision:
    """What ``promote`` decided and why."""

    promoted: bool
    candidate: registry.ModelRef
    holder: registry.ModelRef | None
    alias: str
    reasons: tuple[str, ...]
    candidate_metrics: dict[str, float | None]
    holder_metrics: dict[str, float | None] | None
    report: str

    def summary(self) -> str:
        verdict = (f"promoted {self.candidate.registry_uri} to @{self.alias}" if self.promoted
                   else f"kept {self.candidate.registry_uri} out of @{self.alias}")
        return f"promote: {verdict}: {'; '.join(self.reasons)} (report: {self.report})"


def promote(model: str, *, alias: str, gate: str, manifest: str, out: str,
            against: str | None = None, split: str | None = "val", tolerance: float = 0.0,
            serve_app: str | None = None, engine: EngineKind = "auto",
            evaluate: Callable[..., dict[str, Any]] | None = None,
            log: Callable[[str], None] = print) -> Decision:
    """Evaluate, compare, move the alias if the gate holds (see the module docstring)."""
    from pipelines.config import EvaluateConfig
    from pipelines.evaluate.evaluate import run_evaluate

    conditions = parse_gate(gate)
    evaluate = evaluate or run_evaluate
    candidate = registry.resolve(model) if registry.is_models_uri(model) else \
        registry.register_artifact(model)
    if candidate.version is None:
        raise ValueError(f"{model}: not a registered version")
    holder = registry.alias_holder(candidate.name or "", against or alias)
    names = sorted({c.metric for c in conditions})

    # a version's scores on this exact evaluation set (manifest bytes + split) are kept as a
    # registry tag: the holder was scored when it was promoted, and is not re-run each night
    key = f"eval.{hashlib.sha256(storage.read_bytes(manifest)).hexdigest()[:16]}.{split}"

    def scores(ref: registry.ModelRef, tag: str) -> dict[str, float | None]:
        known = json.loads(registry.version_tags(ref).get(key) or "{}")
        if all(name in known for name in names):
            log(f"promote: {ref.registry_uri} was scored on this set before: {known}")
            return {name: known[name] for name in names}
        target = storage.join_uri(out, f"{tag}-v{ref.version}")
        report = evaluate(EvaluateConfig(manifest=manifest, out=target, model=ref.source,
                                         split=split, engine=engine, progress=False,
                                         bootstrap=0), log=log)
        measured = {name: metric_value(report, name) for name in gate_metric_names()}
        registry.tag_version(ref, {key: json.dumps(measured)})
        return {name: measured[name] for name in names}

    measured = scores(candidate, "candidate")
    held: dict[str, float | None] | None = None
    if holder is not None:
        held = measured if holder.weights_sha256 == candidate.weights_sha256 else \
            scores(holder, "holder")
    reasons = [f"gate {c} {'holds' if c.holds(measured[c.metric]) else 'fails'} "
               f"({_fmt(measured[c.metric])})" for c in conditions]
    passed = all(c.holds(measured[c.metric]) for c in conditions)
    if held is not None and holder is not None:
        for name in names:
            worse = _worse(measured[name], held[name], tolerance)
            passed = passed and not worse
            reasons.append(f"{name} {_fmt(measured[name])} vs holder v{holder.version} "
                           f"{_fmt(held[name])}: {'worse' if worse else 'not worse'} beyond "
                           f"tolerance {tolerance:g}")
    elif holder is None:
        reasons.append(f"@{alias} had no holder")
    decision = Decision(promoted=passed, candidate=candidate, holder=holder, alias=alias,
                        reasons=tuple(reasons), candidate_metrics=measured,
                        holder_metrics=held, report=storage.join_uri(out, "comparison.md"))
    if passed:
        registry.set_alias(candidate, alias, tags={f"promoted_to_{alias}": "true",
                                                   "gate": gate})
    else:
        registry.tag_version(candidate, {f"rejected_for_{alias}": gate})
    _write_comparison(decision, out, gate=gate, manifest=manifest, split=split,
                      tolerance=tolerance)
    log(decision.summary())
    if passed and serve_app:
        from pipelines.serve.control import follow_model

        pointer = follow_model(f"{registry.MODELS_PREFIX}{candidate.name}@{alias}", serve_app)
        log(f"promote: endpoint {serve_app!r} now serves {pointer['ref']}")
    return decision


def _worse(candidate: float | None, holder: float | None, tolerance: float) -> bool:
    if holder is None or holder != holder:
        return False
    return candidate is None or candidate != candidate or candidate < holder - tolerance


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def _write_comparison(decision: Decision, out: str, **context: Any) -> None:
    body = {"promoted": decision.promoted, "alias": decision.alias,
            "candidate": {**decision.candidate.as_dict(),
                          "weights_sha256": decision.candidate.weights_sha256,
                          "metrics": decision.candidate_metrics},
            "holder": None if decision.holder is None else
            {**decision.holder.as_dict(), "weights_sha256": decision.holder.weights_sha256,
             "metrics": decision.holder_metrics},
            "reasons": list(decision.reasons), **context}
    storage.write_bytes(storage.join_uri(out, "comparison.json"),
                        (json.dumps(body, indent=2) + "\n").encode())
    holder = decision.holder
    lines = [f"# Promotion to @{decision.alias}: "
             f"{'promoted' if decision.promoted else 'not promoted'}", "",
             f"Candidate `{decision.candidate.registry_uri}` (`{decision.candidate.source}`), "
             f"holder {f'`{holder.registry_uri}`' if holder else 'none'}; evaluated on "
             f"`{context['manifest']}` split `{context['split']}`, gate `{context['gate']}`, "
             f"tolerance {context['tolerance']:g}.", "",
             "| metric | candidate | holder |", "|---|---:|---:|"]
    for name, value in decision.candidate_metrics.items():
        held = (decision.holder_metrics or {}).get(name)
        lines.append(f"| {name} | {_fmt(value)} | {_fmt(held)} |")
    lines += ["", *[f"- {reason}" for reason in decision.reasons], "",
              "Per-model evaluation reports: the `candidate-v*` and `holder-v*` directories.", ""]
    storage.write_bytes(storage.join_uri(out, "comparison.md"), "\n".join(lines).encode())

