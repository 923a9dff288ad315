"""``train(cfg) -> TrainResult``: a Ray Train ``TorchTrainer`` over seg_core, then a model artifact.

The driver side of training: build the Ray Datasets, size the workers from the cluster, run
``TorchTrainer.fit`` (checkpoints to ``storage.storage_path``, automatic restarts from the last
checkpoint via ``FailureConfig``, resume when the run name already has checkpoints), print
progress, and turn the final checkpoint into a seg_core artifact at
``<models_uri>/<name>/<version>/`` with ``metrics.json``, ``learning_curve.png`` and
``config.yaml`` beside it.  The per-worker loop is :mod:`pipelines.train.loop`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from pipelines import storage
from pipelines.config import TrainConfig, config_to_dict, dump_config
from pipelines.train.budget import fitted_note
from pipelines.train.checkpoint import NON_FINITE, load_newest_good
from pipelines.train.data import TASK_CPUS, build_train_data
from pipelines.faults import Faults
from pipelines.raycluster import wait_note
from pipelines.train.loop import StepPlan, train_loop_per_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What one training run produced."""

    artifact_uri: str  # <models_uri>/<name>/<version>
    metrics: dict[str, Any]  # val metrics of the saved weights (see train_loop.val_metrics)
    history: list[dict[str, Any]]  # one record per epoch
    run_name: str
    checkpoint_uri: str  # <storage_path>/<run_name>
    selected_epoch: int
    restarts: list[dict[str, Any]]  # {epoch, step, lr} each time the loop resumed
    stopped: str | None  # why training ended before `epochs`, if it did
    class_frequency: tuple[float, ...] = ()  # share of labelled training pixels per class
    class_weights: tuple[float, ...] | None = None  # the loss's weights (resolved from auto)
    registry_uri: str | None = None  # models:/<name>/<n> when the run was registered
    run_id: str | None = None  # its MLflow run

    def summary(self) -> str:
        """A few human lines: where the model is, how good it is, and a per-class table."""
        m = self.metrics
        return (f"model     {self.artifact_uri}"
                f"{'  (' + self.registry_uri + ')' if self.registry_uri else ''}\n"
                f"run       {self.checkpoint_uri} ({len(self.history)} epochs, "
                f"{len(self.restarts)} resumes{'; ' + self.stopped if self.stopped else ''})\n"
                f"val       mIoU {m['miou']:.4f}  mDice {m['mdice']:.4f}  pixel acc "
                f"{m['pixel_accuracy']:.4f}  (epoch {self.selected_epoch})\n"
                + self.class_table())

    def class_table(self) -> str:
        """Per class: training-pixel share, loss weight, val IoU and Dice; rare ones flagged."""
        m, k = self.metrics, len(self.metrics["class_names"])
        share = self.class_frequency or (float("nan"),) * k
        weights = self.class_weights or (1.0,) * k
        lines = [f"{'class':<20} {'train px':>9} {'weight':>7} {'val IoU':>8} {'val Dice':>8}"]
        for name, f, w, iou, dice in zip(m["class_names"], share, weights,
                                         m["per_class"]["iou"], m["per_class"]["dice"]):
            flag = "  rare (< 2% of pixels)" if f < RARE_CLASS_SHARE else ""
            lines.append(f"{name:<20} {f:>9.2%} {w:>7.3g} {_num(iou):>8} {_num(dice):>8}{flag}")
        if any(f < RARE_CLASS_SHARE for f in share) and self.class_weights is None:
            lines.append("rare classes: try class_weights=auto (median-frequency weights)")
        return "\n".join(lines)


RARE_CLASS_SHARE = 0.02  # classes under 2% of labelled pixels are flagged in the summary


def _num(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def train(cfg: TrainConfig, *, callbacks: list[Any] | None = None) -> TrainResult:
    """Train (or resume) ``cfg.run_name`` on Ray Train and write the artifact.

    ``callbacks``: Ray Train ``UserCallback`` objects for the run (a Tune trial passes
    ``TuneReportCallback``, :mod:`pipelines.train.tune`).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    started_at = time.time()
    if cfg.init_from is not None:
        cfg = resolve_init_from(cfg)

    # the console queue's actor process starts while the data is prepared, not beside the
    # TrainController's (both on the path to the first step on a 2-core node)
    progress = Queue(actor_options=driver_node_actor())
    if note := wait_note(f"[{cfg.run_name}] data", {"CPU": TASK_CPUS}):   # a decode task
        print(note, flush=True)
    data = build_train_data(cfg)
    cfg = resolve_class_weights(cfg, data.class_pixels, data.labelled_pixels)
    plan = plan_steps(cfg, data.num_train)
    run_uri = cfg.run_uri
    _save_run_config(cfg, run_uri)
    fs, path = storage.filesystem_for(cfg.storage.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "plan": plan, "augment": data.augment,
                           "cached": data.cached, "progress": progress,
                           "deadline": None if cfg.max_runtime_secs is None
                           else started_at + cfg.max_runtime_secs,
                           "val_images": data.num_val, "faults": Faults.from_env()},
        datasets={"train": data.train, **data.val},
        # val_<rank>: one per worker.  One worker reads "train" whole: a split would only add
        # a coordinator actor (a process start, seconds before the first batch).
        dataset_config=DataConfig(datasets_to_split=["train"] if len(data.val) > 1 else []),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=path,  # scheme-less: the filesystem carries the endpoint
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.storage.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.storage.num_to_keep),
            callbacks=list(callbacks or []),
        ),
    )
    print(f"[{cfg.run_name}] {data.num_train} train / {data.num_val} val images, "
          f"{plan.steps_per_epoch} steps per epoch, schedule {plan.total_steps} steps"
          f"{fitted_note(cfg.max_runtime_secs)}, checkpoints in {run_uri}", flush=True)
    # every worker at once (one placement group)
    if note := wait_note(f"[{cfg.run_name}] training", trainer.scaling_config.total_resources):
        print(note, flush=True)
    printer = _ProgressPrinter(progress, warm=functools.partial(
        _prepare_what_follows_fit, register=cfg.register and cfg.fold is None))
    try:
        result = trainer.fit()
    finally:
        printer.stop()
    if result.checkpoint is None:
        raise RuntimeError(f"{run_uri}: training finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = load_newest_good(directory, run_uri)
    result = write_artifact(cfg, state, data.source_sha256, run_uri,
                            calibration=calibration_images(data.train, cfg.preprocessing),
                            data_sha256=data.data_sha256, data_rows=data.num_train)
    result = dataclasses.replace(result, class_frequency=class_shares(cfg, data, state),
                                 class_weights=cfg.class_weights)
    if cfg.register and cfg.fold is None:
        result = register_run(cfg, result, data.data_sha256, started_at=started_at)
    return result


# history entries that are not per-epoch metrics for the tracking store: the val details (their
# scores are logged) and the wall-clock times of the epoch's first and last step
_NOT_TRACKED = frozenset({"val", "first_step_at", "last_step_at"})


def register_run(cfg: TrainConfig, result: TrainResult, data_sha256: str | None, *,
                 started_at: float | None = None) -> TrainResult:
    """Log the run to the tracking store (its start: ``started_at``, epoch seconds) and register
    its artifact as a new model version."""
    from pipelines import registry
    from seg_core.artifact import ARTIFACT_JSON

    meta = json.loads(storage.read_bytes(storage.join_uri(result.artifact_uri, ARTIFACT_JSON)))
    history = [{k: v for k, v in h.items() if k not in _NOT_TRACKED}
               | ({"val_mdice": h["val"]["mdice"]} if h.get("val") else {})
               for h in result.history]
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name in ("learning_curve.png", "metrics.json"):
            target = Path(tmp) / name
            target.write_bytes(storage.read_bytes(storage.join_uri(result.artifact_uri, name)))
            files.append(str(target))
        run_id = registry.log_training_run(
            run_name=cfg.run_name, params=registry.flatten("", config_to_dict(cfg)),
            history=history, summary={k: result.metrics[k] for k in
                                      ("miou", "mdice", "pixel_accuracy")},
            files=files, started_at=started_at, tags={"artifact_uri": result.artifact_uri,
                               "weights_sha256": meta["weights_sha256"],
                               "data_sha256": data_sha256 or "", "rayseg.name": cfg.name,
                               "rayseg.version": cfg.version})
    ref = registry.register(result.artifact_uri, cfg.name, weights_sha256=meta["weights_sha256"],
                            run_id=run_id, tags={"artifact_version": cfg.version,
                                                 "val_miou": round(result.metrics["miou"], 5),
                                                 registry.DATA_TAG: data_sha256 or ""})
    print(f"[{cfg.run_name}] registered {ref.uri} (run {run_id[:8]} in {registry.tracking_uri()})",
          flush=True)
    return dataclasses.replace(result, registry_uri=ref.uri, run_id=run_id)


def resolve_init_from(cfg: TrainConfig) -> TrainConfig:
    """``init_from`` as the artifact's own URI (registry URIs resolve here, on the driver), and
    a check, before any worker starts, that its weights fit this model."""
    from pipelines import registry
    from pipelines.model import open_artifact
    from seg_core.model import UNet, warm_start

    source = registry.resolve_source(cfg.init_from)
    trained = open_artifact(source)
    message = warm_start(UNet(cfg.model), trained.model.state_dict())   # ValueError if not
    print(f"[{cfg.run_name}] {message} from {cfg.init_from}"
          f"{'' if source == cfg.init_from else ' (' + source + ')'}", flush=True)
    return dataclasses.replace(cfg, init_from=source)


def driver_node_actor() -> dict[str, Any]:
    """Options of a zero-CPU helper actor pinned to the driver's node: it lives as long as the
    driver does, not with whichever node Ray would pick (and may lose mid-run)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


def resolve_class_weights(cfg: TrainConfig, class_pixels: tuple[int, ...],
                          labelled_pixels: int) -> TrainConfig:
    """``auto`` weights from the training masks: ``class_weights`` by median frequency,
    ``pos_weight`` (multi-label) by each class's negatives / positives."""
    from seg_core.losses import median_frequency_weights, positive_weights

    names = cfg.mask.names
    if cfg.class_weights == "auto":
        weights = median_frequency_weights(class_pixels)
        print(f"[{cfg.run_name}] class_weights=auto (median frequency, capped at 10): "
              + ", ".join(f"{n} {w:.3g}" for n, w in zip(names, weights)), flush=True)
        cfg = dataclasses.replace(cfg, class_weights=weights)
    if cfg.pos_weight == "auto":
        weights = positive_weights(class_pixels, labelled_pixels)
        print(f"[{cfg.run_name}] pos_weight=auto (negatives / positives, capped at 10): "
              + ", ".join(f"{n} {w:.3g}" for n, w in zip(names, weights)), flush=True)
        cfg = dataclasses.replace(cfg, pos_weight=weights)
    return cfg


# ----------------------------------------------------------------------------- sizing and plans


def plan_steps(cfg: TrainConfig, num_train: int) -> StepPlan:
    """Steps per epoch on every worker (the split gives each ``num_train // workers`` rows)."""
    per_worker = num_train // cfg.scaling.num_workers
    if per_worker < 1:
        raise ValueError(f"{num_train} training images cannot feed {cfg.scaling.num_workers} "
                         f"workers; lower scaling.num_workers or add data")
    steps = math.ceil(per_worker / cfg.batch_size)
    total = steps * cfg.epochs
    if cfg.max_iterations is not None:
        total = min(total, cfg.max_iterations)
    return StepPlan(steps_per_epoch=steps, total_steps=max(total, 1))


def scaling_config(cfg: TrainConfig) -> Any:
    """Workers from config; GPUs when the cluster has them; fractional CPUs on small boxes;
    the config's custom resources and placement strategy (which nodes the workers land on).

    A Train worker holding a whole CPU on a 2-CPU cluster leaves Ray Data nothing to read with
    and the run hangs (notes §3.2), so by default each worker takes at most
    ``(cluster CPUs - 1) / workers`` CPUs, never more than 1 and never less than 0.25.
    """
    import ray
    from ray.train import ScalingConfig

    spec = cfg.scaling
    resources = ray.cluster_resources()
    use_gpu = spec.use_gpu if spec.use_gpu is not None else resources.get("GPU", 0) > 0
    cpus = spec.cpus_per_worker
    if cpus is None:
        cpus = default_cpus_per_worker(resources.get("CPU", 1.0), spec.num_workers)
    per_worker: dict[str, float] = {"CPU": cpus, **(spec.resources_per_worker or {})}
    if use_gpu:
        per_worker["GPU"] = spec.gpus_per_worker
    return ScalingConfig(num_workers=spec.num_workers, use_gpu=use_gpu,
                         resources_per_worker=per_worker,
                         placement_strategy=spec.placement_strategy)


def default_cpus_per_worker(cluster_cpus: float, num_workers: int, trainers: int = 1) -> float:
    """``(cluster CPUs - 1) / (workers * trainers)`` in quarter steps, clamped to 0.25 .. 1.

    One CPU stays free for Ray Data; e.g. 2 CPUs, 2 workers -> 0.5 each (the 2-core hang fix).
    """
    spare = (cluster_cpus - 1.0) / (num_workers * trainers)
    return min(1.0, max(0.25, math.floor(spare * 4) / 4))


# ------------------------------------------------------------------------------------ outputs


def class_shares(cfg: TrainConfig, data: Any, state: dict[str, Any]) -> tuple[float, ...]:
    """Each class's share of the training pixels: counted over the cached set, or, when the set
    was streamed (nothing counted it up front), over the batches the network was shown."""
    pixels, labelled = tuple(data.class_pixels), data.labelled_pixels
    if not pixels:
        seen = [r["class_pixels_seen"] for r in state.get("history", [])
                if r.get("class_pixels_seen")]
        if not seen:
            return ()
        summed = np.sum(seen, axis=0)
        pixels, labelled = tuple(int(c) for c in summed[:-1]), int(summed[-1])
    total = max(labelled if cfg.mask.multilabel else sum(pixels), 1)
    return tuple(c / total for c in pixels)


def calibration_images(train: Any, pre: Any) -> list[Any]:
    """The first training images of the Ray dataset ``train`` (at most ``CALIBRATION_IMAGES``)
    as the network takes them (compact pixels normalised with ``pre``): what INT8 engines
    calibrate on (``seg_core.runtimes``).  Cheap: the training set is usually cached, and
    otherwise one block is read again."""
    import torch

    from pipelines.train.data import network_input
    from seg_core.runtimes import CALIBRATION_IMAGES

    return [network_input(torch.from_numpy(np.array(row["image"])), pre).numpy()
            for row in train.take(CALIBRATION_IMAGES)]


def write_artifact(cfg: TrainConfig, state: dict[str, Any], source_sha256: str,
                   run_uri: str, calibration: list[Any] | None = None, *,
                   data_sha256: str | None = None, data_rows: int | None = None) -> TrainResult:
    """Checkpoint state -> ``<models_uri>/<name>/<version>/`` (artifact + metrics + plot + config,
    ``calibration`` images for INT8 engines when given, and the drift baseline: the val split's
    prediction statistics, :mod:`pipelines.operate.monitor`)."""
    from pipelines.evaluate.plots import learning_curve_png
    from seg_core.artifact import reproducibility_record, save_artifact
    from seg_core.model import UNet
    from seg_core.runtimes import save_calibration

    best = state.get("best")
    broken = (state.get("stopped") or "").startswith(NON_FINITE)
    if broken and best is None:
        raise RuntimeError(f"{run_uri}: {state['stopped']}; it happened before the first epoch "
                           f"ended, so there are no weights worth exporting")
    if (cfg.artifact_weights == "best" or broken) and best is not None:
        weights, val, epoch = best["model"], best["val"], best["epoch"]
    else:
        # the last epoch is always validated (val_fraction); the newest validation otherwise
        val = next(h["val"] for h in reversed(state["history"]) if h.get("val") is not None)
        weights, epoch = state["model"], state["epoch"]
    unet = UNet(cfg.model)
    unet.load_state_dict(weights)
    uri = storage.join_uri(cfg.storage.models_uri, cfg.name, cfg.version)
    history = state["history"]
    summary = {"miou": val["miou"], "mdice": val["mdice"], "pixel_accuracy": val["pixel_accuracy"],
               "class_names": val["class_names"], "iou": val["per_class"]["iou"],
               "dice": val["per_class"]["dice"], "epoch": epoch}
    chosen = f"best (epoch {epoch}: the last weights are not finite)" if broken \
        else cfg.artifact_weights
    report = {"val": val, "selected_epoch": epoch, "artifact_weights": chosen,
              "epochs_completed": state["epoch"], "steps": state["step"],
              "stopped": state["stopped"], "restarts": state["restarts"],
              "schedule": state.get("schedule"),
              "history": [{k: v for k, v in h.items() if k != "val"} | {"val_iou": h["val"]
                          ["per_class"]["iou"] if h.get("val") else None} for h in history],
              "run": run_uri, "fold": cfg.fold}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(storage.strip_scheme(uri)) if storage.is_local(uri) else Path(tmp)
        save_artifact(local, unet, name=cfg.name, version=cfg.version, mask_spec=cfg.mask,
                      preprocessing=trained_preprocessing(cfg, state),
                      reproducibility=reproducibility_record(seed=cfg.seed,
                                                             manifest_sha256=source_sha256,
                                                             data_sha256=data_sha256,
                                                             data_rows=data_rows,
                                                             fold=cfg.fold),
                      metrics=summary)
        fitted = (cfg.tune_postprocess or cfg.calibrate) and cfg.fold is None
        if fitted:   # and the drift baseline, from the same pass over the val images
            report.update(fit_on_val(cfg, local))
        (local / "metrics.json").write_text(json.dumps(_finite(report), indent=2) + "\n")
        (local / "config.yaml").write_text(dump_config(cfg))
        learning_curve_png(history, local / "learning_curve.png",
                           title=f"{cfg.name} {cfg.version}")
        if calibration:
            save_calibration(local, calibration)
        if cfg.fold is None and not fitted:
            write_val_baseline(cfg, local)
        if not storage.is_local(uri):
            storage.copy_dir_from_local(local, uri)
    return TrainResult(artifact_uri=uri, metrics=val, history=history, run_name=cfg.run_name,
                       checkpoint_uri=run_uri, selected_epoch=epoch, restarts=state["restarts"],
                       stopped=state["stopped"])


def fit_on_val(cfg: TrainConfig, artifact_dir: Path) -> dict[str, Any]:
    """The per-class post-processing and the confidence temperature fitted on the val split and
    recorded in the artifact (:mod:`pipelines.train.postprocess`), then the drift baseline from
    the same predictions; returns ``metrics.json``'s ``postprocess`` (rules and evidence) and
    ``calibration`` entries."""
    from pipelines.train import postprocess
    from seg_core.config import to_dict

    found = postprocess.fit_on_val(
        artifact_dir, cfg.data.manifest or cfg.data.shards,
        kind="auto" if cfg.data.manifest else "shards", split=cfg.data.val_split,
        postprocess=cfg.tune_postprocess, calibrate=cfg.calibrate, baseline=True,
        log=lambda line: print(f"[{cfg.run_name}] {line}", flush=True))
    report: dict[str, Any] = {}
    if found["rules"] is not None:
        report["postprocess"] = {"rules": to_dict(found["rules"]), **found["evidence"]}
    if found["calibration"] is not None:
        report["calibration"] = found["calibration"]
    return report


def write_val_baseline(cfg: TrainConfig, artifact_dir: Path) -> None:
    """``baseline.json`` in the artifact: the val split as the new model predicts it."""
    from pipelines.operate import monitor

    source = cfg.data.manifest or cfg.data.shards
    blobs = monitor.val_images(source, kind="auto" if cfg.data.manifest else "shards",
                               split=cfg.data.val_split)
    monitor.write_baseline(artifact_dir, blobs)


def trained_preprocessing(cfg: TrainConfig, state: dict[str, Any]) -> Any:
    """``cfg.preprocessing`` plus ``train_size``: what the network saw per forward in training.

    The loop records it (the crop, the resize or the largest native image); checkpoints from
    before it did fall back to the config's crop or resize.
    """
    from seg_core.config import training_geometry

    seen = state.get("train_size") or training_geometry(cfg.preprocessing,
                                                        cfg.augment.crop_hw)
    return dataclasses.replace(cfg.preprocessing,
                               train_size=tuple(int(v) for v in seen) if seen else None)


def _save_run_config(cfg: TrainConfig, run_uri: str) -> None:
    """Write the resolved config beside the checkpoints; warn when a resume changes it."""
    target = storage.join_uri(run_uri, "config.yaml")
    if storage.exists(target):
        before = yaml.safe_load(storage.read_bytes(target).decode())
        changed = sorted(k for k, v in config_to_dict(cfg).items() if before.get(k) != v)
        if changed:
            logger.warning("%s: resuming with changed settings %s (the LR schedule may jump)",
                           run_uri, changed)
    storage.write_bytes(target, dump_config(cfg).encode())


def _finite(value: Any) -> Any:
    """NaN/inf -> None so that metrics.json stays strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _prepare_what_follows_fit(register: bool) -> None:
    """While the driver waits for training: import what writing the artifact needs and the
    driver has not imported yet (SciPy for the post-processing search, the monitor's baseline,
    Matplotlib for the learning curve) and, when the run will be ``register``-ed, open the
    tracking store.  Done after fit() returned they added 0.45 s to the end of a short run on
    this 2-core box (fit_on_val 0.95 s cold against 0.76 s warm, the learning curve 0.37 s
    against 0.15 s), and registering took 1.05 s, most of it importing MLflow (1,137 modules)
    and opening its SQLite store."""
    import importlib

    with contextlib.suppress(Exception):   # whatever is missing fails later, where it is used
        import matplotlib

        matplotlib.use("Agg")   # as pipelines.evaluate.plots does
        for name in ("matplotlib.pyplot", "matplotlib.backends.backend_agg", "scipy.ndimage",
                     "pipelines.model", "pipelines.operate.monitor", "pipelines.train.postprocess"):
            importlib.import_module(name)
        if register:
            from pipelines import registry

            registry.client()   # cached: register_run's calls find it open


class _ProgressPrinter:
    """Prints the loop's progress lines on the driver (worker stdout may not reach it).

    Its thread waits on the queue's actor for the next line; :meth:`stop` puts None after the
    last one.  It asked every 0.5 s before, which kept the queue's actor 0.4% of this 2-core
    box busy all through training and made ``stop`` wait up to 0.5 s (0.25 s on average) at the
    end of every run.  After the second line it runs ``warm``: by then the workers train and
    the driver only waits (at the first line, "N worker(s) on ...", it slowed the first epoch's
    steps)."""

    _WAIT_S = 60.0   # per request; a line or None normally comes first

    def __init__(self, queue: Any, warm: Callable[[], None] | None = None) -> None:
        self._queue, self._warm = queue, warm
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty

        warm, printed = self._warm, 0
        while True:
            try:
                line = self._queue.get(timeout=self._WAIT_S)
            except Empty:
                continue
            except Exception:   # the queue's actor is gone: nothing more can come
                return
            if line is None:
                return
            print(line, flush=True)
            printed += 1
            if warm is not None and printed == 2:
                warm()

    def stop(self) -> None:
        with contextlib.suppress(Exception):   # a gone actor: the thread has ended already
            self._queue.put_nowait(None)
        self._thread.join(timeout=5)
        self._queue.shutdown()
