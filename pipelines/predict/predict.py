"""Bulk offline inference: images in object storage -> one Parquet row per image, exactly once.

Pipeline (Ray Data, streaming)::

    ingest source (manifest | prefix | shards), minus ids already done     [fetch tasks]
      -> map_batches(Predictor, compute=ActorPoolStrategy(1..n, all n up)) [artifact once per actor]
      -> write_datasink(CommitSink)                                         [atomic Parquet files]

Every image goes through :meth:`pipelines.model.LoadedModel.predict_rows`, the loaded model the
Serve endpoint uses too: decode under the artifact's limits, the tiled
:class:`seg_core.inference.Segmenter` (so a 4000 x 4000 image only ever holds its tiles on the
device), one row format.  Bad bytes become quarantine rows with their reason; they never stop
the job, so ``input rows = predicted + quarantined``.  The provenance names the engine and device
as resolved (never ``auto``).

Exactly once: see :mod:`pipelines.predict.store`.  A rerun reads the ids already committed
under ``--out``, leaves them out *before* any bytes are fetched, and reports how many it skipped.
With ``format: coco-rle``, :func:`pipelines.predict.coco.export_coco` then writes COCO RLE files
of the whole store under ``<out>/coco/`` (a rerun writes them again, the new rows included).
"""
from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import registry, storage
from pipelines.config import PredictConfig
from pipelines.faults import Faults
from pipelines.model import artifact_meta, open_model
from pipelines.predict import store
from pipelines.predict.coco import coco_dir, export_coco
from pipelines.ingest.fetch import IO_TASK_CPUS
from pipelines.predict.inputs import InputPlan, actor_cpus, plan_inputs
from pipelines.predictions import file_key
from pipelines.raycluster import wait_note
from pipelines.records import RESULT_SCHEMA
from seg_core.config import to_dict

if TYPE_CHECKING:
    from pipelines.model import LoadedModel
    from seg_core.config import EngineKind, PostProcess

REPRODUCIBILITY_FILE = "_reproducibility.json"   # model (by weights hash), inputs, packages
DEFAULT_ROWS_PER_FILE = 256   # rows per committed file when the input is not shards


@dataclass(frozen=True)
class ActorPlan:
    """How many predictor actors, and the resources and torch threads of each."""

    size: int
    num_cpus: float
    num_gpus: float
    threads: int


# ------------------------------------------------------------------------------ the actor


class Predictor:
    """Ray Data callable class: opens the model once per actor, predicts pyarrow batches."""

    def __init__(self, model_uri: str, *, tta: bool, with_confidence: bool, threads: int,
                 engine: EngineKind = "auto", postprocess: "PostProcess | None" = None,
                 instances: str = "none",
                 storage_options: dict[str, Any] | None = None) -> None:
        import torch

        torch.set_num_threads(threads)
        # Tiles per forward (seg_core.inference.tiles_per_forward): on a CPU sized to the torch
        # threads just set (one 256^2 window per thread, more of smaller ones: fastest measured),
        # on a GPU from free memory, where the forward also runs in bf16 (`make gpu-check`).
        self.model: "LoadedModel" = open_model(model_uri, tta=tta, engine=engine,
                                               postprocess=postprocess, instances=instances,
                                               storage_options=storage_options)
        self.with_confidence = with_confidence

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.model.predict_rows(batch.to_pylist(), with_confidence=self.with_confidence)
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def plan_actors(cfg: PredictConfig, resources: dict[str, float]) -> ActorPlan:
    """One actor per GPU when there are GPUs; on CPUs, one single-threaded actor per CPU.

    On CPUs, separate processes scale better than torch's intra-op threads for images of a few
    tiles, so the default is many one-thread actors.  Fetch and write tasks ask for
    ``IO_TASK_CPUS`` each, so the actors share all but ``IO_CPUS_LEFT``
    (:func:`pipelines.predict.inputs.actor_cpus`).
    """
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if gpus:
        size = cfg.actors or gpus
        share = cfg.cpus_per_actor or 1.0
        return ActorPlan(size, share, 1.0, max(1, round(share)))
    size = cfg.actors or max(1, int(cpus))
    share = cfg.cpus_per_actor or actor_cpus(cpus, size)
    return ActorPlan(size, share, 0.0, max(1, round(share)))


# ------------------------------------------------------------------------------------ the run


def run_predict(cfg: PredictConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Predict every input not yet in ``cfg.out``; return (and print) the run summary.  With
    ``cfg.format`` coco-rle, the committed store is then exported to ``<out>/coco/`` (still
    under the lease, so no other run writes those files meanwhile)."""
    import ray
    from ray.data import DataContext

    started = time.perf_counter()
    resources = ray.cluster_resources()
    DataContext.get_current().enable_progress_bars = cfg.progress
    ref = registry.resolve(cfg.model)   # models:/name@alias -> the artifact, on the driver
    meta = artifact_meta(ref.source)
    with store.lease(cfg.out):   # one writer per output: a second run here is refused
        summary = _predict_under_lease(cfg, ref, meta, resources, log, started)
        if cfg.format == "coco-rle":
            export = export_coco(cfg.out, coco_dir(cfg.out), log=log)
            summary["coco"] = asdict(export)
            log(export.summary())
    return summary


def _predict_under_lease(cfg: PredictConfig, ref: registry.ModelRef, meta: dict[str, Any],
                         resources: dict[str, float], log: Callable[[str], None],
                         started: float) -> dict[str, Any]:
    plan = plan_actors(cfg, resources)
    engine = resolved_engine(cfg.engine, meta, gpu=bool(plan.num_gpus))
    pre = meta.get("preprocessing") or {}
    store.claim_output(cfg.out, {**ref.as_dict(), "name": meta["name"],
                                 "version": meta["version"],
                                 "weights_sha256": meta.get("weights_sha256"),
                                 "mask_spec": meta["mask_spec"], "tta": cfg.tta,
                                 "engine": engine, "engine_setting": cfg.engine,
                                 "device": "cuda" if plan.num_gpus else "cpu",
                                 "max_pixels": pre.get("max_pixels"),
                                 "tiff_page": pre.get("tiff_page"),
                                 "confidence_maps": cfg.confidence_maps,
                                 "postprocess": (to_dict(cfg.postprocess) if cfg.postprocess
                                                 is not None else meta.get("postprocess")),
                                 "instances": cfg.instances,
                                 "temperature": (meta.get("calibration") or {}).get(
                                     "temperature", 1.0),
                                 "calibration": meta.get("calibration"),
                                 "reported_metrics": meta.get("metrics") or {}})
    # one read of the committed files: ids and sources (and digests to verify)
    sources = store.done_sources(cfg.out, digests=cfg.verify_done)
    inputs = plan_inputs(cfg.input, sources["id"].combine_chunks(), split=cfg.split,
                         done_sources=sources, verify_done=cfg.verify_done, actors=plan.size)
    if inputs.conflicts:
        log(f"predict: {len(inputs.conflicts)} input id(s) already committed from another "
            f"source, left as they are (write to a fresh --out to predict them): "
            f"{'; '.join(inputs.conflicts[:5])}")
    if inputs.skipped:
        log(f"predict: skipped {inputs.skipped} of {len(inputs.ids)} inputs already committed "
            f"under {cfg.out}")
    options = storage.resolve_options()  # the driver's S3 endpoint/keys, shipped to the workers
    rows_per_file = rows_per_file_for(cfg, inputs)
    sink = store.CommitSink(cfg.out, rows_per_file=rows_per_file,
                            fail_after_files=Faults.from_env().fail_after_files,
                            storage_options=options)
    if inputs.todo:
        extra = "".join(f" + {amount:g} {name}" for name, amount in
                        (cfg.resources_per_actor or {}).items())
        log(f"predict: {inputs.todo} inputs -> {plan.size} actor(s) x {plan.num_cpus:g} CPU"
            f"{f' + {plan.num_gpus:g} GPU' if plan.num_gpus else ''}{extra}, "
            f"{plan.threads} thread(s), files of {rows_per_file} rows")
        # one actor and a read task must fit before the first row moves
        if note := wait_note("predict", {"CPU": plan.num_cpus + IO_TASK_CPUS,
                                         "GPU": plan.num_gpus,
                                         **(cfg.resources_per_actor or {})}):
            log(note)
        failure: Exception | None = None
        try:
            _write_predictions(inputs, sink, ref, cfg, plan, options)
        except Exception as error:   # noqa: BLE001 - re-raised below, its actors released
            failure = error
        if failure is not None:
            raise release_actors_of(failure)
    summary = _summary(cfg, sink.written, inputs, seconds=time.perf_counter() - started,
                       model=meta)
    store.write_success(cfg.out, summary)
    storage.write_bytes(storage.join_uri(cfg.out, REPRODUCIBILITY_FILE), json.dumps(
        registry.provenance(ref, meta, inputs={"uri": cfg.input, "split": cfg.split,
                                               "ids_sha256": file_key(
                                                   inputs.ids.to_pylist())},
                            settings={"tta": cfg.tta, "engine": engine,
                                      "engine_setting": cfg.engine,
                                      "confidence_maps": cfg.confidence_maps},
                            rows=summary["committed_rows"]), indent=2).encode() + b"\n")
    log(format_summary(summary))
    return summary


def rows_per_file_for(cfg: PredictConfig, inputs: InputPlan) -> int:
    """Rows per committed file: the setting, else one file per input shard's (selected) rows,
    else :data:`DEFAULT_ROWS_PER_FILE`.

    Output files the size of the input's shards keep a million-row output to as many files as
    the input has (hundreds of 256-row files of a few KiB each would be one S3 PUT, copy and
    delete per 256 rows, and a slow listing on resume); a crashed run redoes at most the
    files in flight, about one input shard per actor.
    """
    return cfg.rows_per_file or inputs.rows_per_shard or DEFAULT_ROWS_PER_FILE


def resolved_engine(setting: str, meta: dict[str, Any], *, gpu: bool) -> str:
    """The engine the actors will run for ``setting`` (``auto`` resolved as they resolve it:
    :func:`seg_core.runtimes.resolve_engine` on the actors' device and the model's arch)."""
    import torch

    from seg_core.runtimes import resolve_engine

    arch = (meta.get("model") or {}).get("arch", "unet")
    return resolve_engine(setting, torch.device("cuda" if gpu else "cpu"), arch)  # type: ignore


def _summary(cfg: PredictConfig, written: list[dict[str, Any]], inputs: InputPlan, *,
             seconds: float, model: dict[str, Any]) -> dict[str, Any]:
    """Counts of this run, checked against what is committed: duplicates and missing ids."""
    rows = sum(w["rows"] for w in written)
    quarantined = sum(w["quarantined"] for w in written)
    done = store.done_ids(cfg.out)
    return {
        "out": cfg.out, "model": f"{model['name']}:{model['version']}", "config": asdict(cfg),
        "inputs": len(inputs.ids), "skipped": inputs.skipped, "predicted": rows,
        "quarantined": quarantined, "files": sum(w["files"] for w in written),
        "seconds": round(seconds, 2),
        "images_per_s": round((rows + quarantined) / seconds, 2) if seconds > 0 else None,
        "committed_rows": len(done), "duplicates": len(done) - len(pc.unique(done)),
        "conflicts": list(inputs.conflicts),
        "missing": len(inputs.ids) - int(pc.sum(pc.is_in(inputs.ids, value_set=done)).as_py() or 0),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The human summary printed at the end of ``rayseg predict``."""
    return (f"predict: {summary['predicted']} predicted, {summary['quarantined']} quarantined, "
            f"{summary['skipped']} skipped (already done) of {summary['inputs']} inputs in "
            f"{summary['seconds']} s ({summary['images_per_s']} images/s); "
            f"{summary['committed_rows']} rows committed under {summary['out']} "
            f"({summary['duplicates']} duplicate ids, {summary['missing']} inputs missing, "
            f"{len(summary['conflicts'])} ids naming another source)")


def _write_predictions(inputs: InputPlan, sink: Any, ref: Any, cfg: PredictConfig,
                       plan: ActorPlan, options: dict[str, Any] | None) -> None:
    """The actor pool over the inputs still to do, into the commit sink."""
    from ray.data import ActorPoolStrategy

    inputs.dataset.map_batches(
        Predictor, batch_size=cfg.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"model_uri": ref.source, "tta": cfg.tta, "engine": cfg.engine,
                               "postprocess": cfg.postprocess, "instances": cfg.instances,
                               "with_confidence": cfg.confidence_maps,
                               "threads": plan.threads, "storage_options": options},
        # all actors start at once; min 1, so fewer input blocks than actors (a small
        # split) is no UserWarning about unused concurrency
        compute=ActorPoolStrategy(min_size=1, max_size=plan.size, initial_size=plan.size),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus or None, udf_modifying_row_count=False,
        **({"resources": dict(cfg.resources_per_actor)} if cfg.resources_per_actor else {}),
    ).write_datasink(sink, ray_remote_args={"num_cpus": IO_TASK_CPUS})


RELEASE_WAIT_S = 60.0   # how long a failed run waits for its predictors to be gone
QUIET_LOOKS = 5         # looks 0.2 s apart that find no new predictor before it stops looking


def release_actors_of(failure: Exception, *, wait_s: float = RELEASE_WAIT_S) -> Exception:
    """``failure`` of the predictor pool's run, after its actors were killed and are gone.

    Ray Data lets a failed run's actor pool go by reference count, but an actor task that was
    streaming its output when the run failed keeps a completion callback (holding the actor's
    handle) registered until it ends, and it never ends: the idle predictor keeps its CPUs for
    the life of the driver.  In a notebook, or any driver that runs the next job, that job
    could then wait for them forever.  So the failed run's predictors are killed here: every
    live handle of this module's :class:`Predictor` pool (one predict runs at a time in a
    driver).  The handles are looked for until :data:`QUIET_LOOKS` looks in a row (a second)
    find no new one (on a busy machine the executor's thread can still be starting an actor
    when the error arrives), and
    each killed actor is waited for until Ray reports it dead, so its CPUs are free when this
    returns (at most ``wait_s``).  The error keeps its type, message and traceback.
    """
    import gc

    import ray
    from ray.actor import ActorHandle

    def predictors() -> list[ActorHandle]:
        gc.collect()
        found = []
        for handle in [o for o in gc.get_objects() if isinstance(o, ActorHandle)]:
            descriptor = getattr(handle, "_ray_actor_creation_function_descriptor", None)
            name = getattr(descriptor, "class_name", "") or ""
            if name.startswith("MapWorker(") and f"({Predictor.__name__})" in name:
                found.append(handle)
        return found

    deadline = time.monotonic() + wait_s
    killed: dict[str, ActorHandle] = {}
    quiet = 0
    while quiet < QUIET_LOOKS and time.monotonic() < deadline:
        fresh = [h for h in predictors() if h._actor_id.hex() not in killed]
        for handle in fresh:
            ray.kill(handle)
            killed[handle._actor_id.hex()] = handle
        quiet = 0 if fresh else quiet + 1
        for handle in killed.values():
            _wait_until_dead(handle, deadline)
        time.sleep(0.2)
    return failure


def _wait_until_dead(handle: Any, deadline: float) -> bool:
    """True once Ray reports the (killed) actor dead; False when ``deadline`` passes first."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    while (left := deadline - time.monotonic()) > 0:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=left)
        except RayActorError:
            return True
        except GetTimeoutError:
            return False
        time.sleep(0.1)   # answered: the kill has not reached it yet
    return False
