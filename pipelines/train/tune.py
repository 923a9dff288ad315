"""Grid search on Ray Tune, in H2O's terms (``H2OGridSearch``): one trial per combination of
hyperparameters, each trial one :func:`pipelines.train.train.train` run (a Ray Train
``TorchTrainer`` with its own workers), and ASHA stopping the trials whose val mIoU trails.

- ``Cartesian`` runs every combination; ``RandomDiscrete`` a seeded random order of them, cut at
  ``max_models`` (H2O's names).  ``max_runtime_secs`` is Tune's time budget for the whole grid.
- Trials report every epoch (``ray.tune.integration.ray_train.TuneReportCallback`` forwards the
  loop's own ``ray.train.report``), and every epoch is validated, so ASHA compares trials on val
  mIoU at the same epochs (rungs at ``grace_period`` x ``reduction_factor``^k).
- ``parallelism`` trials run at once.  A trial's driver takes 0.01 CPU and its workers share the
  cluster's CPUs less one (left to Ray Data: the 2-core hang in the Ray notes), as CV folds do.
- Trials that finish write an artifact and register it like any ``rayseg train``; a trial ASHA
  stopped keeps its last metrics in the table and has no artifact.
- A stopped trial's workers must give their CPUs back: Tune kills the trial, and the placement
  group its Ray Train controller made would outlive it (Ray frees such a group only when the
  driver exits), so later trials would wait for CPUs forever.  :func:`_release_stopped_trials`
  removes those groups as Tune runs (:func:`pipelines.raycluster.release_orphaned_placement_groups`).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from pipelines import storage
from pipelines.config import TrainConfig

if TYPE_CHECKING:
    import pandas

Strategy = Literal["Cartesian", "RandomDiscrete"]
# A trial's driver only waits on its trainer; Tune refuses a trial that asks for nothing.
TRIAL_DRIVER_CPU = 0.01


@dataclass(frozen=True)
class SearchCriteria:
    """H2O's ``search_criteria``, plus the early-stopping and concurrency knobs."""

    strategy: Strategy = "Cartesian"
    max_models: int | None = None
    seed: int | None = None
    max_runtime_secs: float | None = None
    parallelism: int = 2          # trials at once
    grace_period: int = 1         # ASHA: epochs every trial gets before it may be stopped
    reduction_factor: int = 2     # ASHA: at each rung, the best 1/reduction_factor go on

    def __post_init__(self) -> None:
        if self.strategy not in ("Cartesian", "RandomDiscrete"):
            raise ValueError(f"search_criteria: strategy must be 'Cartesian' or "
                             f"'RandomDiscrete', got {self.strategy!r}")
        if self.max_models is not None and self.max_models < 1:
            raise ValueError(f"search_criteria: max_models must be >= 1, got {self.max_models}")
        if self.parallelism < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("search_criteria: expected parallelism >= 1, grace_period >= 1 and "
                             "reduction_factor >= 2")

    @classmethod
    def from_mapping(cls, criteria: Mapping[str, Any] | None) -> "SearchCriteria":
        from seg_core.config import from_dict

        return from_dict(cls, dict(criteria or {}))


def combinations(hyper_params: Mapping[str, Sequence[Any]],
                 criteria: SearchCriteria) -> list[dict[str, Any]]:
    """The trials' parameters: the Cartesian product (in the given key order), shuffled with
    ``seed`` for ``RandomDiscrete`` (without repeats), cut at ``max_models``."""
    if not hyper_params:
        raise ValueError("grid search: hyper_params is empty")
    for key, values in hyper_params.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"grid search: hyper_params[{key!r}] must be a non-empty list of "
                             f"values, got {values!r}")
    keys = list(hyper_params)
    combos = [dict(zip(keys, values))
              for values in itertools.product(*(hyper_params[k] for k in keys))]
    if criteria.strategy == "RandomDiscrete":
        random.Random(criteria.seed).shuffle(combos)
    return combos[:criteria.max_models] if criteria.max_models else combos


@dataclass(frozen=True)
class Trial:
    """One trial's outcome."""

    index: int
    params: dict[str, Any]
    run_name: str
    metrics: dict[str, Any]           # the last epoch it reported
    epochs: int
    stopped_early: bool               # ASHA (or the time budget) ended it before its epochs
    artifact_uri: str | None
    registry_uri: str | None
    seconds: float
    error: str | None = None


def run_grid(configs: Sequence[TrainConfig], params: Sequence[Mapping[str, Any]],
             criteria: SearchCriteria, *, name: str, storage_path: str,
             log: Any = print) -> list[Trial]:
    """Run one trial per config on Ray Tune (see the module docstring); trials in input order."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # Tune's newer console output prints a configuration box, result paths and a TensorBoard
    # hint even at verbose=0; the classic engine at 0 prints nothing (rayseg prints the table)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    cpus = ray.cluster_resources().get("CPU", 1.0)
    at_once = min(criteria.parallelism, len(configs))
    configs = [_trial_config(c, cpus, at_once) for c in configs]
    max_epochs = max(c.epochs for c in configs)
    grace = min(criteria.grace_period, max_epochs)
    # one report per epoch, then the trial's last one with its artifact: max_t is one past the
    # epochs, or ASHA would stop every trial at its last epoch, before the artifact is reported
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_epochs + 1,
                              grace_period=grace, reduction_factor=criteria.reduction_factor)
    fs, path = storage.filesystem_for(storage_path)
    released = _release_stopped_trials()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, configs=list(configs)),
                            {"cpu": TRIAL_DRIVER_CPU}),
        param_space={"index": tune.grid_search(list(range(len(configs))))},
        tune_config=tune.TuneConfig(metric="val_miou", mode="max", scheduler=scheduler,
                                    max_concurrent_trials=at_once,
                                    time_budget_s=criteria.max_runtime_secs),
        run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                                  verbose=0, callbacks=[released]),
    )
    workers = configs[0].scaling
    log(f"[{name}] {len(configs)} trials, {at_once} at once, ASHA on val mIoU (grace {grace} "
        f"epochs, reduction {criteria.reduction_factor}); {workers.num_workers} worker(s) per "
        f"trial at {workers.cpus_per_worker or 'GPU'} CPU of the cluster's {cpus:g}")
    grid = tuner.fit()
    if released.groups:
        log(f"[{name}] gave back the workers' CPUs of {released.groups} stopped trial(s)")
    trials: dict[int, Trial] = {}
    for result in grid:
        index = int(result.config["index"])
        metrics = dict(result.metrics or {})
        artifact = metrics.get("artifact_uri")
        trials[index] = Trial(
            index=index, params=dict(params[index]), run_name=configs[index].run_name,
            metrics={k: v for k, v in metrics.items() if k in _KEPT}, epochs=int(
                metrics.get("epoch") or 0), stopped_early=artifact is None and result.error is None,
            artifact_uri=artifact, registry_uri=metrics.get("registry_uri"),
            seconds=float(metrics.get("time_total_s") or 0.0),
            error=None if result.error is None else f"{type(result.error).__name__}: "
                                                     f"{result.error}"[:500])
    missing = [i for i in range(len(configs)) if i not in trials]   # the time budget ran out
    for index in missing:
        trials[index] = Trial(index=index, params=dict(params[index]),
                              run_name=configs[index].run_name, metrics={}, epochs=0,
                              stopped_early=True, artifact_uri=None, registry_uri=None,
                              seconds=0.0, error="not started: max_runtime_secs ran out")
    return [trials[i] for i in range(len(configs))]


_KEPT = ("val_miou", "val_pixel_accuracy", "train_loss", "epoch", "step", "lr", "final_miou",
         "final_mdice", "final_pixel_accuracy", "selected_epoch")


def _release_stopped_trials(period_s: float = 1.0) -> Any:
    """A Tune callback that, after Tune's steps (at most every ``period_s``) and when a trial
    ends, removes the placement groups of Ray Train controllers that died with their stopped
    trial (see the module docstring); ``.groups`` counts them.  Built here so that importing
    this module does not import Ray Tune."""
    from ray import tune

    from pipelines.raycluster import release_orphaned_placement_groups

    class ReleaseStoppedTrials(tune.Callback):
        def __init__(self) -> None:
            self.groups = 0
            self._last = 0.0

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            if time.monotonic() - self._last >= period_s:
                self.sweep()

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                              **info: Any) -> None:
            self.sweep()

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                           **info: Any) -> None:
            self.sweep()

        def sweep(self) -> None:
            self._last = time.monotonic()
            self.groups += release_orphaned_placement_groups()

    return ReleaseStoppedTrials()


def _trial_config(cfg: TrainConfig, cpus: float, at_once: int) -> TrainConfig:
    """Every epoch validated (ASHA compares val mIoU at each rung); workers share the CPUs."""
    from pipelines.train.train import default_cpus_per_worker

    scaling = cfg.scaling
    if scaling.cpus_per_worker is None and not scaling.use_gpu:
        scaling = dataclasses.replace(scaling, cpus_per_worker=default_cpus_per_worker(
            cpus, scaling.num_workers, at_once))
    return dataclasses.replace(cfg, scaling=scaling, val_fraction=None, stopping_rounds=None)


def _trial(config: dict[str, Any], configs: list[TrainConfig]) -> None:
    """One Tune trial: a whole ``train()`` whose epochs reach Tune, then the artifact.

    Tune runs the trial in a placement group that captures every task started from it, so
    Ray Data's own small tasks would wait forever for the trial's 0.01-CPU bundle.  ``train()``
    therefore runs in a task scheduled outside it (``scheduling_strategy="DEFAULT"``), and
    Tune hears each epoch through the callback built here, in the trial's session.  When ASHA
    stops the trial, that task and its trainer go with the trial (their owner).
    """
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train.train import train

    started = time.perf_counter()
    outside = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy="DEFAULT")(train)
    result = ray.get(outside.remote(configs[int(config["index"])],
                                    callbacks=[TuneReportCallback()]))
    last = result.history[-1] if result.history else {}
    tune.report({"epoch": last.get("epoch", 0), "val_miou": result.metrics["miou"],
                 "final_miou": result.metrics["miou"], "final_mdice": result.metrics["mdice"],
                 "final_pixel_accuracy": result.metrics["pixel_accuracy"],
                 "selected_epoch": result.selected_epoch, "artifact_uri": result.artifact_uri,
                 "registry_uri": result.registry_uri or "",
                 "train_seconds": time.perf_counter() - started})


# get_grid(sort_by=...) / table names, H2O-style, -> the trial metric they sort on
SORT_KEYS = {"miou": "final_miou", "mean_iou": "final_miou", "mdice": "final_mdice",
             "pixel_accuracy": "final_pixel_accuracy", "val_miou": "val_miou",
             "train_loss": "train_loss"}


def trials_table(trials: Sequence[Trial], model_ids: Sequence[str], *, sort_by: str = "mIoU",
                 decreasing: bool = True) -> "pandas.DataFrame":
    """One row per trial: model id, parameters, mIoU / mDice (a stopped trial: its last val
    mIoU), epochs, stopped early, seconds, registry URI; sorted on ``sort_by``, trials without
    that figure last."""
    import pandas

    key = SORT_KEYS.get(sort_by.lower())
    if key is None:
        raise ValueError(f"sort_by must be one of {sorted(SORT_KEYS)}, got {sort_by!r}")
    rows = []
    for trial, model_id in zip(trials, model_ids):
        row = {"model_id": model_id, **trial.params,
               "mIoU": trial.metrics.get("final_miou", trial.metrics.get("val_miou")),
               "mDice": trial.metrics.get("final_mdice"), "epochs": trial.epochs,
               "stopped_early": trial.stopped_early, "seconds": round(trial.seconds, 1),
               "model": trial.registry_uri, "_sort": trial.metrics.get(key)}
        if trial.error:
            row["error"] = trial.error
        rows.append(row)
    frame = pandas.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame.sort_values("_sort", ascending=not decreasing, na_position="last")
    return frame.drop(columns="_sort").reset_index(drop=True)


def run_grid_yaml(config: Any, grid: Any, overrides: Sequence[str] = ()) -> str:
    """``rayseg tune``: the base TrainConfig (YAML + ``--set``), one trial per combination of
    the grid YAML's ``hyper_params`` (dotted keys); returns the printed table."""
    import json
    import uuid

    import yaml

    from pipelines.config import load_train_config

    spec = yaml.safe_load(open(grid).read()) or {}
    unknown = sorted(set(spec) - {"hyper_params", "search_criteria"})
    if unknown or "hyper_params" not in spec:
        raise ValueError(f"{grid}: expected hyper_params (and search_criteria), got keys "
                         f"{sorted(spec)}")
    criteria = SearchCriteria.from_mapping(spec.get("search_criteria"))
    combos = combinations(spec["hyper_params"], criteria)
    base = load_train_config(config, list(overrides))
    grid_id = f"grid-{uuid.uuid4().hex[:8]}"
    configs, model_ids = [], []
    for index, combo in enumerate(combos):
        model_id = f"{base.name}-{grid_id}-{index + 1}"
        settings = [f"{k}={json.dumps(v)}" for k, v in combo.items()]
        configs.append(load_train_config(config, [*overrides, *settings, f"name={model_id}"]))
        model_ids.append(model_id)
    trials = run_grid(configs, combos, criteria, name=grid_id,
                      storage_path=base.storage.storage_path)
    table = trials_table(trials, model_ids)
    storage.write_bytes(storage.join_uri(base.storage.storage_path, grid_id, "grid.json"),
                        json.dumps({"grid_id": grid_id, "hyper_params": spec["hyper_params"],
                                    "search_criteria": dataclasses.asdict(criteria),
                                    "trials": [dataclasses.asdict(t) for t in trials]},
                                   indent=2, default=str).encode())
    return table.to_string(index=False)
