"""``GridSearch``: H2O's ``H2OGridSearch`` over :class:`UNetSegmentationEstimator`, on Ray Tune.

::

    grid = GridSearch(UNetSegmentationEstimator(num_classes=3, seed=1),
                      hyper_params={"lr": [1e-3, 3e-3], "loss": ["ce", "dice_ce"]},
                      search_criteria={"strategy": "RandomDiscrete", "max_models": 4, "seed": 1})
    grid.train(x="image", y="mask", training_frame=train, validation_frame=valid)
    grid.get_grid(sort_by="mIoU", decreasing=True)
    best = grid.models[0]

Each model is a full ``train()`` (:mod:`pipelines.train.tune`): finished ones are registered
like any trained model, and ``grid.models`` are estimators over them, best first.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pipelines import storage

if TYPE_CHECKING:
    import pandas

    from pipelines.api.api import UNetSegmentationEstimator
    from pipelines.api.frame import Frame

class GridSearch:
    """A grid of models that differ in ``hyper_params`` (estimator parameter names)."""

    def __init__(self, model: "UNetSegmentationEstimator",
                 hyper_params: Mapping[str, Sequence[Any]],
                 grid_id: str | None = None,
                 search_criteria: Mapping[str, Any] | None = None) -> None:
        from pipelines.api.api import _check_params
        from pipelines.train.tune import SearchCriteria, combinations

        _check_params(dict(hyper_params))
        self.model = model
        self.hyper_params = {k: list(v) for k, v in hyper_params.items()}
        self.grid_id = grid_id or f"grid_{uuid.uuid4().hex[:8]}"
        self.criteria = SearchCriteria.from_mapping(search_criteria)
        self.combinations = combinations(self.hyper_params, self.criteria)
        self.trials: list[Any] = []
        self.models: list["UNetSegmentationEstimator"] = []

    def train(self, x: str | None = None, y: str | None = None,
              training_frame: "Frame | None" = None, validation_frame: "Frame | None" = None,
              max_iterations: int | None = None, **overrides: Any) -> "GridSearch":
        """Train every combination (Ray Tune, ASHA early stopping); returns ``self``."""
        from pipelines.api.session import _connected, work_directory
        from pipelines.train.tune import run_grid

        base = self.model
        base.x, base.y = x or base.x, y or base.y
        base.training_frame = training_frame or base.training_frame
        base.validation_frame = validation_frame or base.validation_frame
        if base.training_frame is None or base.validation_frame is None:
            raise ValueError("GridSearch.train: needs a training_frame and a validation_frame "
                             "(trials are compared on validation mIoU)")
        base._params.update(overrides)
        manifest = base._training_manifest(self.grid_id)
        _connected()
        base.resolve_classes(manifest)
        base._apply_plan(manifest)   # one plan for every member; the grid's keys win over it
        estimators, configs = [], []
        for index, combo in enumerate(self.combinations):
            member = base.variant(f"{self.grid_id}_model_{index + 1}", combo)
            estimators.append(member)
            configs.append(member.build_config(manifest, max_iterations=max_iterations))
        self.trials = run_grid(configs, self.combinations, self.criteria, name=self.grid_id,
                               storage_path=storage.join_uri(work_directory(), "ray_results"))
        for member, trial in zip(estimators, self.trials):
            member.artifact_uri, member.registry_uri = trial.artifact_uri, trial.registry_uri
        ranked = sorted((t for t in self.trials if t.artifact_uri),
                        key=lambda t: -float(t.metrics.get("final_miou", float("-inf"))))
        self.models = [estimators[t.index] for t in ranked]
        target = storage.join_uri(work_directory(), "grids", f"{self.grid_id}.json")
        storage.write_bytes(target, json.dumps(
            {"grid_id": self.grid_id, "hyper_params": self.hyper_params,
             "search_criteria": dataclasses.asdict(self.criteria),
             "trials": [dataclasses.asdict(t) for t in self.trials]}, indent=2, default=str).encode())
        print(self.get_grid().to_string(index=False), flush=True)
        return self

    def get_grid(self, sort_by: str = "mIoU", decreasing: bool = True) -> "pandas.DataFrame":
        """One row per model: its parameters, metrics, epochs, early stop and registry URI;
        ``sort_by``: mIoU, mDice, pixel_accuracy, val_miou or train_loss."""
        from pipelines.train.tune import trials_table

        return trials_table(self.trials, [f"{self.grid_id}_model_{t.index + 1}"
                                          for t in self.trials],
                            sort_by=sort_by, decreasing=decreasing)
