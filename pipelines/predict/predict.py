"""Bulk offline inference: images in object storage -> one Parquet row per image, exactly once.

Pipeline (Ray Data, streaming)::

    ingest source (manifest | prefix | shards), minus ids already done     [fetch tasks]
      -> map_batches(Predictor, compute=ActorPoolStrategy(1..n, all n up)) [artifact once per actor]
      -> write_datasink(CommitSink)                                         [atomic Parquet files]

Every image goes through :func:`predict_rows`, the code the Serve endpoint can call too
(:func:`predict_one`, :func:`records.prediction_row`): decode with :mod:`seg_core.codecs`, tiled
:class:`seg_core.inference.Segmenter` (so a 4000 x 4000 image only ever holds its tiles on the
device), :func:`seg_core.inference.encode_prediction`.  Bad bytes become quarantine rows with their
reason; they never stop the job, so ``input rows = predicted + quarantined``.

Exactly once: see :mod:`pipelines.predict.store`.  A rerun reads the ids already committed
under ``--out``, leaves them out *before* any bytes are fetched, and reports how many it skipped.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import registry, storage
from pipelines.config import PredictConfig
from pipelines.faults import Faults
from pipelines.predict import store
from pipelines.predict.inputs import InputPlan, plan_inputs
from pipelines.records import RESULT_SCHEMA, prediction_row, quarantine_row, refusal
from seg_core.codecs import decode_image
from seg_core.errors import InputError

if TYPE_CHECKING:
    from seg_core.inference import Segmenter

STAGE = "predict"
REPRODUCIBILITY_FILE = "_reproducibility.json"   # model (by weights hash), inputs, packages
GROUP_PIXELS = 8 * 2**20  # decoded pixels predicted together (a 16 x 512^2 batch is 4 Mi)


@dataclass(frozen=True)
class ActorPlan:
    """How many predictor actors, and the resources and torch threads of each."""

    size: int
    num_cpus: float
    num_gpus: float
    threads: int


# ---------------------------------------------------------------------------- per-image rows


def predict_one(segmenter: "Segmenter", image_bytes: bytes | None, *, model_name: str,
                model_version: str, id: str = "", source_uri: str | None = None,
                with_confidence: bool = False, weights_sha256: str | None = None,
                created_at: dt.datetime | None = None) -> dict[str, Any]:
    """Decode, predict and encode one image -> its Parquet row.  Raises :class:`InputError`.

    The single-image form of :func:`predict_rows` (same decode, :class:`Segmenter`, and
    :func:`records.prediction_row`), for callers holding one image's bytes; the Serve replica builds its
    rows with :func:`records.prediction_row` too, so all three write the same row for the same bytes.
    """
    image = _decode(image_bytes, source_uri or id or "<bytes>", segmenter.preprocessing)
    return prediction_row(segmenter.predict(image), segmenter, id=id, source_uri=source_uri,
                          source_sha256=_sha256(image_bytes), model_name=model_name,
                          model_version=model_version, with_confidence=with_confidence,
                          weights_sha256=weights_sha256, created_at=created_at)


def predict_rows(segmenter: "Segmenter", rows: list[dict[str, Any]], *, model_name: str,
                 model_version: str, with_confidence: bool,
                 weights_sha256: str | None = None) -> list[dict[str, Any]]:
    """Input rows (``id, image_uri, image_bytes, ...``) -> one result row each, in order.

    Result rows follow :data:`records.RESULT_SCHEMA`: a prediction, or (``reason`` set)
    a quarantine row.  Never raises on bad bytes.  Decoded images are predicted in groups of at
    most :data:`GROUP_PIXELS` pixels through :meth:`Segmenter.predict_each` (shared forwards),
    so a batch of small images costs a few batched forwards while a batch of huge images still
    holds about one decoded image at a time.
    """
    now = dt.datetime.now(dt.timezone.utc)
    results: list[dict[str, Any] | None] = [None] * len(rows)
    group: list[tuple[int, Any]] = []  # (row index, decoded image)

    def flush() -> None:
        predictions = segmenter.predict_each([image for _, image in group])
        for (index, _), prediction in zip(group, predictions):
            row = rows[index]
            if isinstance(prediction, InputError):
                results[index] = _quarantine_row(row, prediction, now)
                continue
            results[index] = prediction_row(
                prediction, segmenter, id=row["id"], source_uri=row.get("image_uri"),
                source_sha256=_sha256(row["image_bytes"]), model_name=model_name,
                model_version=model_version, with_confidence=with_confidence,
                weights_sha256=weights_sha256, created_at=now)
        group.clear()

    pixels = 0
    for index, row in enumerate(rows):
        try:
            if (refused := refusal(row.get("refused"))) is not None:
                raise refused   # a path the policy refuses, or not a regular file / too big
            image = _decode(row.get("image_bytes"), row.get("image_uri") or row["id"],
                            segmenter.preprocessing)
        except InputError as error:
            results[index] = _quarantine_row(row, error, now)
            continue
        size = image.shape[0] * image.shape[1]
        if group and pixels + size > GROUP_PIXELS:
            flush()
            pixels = 0
        group.append((index, image))
        pixels += size
    if group:
        flush()
    return results  # type: ignore[return-value]  # every slot is filled above


def _decode(data: bytes | None, source: str, pre: Any) -> Any:
    """Image bytes -> array under the artifact's limits (``pre``: its Preprocessing)."""
    if data is None:
        raise InputError("missing_image", "the image file does not exist", source=source,
                         hint="check the path in the manifest, or remove the row")
    return decode_image(data, source=source, max_pixels=pre.max_pixels, tiff_page=pre.tiff_page)


def _quarantine_row(row: dict[str, Any], error: InputError, now: dt.datetime) -> dict[str, Any]:
    """A result row for a rejected image: the quarantine fields plus the source it came from."""
    return {**quarantine_row(row, error, STAGE, created_at=now), "source_uri": row.get("image_uri")}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ the actor


class Predictor:
    """Ray Data callable class: loads the artifact once per actor, predicts pyarrow batches."""

    def __init__(self, model_uri: str, *, tta: bool, with_confidence: bool, threads: int,
                 engine: str = "auto", storage_options: dict[str, Any] | None = None) -> None:
        import torch

        from seg_core.artifact import load_artifact
        from seg_core.inference import Segmenter

        torch.set_num_threads(threads)
        artifact = load_artifact(storage.fetch_artifact(model_uri, storage_options))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # Tiles per forward: 4 on a CPU (fastest per image measured), sized from free memory on a
        # GPU, which also runs the forward in bf16 (seg_core.inference; `make gpu-check`).
        self.segmenter = Segmenter(artifact, device=device, tta=tta, engine=engine)
        self.model_name, self.model_version = artifact.name, artifact.version
        self.weights_sha256 = artifact.weights_key
        self.with_confidence = with_confidence

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = predict_rows(self.segmenter, batch.to_pylist(), model_name=self.model_name,
                            model_version=self.model_version,
                            with_confidence=self.with_confidence,
                            weights_sha256=self.weights_sha256)
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)




def plan_actors(cfg: PredictConfig, resources: dict[str, float]) -> ActorPlan:
    """One actor per GPU when there are GPUs; on CPUs, one single-threaded actor per CPU.

    On CPUs, separate processes scale better than torch's intra-op threads for images of a few
    tiles, so the default is many one-thread actors.  Fetch and write tasks ask for 0.25 CPU
    each, so the actors share all but half a CPU: a pool holding every CPU would starve the
    reads and hang (notes §3.2, ray #44687).
    """
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if gpus:
        size = cfg.actors or gpus
        share = cfg.cpus_per_actor or 1.0
        return ActorPlan(size, share, 1.0, max(1, round(share)))
    size = cfg.actors or max(1, int(cpus))
    share = cfg.cpus_per_actor or max(0.25, (cpus - 0.5) / size)
    return ActorPlan(size, share, 0.0, max(1, round(share)))


# ------------------------------------------------------------------------------------ the run


def run_predict(cfg: PredictConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Predict every input not yet in ``cfg.out``; return (and print) the run summary."""
    import ray
    from ray.data import DataContext

    from seg_core.artifact import read_artifact_meta

    started = time.perf_counter()
    resources = ray.cluster_resources()
    DataContext.get_current().enable_progress_bars = cfg.progress
    ref = registry.resolve(cfg.model)   # models:/name@alias -> the artifact, on the driver
    meta = read_artifact_meta(storage.fetch_artifact(ref.source))
    with store.lease(cfg.out):   # one writer per output: a second run here is refused
        return _predict_under_lease(cfg, ref, meta, resources, log, started)


def _predict_under_lease(cfg: PredictConfig, ref: registry.ModelRef, meta: dict[str, Any],
                         resources: dict[str, float], log: Callable[[str], None],
                         started: float) -> dict[str, Any]:
    from ray.data import ActorPoolStrategy

    store.claim_output(cfg.out, {**ref.as_dict(), "name": meta["name"],
                                 "version": meta["version"],
                                 "weights_sha256": meta.get("weights_sha256"),
                                 "mask_spec": meta["mask_spec"], "tta": cfg.tta,
                                 "engine": cfg.engine,
                                 "confidence_maps": cfg.confidence_maps,
                                 "reported_metrics": meta.get("metrics") or {}})
    plan = plan_actors(cfg, resources)
    sources = store.done_sources(cfg.out)   # one read of the committed files: ids and sources
    inputs = plan_inputs(cfg.input, pa.array(list(sources), pa.string()), split=cfg.split,
                         done_sources=sources, verify_done=cfg.verify_done, actors=plan.size)
    if inputs.conflicts:
        log(f"predict: {len(inputs.conflicts)} input id(s) already committed from another "
            f"source, left as they are (write to a fresh --out to predict them): "
            f"{'; '.join(inputs.conflicts[:5])}")
    if inputs.skipped:
        log(f"predict: skipped {inputs.skipped} of {len(inputs.ids)} inputs already committed "
            f"under {cfg.out}")
    options = storage.resolve_options()  # the driver's S3 endpoint/keys, shipped to the workers
    sink = store.CommitSink(cfg.out, rows_per_file=cfg.rows_per_file,
                            fail_after_files=Faults.from_env().fail_after_files,
                            storage_options=options)
    if inputs.todo:
        extra = "".join(f" + {amount:g} {name}" for name, amount in
                        (cfg.resources_per_actor or {}).items())
        log(f"predict: {inputs.todo} inputs -> {plan.size} actor(s) x {plan.num_cpus:g} CPU"
            f"{f' + {plan.num_gpus:g} GPU' if plan.num_gpus else ''}{extra}, "
            f"{plan.threads} thread(s)")
        inputs.dataset.map_batches(
            Predictor, batch_size=cfg.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"model_uri": ref.source, "tta": cfg.tta, "engine": cfg.engine,
                                   "with_confidence": cfg.confidence_maps,
                                   "threads": plan.threads, "storage_options": options},
            # all actors start at once; min 1, so fewer input blocks than actors (a small
            # split) is no UserWarning about unused concurrency
            compute=ActorPoolStrategy(min_size=1, max_size=plan.size, initial_size=plan.size),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus or None, udf_modifying_row_count=False,
            **({"resources": dict(cfg.resources_per_actor)} if cfg.resources_per_actor else {}),
        ).write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
    summary = _summary(cfg, sink.written, inputs, seconds=time.perf_counter() - started,
                       model=meta)
    store.write_success(cfg.out, summary)
    storage.write_bytes(storage.join_uri(cfg.out, REPRODUCIBILITY_FILE), json.dumps(
        registry.provenance(ref, meta, inputs={"uri": cfg.input, "split": cfg.split,
                                               "ids_sha256": store.file_key(
                                                   inputs.ids.to_pylist())},
                            settings={"tta": cfg.tta, "engine": cfg.engine,
                                      "confidence_maps": cfg.confidence_maps},
                            rows=summary["committed_rows"]), indent=2).encode() + b"\n")
    log(format_summary(summary))
    return summary


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
