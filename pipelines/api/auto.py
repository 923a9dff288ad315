"""``AutoSegmentation``: H2O AutoML's shape (``H2OAutoML(max_runtime_secs=...)``, a leaderboard,
a leader) for segmentation, on Ray Tune.

::

    aml = AutoSegmentation(max_runtime_secs=600, max_models=4, seed=1)
    aml.train(x="image", y="mask", training_frame=train, validation_frame=valid)
    aml.leaderboard.head()           # model_id, mIoU, mDice, pixel accuracy, times, images/s
    aml.leader.predict(test)         # the best model, registered as models:/<project>@auto

How it runs:

1. The training rows are fingerprinted once and planned (:mod:`pipelines.plan.apply`), as
   ``UNetSegmentationEstimator.train()`` does; parameters given to ``AutoSegmentation`` win.
2. Candidates come from the plan (:func:`candidates`), in this order, cut at ``max_models``:
   the planned model; a wider one (twice the base width); the lite U-Net; the planned model at
   a second training size (3/4 of the planned side: a smaller crop, or a resize for one-size
   data when it stays >= 96 px a side), unless the user fixed the geometry.
3. The time left after planning is split evenly among the rounds of ``parallelism`` trials;
   each trial is a ``train()`` with that share as its ``max_runtime_secs`` (its schedule fitted
   to it) on Ray Tune, with ASHA stopping trials whose val mIoU trails at its rungs
   (:func:`pipelines.train.tune.run_grid`, the grid search's runner).
4. Every finished model's inference pace is timed on the driver: the val images through
   :func:`pipelines.model.open_model`'s ``predict_one`` (decode, preprocess, forward, encode).
5. The leaderboard is sorted by val mIoU; the leader's artifact is registered under the
   project name and aliased ``auto``.

With ``nfolds >= 2`` the candidates are cross-validated instead of raced: one after another,
each runs its ``nfolds`` fold models (``parallelism`` at a time,
:func:`pipelines.train.cv.cross_validate`) and then its main model on every training row, each
run with an equal slice of the candidate's share as its ``max_runtime_secs``.  The leaderboard
is sorted by the mean cross-validated mIoU (``cv_mIoU``, with ``cv_mIoU_std``); ``mIoU`` stays
the main model's on the validation frame.  ASHA has nothing to compare mid-way, so no candidate
is stopped early.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from typing import TYPE_CHECKING, Any, Sequence

from pipelines import storage
from pipelines.api.frame import Frame

if TYPE_CHECKING:
    from pipelines.api.api import UNetSegmentationEstimator
    from pipelines.config import TrainConfig

AUTO_ALIAS = "auto"
SECOND_SIZE = 0.75        # the second training size, as a share of the planned side
MIN_RESIZED = 96          # ... not below this many pixels a side
TIMED_IMAGES = 8          # val images whose inference is timed per model
FINISH_RESERVE_S = 10.0   # kept back from the trials: timing, registration, the leaderboard
BUDGET_EPOCHS = 10_000    # a trial's epochs: its time share decides
TRIAL_OVERHEAD_S = 3.0    # Tune's start of a trial, outside the trial's own budget
OVERRUN = 1.15            # Tune stops a trial still running past this share of the time left
SCORES = ("mIoU", "mDice", "pixel_accuracy")   # leaderboard columns, to 4 places
RANK_BY = {False: "mIoU", True: "cv_mIoU"}   # the leaderboard's order, without / with nfolds


class AutoSegmentation:
    """Train several planned candidates within ``max_runtime_secs`` and rank them.

    Args:
        max_runtime_secs: the whole search's wall budget, planning included.
        max_models: at most this many candidates (1-4, in the order of the module docstring).
        seed: seeds every candidate (weights, shuffling, augmentation).
        project_name: the leaderboard's and the leader's registered name (default
            ``auto_<random>``).
        parallelism: trials at once (each takes its share of the CPUs).
        num_classes / mask_values / multilabel / **hyperparameters: as
            :class:`UNetSegmentationEstimator`; each one set here holds for every candidate
            and wins over the plan.
    """

    def __init__(self, max_runtime_secs: float, max_models: int = 4, seed: int | None = None,
                 project_name: str | None = None, parallelism: int = 1,
                 num_classes: int | None = None, mask_values: Sequence[int] | None = None,
                 multilabel: bool = False, **hyperparameters: Any) -> None:
        from pipelines.api.api import _check_params

        if int(hyperparameters.get("nfolds") or 0) == 1:
            raise ValueError("AutoSegmentation: nfolds must be 0 (race the candidates on the "
                             "validation frame) or >= 2 (cross-validate them), got 1")
        if max_runtime_secs <= 0 or not 1 <= max_models <= 4 or parallelism < 1:
            raise ValueError(f"AutoSegmentation: expected max_runtime_secs > 0, 1 <= max_models "
                             f"<= 4 and parallelism >= 1; got {max_runtime_secs}, {max_models}, "
                             f"{parallelism}")
        _check_params(hyperparameters)
        self.max_runtime_secs, self.max_models = float(max_runtime_secs), max_models
        self.seed, self.parallelism = seed, parallelism
        self.project_name = project_name or f"auto_{uuid.uuid4().hex[:8]}"
        self._estimator_args = {"num_classes": num_classes, "mask_values": mask_values,
                                "multilabel": multilabel, **hyperparameters}
        self.leaderboard: Frame | None = None
        self.leader: "UNetSegmentationEstimator | None" = None
        self.models: list["UNetSegmentationEstimator"] = []   # finished ones, best first
        self.trials: list[Any] = []

    def train(self, x: str = "image", y: str = "mask", training_frame: Frame | None = None,
              validation_frame: Frame | None = None) -> "AutoSegmentation":
        """Plan, train the candidates, time them and rank them; returns ``self``."""
        from pipelines.api.api import UNetSegmentationEstimator
        from pipelines.api.session import _connected, work_directory

        started = time.monotonic()
        if training_frame is None or validation_frame is None:
            raise ValueError("AutoSegmentation.train: needs a training_frame and a "
                             "validation_frame (candidates are ranked on validation mIoU)")
        base = UNetSegmentationEstimator(x, y, training_frame, validation_frame, seed=self.seed,
                                         model_id=self.project_name, **self._estimator_args)
        manifest = base._training_manifest(self.project_name)
        _connected()
        base.resolve_classes(manifest)
        outcome = base._apply_plan(manifest)
        full_size = tuple(outcome.fingerprint["sizes"]["median"]) if outcome else (0, 0)
        chosen = candidates(base.build_config(manifest), base.params, full_size
                            )[:self.max_models]
        left = self.max_runtime_secs - (time.monotonic() - started) - FINISH_RESERVE_S
        nfolds = int(self._estimator_args.get("nfolds") or 0)
        # rounds of ``parallelism`` trials, or candidates in turn (their folds in parallel)
        rounds = len(chosen) if nfolds >= 2 else math.ceil(len(chosen) / self.parallelism)
        share = left / rounds - TRIAL_OVERHEAD_S
        if share <= 0:
            raise ValueError(f"AutoSegmentation: max_runtime_secs={self.max_runtime_secs:g} "
                             f"was spent before training (planning took "
                             f"{time.monotonic() - started:.0f} s); give it more time")
        print(f"[{self.project_name}] {len(chosen)} candidate(s), {rounds} round(s)"
              + ("" if nfolds >= 2 else f" of {self.parallelism}") + f": {share:.0f} s each ("
              + ", ".join(label for label, _ in chosen) + ")", flush=True)
        if nfolds >= 2:
            rows = self._cross_validated(base, chosen, manifest, share, nfolds,
                                         validation_frame, x)
        else:
            rows = self._raced(base, chosen, manifest, share, left, validation_frame, x)
        rows = ranked(rows, RANK_BY[nfolds >= 2])
        finished = {m.model_id: m for m in self.models if m.artifact_uri}
        self.models = [finished[r["model_id"]] for r in rows if r["model_id"] in finished]
        if not self.models:
            raise RuntimeError(f"AutoSegmentation: no candidate finished within "
                               f"max_runtime_secs={self.max_runtime_secs:g} (errors: "
                               f"{[r['error'] for r in rows]}); give it more time")
        self.leader = self.models[0]
        leader_uri = _register_leader(self.leader.artifact_uri, self.project_name)
        for row in rows:
            row["leader"] = row["model_id"] == self.leader.model_id
        self.leaderboard = _frame(rows, storage.join_uri(work_directory(), "auto",
                                                         f"{self.project_name}.json"))
        print(self.leaderboard.as_data_frame().to_string(index=False), flush=True)
        print(f"[{self.project_name}] leader {self.leader.model_id}: {leader_uri}", flush=True)
        return self

    def _raced(self, base: "UNetSegmentationEstimator", chosen: list[tuple[str, dict[str, Any]]],
               manifest: str, share: float, left: float, validation_frame: Frame,
               x: str) -> list[dict[str, Any]]:
        """The candidates as Ray Tune trials, ASHA stopping the trailing ones; their rows."""
        from pipelines.api.session import work_directory
        from pipelines.train.tune import SearchCriteria, run_grid

        members, configs, params = [], [], []
        for label, extra in chosen:
            member = base.variant(f"{self.project_name}_{label}",
                                  {**extra, "max_runtime_secs": share, "epochs": BUDGET_EPOCHS})
            member.planned = dict(base.planned)
            members.append(member)
            configs.append(member.build_config(manifest))
            params.append({"candidate": label, **extra})
        # each trial ends by its own fitted budget; Tune's cut only catches one that overran
        criteria = SearchCriteria(parallelism=self.parallelism,
                                  max_runtime_secs=left * OVERRUN + FINISH_RESERVE_S)
        self.trials = run_grid(configs, params, criteria, name=self.project_name,
                               storage_path=storage.join_uri(work_directory(), "ray_results"))
        rows = []
        for member, trial, cfg in zip(members, self.trials, configs):
            member.artifact_uri, member.registry_uri = trial.artifact_uri, trial.registry_uri
            m = trial.metrics
            rows.append(_row(member, cfg, trial.params["candidate"], validation_frame, x, {
                "mIoU": m.get("final_miou", m.get("val_miou")), "mDice": m.get("final_mdice"),
                "pixel_accuracy": m.get("final_pixel_accuracy", m.get("val_pixel_accuracy")),
                "training_s": round(trial.seconds, 1), "epochs": trial.epochs,
                "stopped_early": trial.stopped_early, "error": trial.error}))
        self.models = members
        return rows

    def _cross_validated(self, base: "UNetSegmentationEstimator",
                         chosen: list[tuple[str, dict[str, Any]]], manifest: str, share: float,
                         nfolds: int, validation_frame: Frame, x: str) -> list[dict[str, Any]]:
        """Each candidate's ``nfolds`` fold runs, then its main run, one candidate after
        another; their rows, with the mean and spread of the folds' mIoU."""
        from pipelines.train.cv import cross_validate
        from pipelines.train.train import train as run_train

        runs = math.ceil(nfolds / self.parallelism) + 1     # fold rounds, then the main run
        per_run = share / runs - TRIAL_OVERHEAD_S
        if per_run <= 0:
            raise ValueError(f"AutoSegmentation: max_runtime_secs={self.max_runtime_secs:g} "
                             f"leaves {share:.0f} s per candidate for {runs} runs of "
                             f"{nfolds}-fold cross-validation; give it more time or fewer "
                             f"models or folds")
        print(f"[{self.project_name}] {nfolds}-fold cross-validation: {runs} run(s) of "
              f"{per_run:.0f} s per candidate", flush=True)
        rows, self.models = [], []
        for label, extra in chosen:
            member = base.variant(f"{self.project_name}_{label}", {
                **extra, "max_runtime_secs": per_run, "epochs": BUDGET_EPOCHS,
                "nfolds": nfolds})
            member.planned = dict(base.planned)
            cfg = member.build_config(manifest, version="v1", nfolds=0)
            started, figures = time.monotonic(), {"error": None}
            try:
                member.cv_result = cross_validate(
                    member.build_config(manifest, version="v1-cv"), parallelism=self.parallelism)
                result = run_train(cfg)
            except Exception as failed:   # one candidate's failure is its row, not the search's
                figures["error"] = f"{type(failed).__name__}: {failed}"[:500]
            else:
                member.train_result = result
                member.artifact_uri, member.registry_uri = (result.artifact_uri,
                                                            result.registry_uri)
                cv = member.cv_result.summary_metrics["miou"]
                figures.update({"cv_mIoU": round(cv["mean"], 4),
                                "cv_mIoU_std": round(cv["std"], 4),
                                "mIoU": result.metrics["miou"], "mDice": result.metrics["mdice"],
                                "pixel_accuracy": result.metrics["pixel_accuracy"],
                                "epochs": len(result.history)})
            figures.update({"training_s": round(time.monotonic() - started, 1),
                            "stopped_early": False})
            rows.append(_row(member, cfg, label, validation_frame, x,
                             {"cv_mIoU": None, "cv_mIoU_std": None, "mIoU": None, "mDice": None,
                              "pixel_accuracy": None, "epochs": 0, **figures}))
            self.models.append(member)
        return rows


def candidates(cfg: "TrainConfig", given: dict[str, Any], full_size: tuple[int, int]
               ) -> list[tuple[str, dict[str, Any]]]:
    """The candidates' parameters on top of the planned config ``cfg`` (the module docstring's
    order); a dimension the user set in ``given`` is not varied.  ``full_size``: the data's
    median H x W (a full-size plan's second size resizes it, when that stays >=
    :data:`MIN_RESIZED` a side)."""
    from seg_core.config import as_hw

    found: list[tuple[str, dict[str, Any]]] = [("planned", {})]
    if "base_width" not in given and "model.base_width" not in given:
        found.append(("wider", {"base_width": cfg.model.base_width * 2}))
    if "arch" not in given and "model.arch" not in given and cfg.model.arch != "lite":
        found.append(("lite", {"arch": "lite"}))
    geometry = {"crop", "resize", "tile_size", "augment.crop", "preprocessing.resize",
                "preprocessing.tile_size"}
    if not geometry & set(given):
        if cfg.augment.crop is not None:
            side = _down16(min(as_hw(cfg.augment.crop, "augment.crop")) * SECOND_SIZE)
            found.append((f"crop{side}", {"crop": side, "tile_size": side}))
        elif cfg.preprocessing.resize is not None or min(full_size) >= MIN_RESIZED * 4 / 3:
            h, w = as_hw(cfg.preprocessing.resize or full_size, "preprocessing.resize")
            size = [_down16(h * SECOND_SIZE), _down16(w * SECOND_SIZE)]
            found.append((f"resize{size[0]}x{size[1]}", {"resize": size}))
    return found


def ranked(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Leaderboard rows best first by ``by``; rows without a score (failed, not started) last."""
    return sorted(rows, key=lambda r: -(r[by] if r[by] is not None else -1.0))


def _down16(side: float) -> int:
    return max(16, int(side) // 16 * 16)


def _row(member: "UNetSegmentationEstimator", cfg: "TrainConfig", candidate: str,
         frame: Frame, x: str, figures: dict[str, Any]) -> dict[str, Any]:
    """One leaderboard row: the candidate, its ``figures`` (scores, time, epochs, error), its
    inference pace and its model's shape."""
    error = figures.pop("error")
    figures.update({k: round(v, 4) for k, v in figures.items()
                    if k in SCORES and isinstance(v, float)})
    return {"model_id": member.model_id, "candidate": candidate, **figures,
            "images_per_s": _inference_pace(member.artifact_uri, frame, x)
            if member.artifact_uri else None,
            "arch": cfg.model.arch, "base_width": cfg.model.base_width, "depth": cfg.model.depth,
            "size": list(cfg.augment.crop_hw or cfg.preprocessing.resize or ()) or "full",
            "model": member.registry_uri, "error": error}


def _inference_pace(artifact_uri: str, frame: Frame, x: str) -> float:
    """Images/s of ``predict_one`` (decode to encoded mask) over up to :data:`TIMED_IMAGES`
    of ``frame``'s images, after one untimed warm-up image."""
    from pipelines.model import open_model

    model = open_model(artifact_uri)
    images = [storage.read_bytes(u) for u in frame.resolved(x)[:TIMED_IMAGES] if u]
    model.predict_one(images[0], id="warmup")
    started = time.perf_counter()
    for i, data in enumerate(images):
        model.predict_one(data, id=str(i))
    return round(len(images) / (time.perf_counter() - started), 2)


def _register_leader(artifact_uri: str, name: str) -> str:
    """The leader's artifact as a version of ``name``, aliased :data:`AUTO_ALIAS`."""
    from pipelines import registry

    ref = registry.register_artifact(artifact_uri, name)
    registry.set_alias(ref, AUTO_ALIAS)
    return f"{registry.MODELS_PREFIX}{name}@{AUTO_ALIAS}"


def _frame(rows: list[dict[str, Any]], uri: str) -> Frame:
    """The leaderboard as a table Frame, also written as JSON to ``uri``."""
    import pyarrow as pa

    storage.write_bytes(uri, json.dumps(rows, indent=2, default=str).encode())
    table = pa.Table.from_pylist([{k: (json.dumps(v) if isinstance(v, list) else v)
                                   for k, v in r.items()} for r in rows])
    return Frame(table, kind="table", source=uri)
