"""Online segmentation: one Ray Serve deployment behind a FastAPI ingress.

Routes (``route_prefix`` from the Serve config, ``/`` by default):

- ``POST /v1/segment``: an image (raw body or one multipart file part; PNG, JPEG, BMP, GIF or TIFF).
  ``Accept: image/png`` answers the mask PNG; otherwise JSON with the mask as base64 PNG, per-class
  areas, mean confidence, the model name/version and server timing (also in ``Server-Timing``).
  ``?confidence=true`` adds the confidence map.  Bad input answers 413 / 415 / 422 with a message,
  a missing or wrong ``X-API-Key`` (when a key is configured) answers 401.  While the prediction
  log is too far behind storage, requests answer 503 with ``Retry-After`` (nothing is answered 200
  that is not in the log).
- ``POST /v1/explain?class=C&method=M``: an attribution map of class C for the uploaded image
  (:func:`seg_core.explain.explain`), computed in the forward thread; not logged.
- ``GET /v1/model``: the artifact's metadata and the serving settings.
- ``GET /``: the page that segments a dropped image through ``POST /v1/segment``
  (:mod:`pipelines.serve.page`; public, its requests carry the key).
- ``GET /healthz``: 200 while the replica takes requests, 503 while the log refuses rows (never
  needs the key).
- The Open Inference Protocol (KServe V2 REST with binary tensor data; :mod:`pipelines.serve.v2`):
  ``POST /v2/models/{m}[/versions/{v}]/infer`` (each image one job of the same batch queue and
  one row of the same log), ``GET /v2``, ``GET /v2/models/{m}[/versions/{v}]``, and the public
  probes ``GET /v2/health/live``, ``/v2/health/ready`` and ``/v2/models/{m}[/versions/{v}]/ready``.

Opening the model, decoding under its limits, predicting and building the row are
:class:`pipelines.model.LoadedModel`, what ``rayseg predict`` runs, so one image gives the same
mask bytes online and in bulk; each model the replica loads is noted in the log
(:func:`pipelines.predictions.record_served_model`) so the log can be scored later.  Requests are batched with ``@serve.batch``, whose batches a
:class:`~pipelines.serve.batching.ForwardCoalescer` merges into one forward at a time (each forward
takes every request waiting); ``max_batch_size`` and ``batch_wait_timeout_s`` come from
``user_config`` and change at run time through ``reconfigure``, and so does the served model
(``user_config.model``: a promotion moves it, :func:`~pipelines.serve.control.follow_model`):
the new artifact loads beside the old one and is swapped in between forwards, so no request
fails, and each answer (``model`` in the JSON, ``X-Model-Ref``) and row (``weights_sha256``)
names the model that made it.
Every answered request's row is in the replica's write-ahead log on local disk before its 200
goes out (:class:`~pipelines.serve.sink.PredictionSink`: fsynced, group-committed in a thread);
the sink ships it as Parquet by count or age, and when Serve stops the replica (its
graceful-shutdown hook is ``__del__``, which Serve calls explicitly after draining requests; see
``ray/serve/_private/replica.py::call_destructor``).  A replica that dies without that hook leaves
its log on the node, and the next replica there ships it.  ``check_health`` fails while the log
refuses rows because storage fails, so Serve reports the deployment unhealthy and replaces the
replica (its log stays on disk for the replacement).

Nothing here hard-codes replica counts or batch sizes: ``build_app`` is the typed builder named by
``jobs/configs/serve.yaml`` and ``infra/rayservice.yaml``, whose ``deployments:`` entries set the
autoscaling, resources and ``user_config``.  :func:`~pipelines.serve.control.start_endpoint`
(re-exported here with ``stop_endpoint`` and ``reconfigure_endpoint``) applies that same YAML.

No ``from __future__ import annotations`` here: Serve inspects ``build_app``'s annotation at run
time to turn the config's ``args`` into :class:`ServeArgs`, and a string annotation would skip it.
"""
import asyncio
import dataclasses
import functools
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping

from fastapi import FastAPI, Request
from ray import serve
from ray.serve import Application
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from pipelines.model import LoadedModel, open_model
from pipelines.predictions import record_served_model
from pipelines.serve import http, v2
from pipelines.serve.batching import ForwardCoalescer
from pipelines.serve.control import (  # noqa: F401
    DEPLOYMENT_NAME,
    BatchSettings,
    ServeArgs,
    reconfigure_endpoint,
    follow_model,
    replica_counts,
    split_user_config,
    start_endpoint,
    stop_endpoint,
)
from pipelines.serve.sink import PredictionSink, SinkUnavailable
from pipelines.serve.wal import default_wal_dir
from seg_core.errors import InputError

logger = logging.getLogger(__name__)

api = FastAPI(title="rayseg", description="U-Net segmentation endpoint")


# Helpers come before the deployment class: @serve.deployment pickles the class on the spot, and
# module globals that do not exist yet at that moment are missing in the replicas.
def _api_key(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    key = os.environ.get(env_name, "")
    if not key:  # fail closed: a configured but absent key must not serve openly
        raise ValueError(f"api_key_env={env_name!r} is set but the replica has no such variable "
                         f"(or it is empty); set it on the workers, or drop api_key_env")
    return key


# Ray metrics of every answered mask (exported by Ray as ray_<name>; README "Run it in
# production"): the drift monitor's figures, live.
_AREA_BOUNDS = [0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
_CONFIDENCE_BOUNDS = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]


def _mask_metrics() -> dict[str, Any]:
    from ray.serve import metrics

    return {
        "area": metrics.Histogram("rayseg_class_area_fraction", boundaries=_AREA_BOUNDS,
                                  description="share of an answered mask's pixels per class",
                                  tag_keys=("class", "model")),
        "confidence": metrics.Histogram("rayseg_mean_confidence", boundaries=_CONFIDENCE_BOUNDS,
                                        description="mean confidence of an answered mask",
                                        tag_keys=("model",)),
        "empty": metrics.Counter("rayseg_empty_masks", tag_keys=("model",),
                                 description="answered masks with no foreground"),
    }


def _refusal(error: Exception) -> http.RequestRefused:
    """What a request that failed answers: its 4xx, or the log's 503; anything else is a bug
    and is raised (Serve answers it 500, and the test of hostile inputs fails)."""
    if isinstance(error, http.RequestRefused):
        return error
    if isinstance(error, InputError):
        return http.RequestRefused.from_input_error(error)
    if isinstance(error, SinkUnavailable):
        return http.RequestRefused.unavailable(error.reason, error.detail, error.retry_after_s)
    raise error


def _explain(model: LoadedModel, data: bytes, name: str, target: int,
             method: str) -> dict[str, Any]:
    """``POST /v1/explain``'s work, in the forward thread (the torch model it differentiates is
    the one predictions use, so the two never run at once)."""
    import base64

    from seg_core.explain import explain, map_png

    image = model.decode(data, name)
    attribution = explain(model.segmenter, image, target, method=method)  # type: ignore[arg-type]
    png = map_png(attribution, method)  # type: ignore[arg-type]
    height, width = attribution.shape
    return {"height": int(height), "width": int(width),
            "map_png": base64.b64encode(png).decode("ascii")}


@dataclass(frozen=True)
class _Job:
    """One image on its way through the batch (decoded in the forward thread).

    ``pixels`` is set for a V2 ``UINT8`` input, which needs no decoding (``data`` then holds its
    raw bytes, whose hash the row records).
    """

    data: bytes
    name: str
    request_id: str
    with_confidence: bool
    pixels: Any = None


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class SegmentService:
    """Loads the artifact once, batches forwards, answers HTTP, buffers rows for Parquet."""

    def __init__(self, args: ServeArgs) -> None:
        import torch

        torch.set_num_threads(args.torch_threads)
        self._args = args
        self._api_key = _api_key(args.api_key_env)
        self._model = self._load({"uri": args.model_uri,
                                  "ref": args.model_ref or args.model_uri})
        self._metrics = _mask_metrics()
        self._forward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._coalescer = ForwardCoalescer(self._forward, self._forward_pool,
                                           BatchSettings().max_batch_size)
        context = serve.get_replica_context()
        self._replica = context.replica_id.unique_id
        self._sink = None if args.out_uri is None else PredictionSink(
            args.out_uri, flush_rows=args.flush_rows, flush_interval_s=args.flush_interval_s,
            writer_id=self._replica, wal_dir=args.wal_dir or default_wal_dir(context.app_name),
            max_buffer_rows=args.max_buffer_rows, max_buffer_bytes=args.max_buffer_bytes,
            max_unflushed_age_s=args.max_unflushed_age_s)
        self._batch = BatchSettings()
        self._closed = False

    @property
    def _artifact(self) -> Any:
        return self._model.artifact

    @property
    def _segmenter(self) -> Any:
        return self._model.segmenter

    def _load(self, pointer: Mapping[str, str]) -> LoadedModel:
        model = open_model(pointer["uri"], ref=pointer.get("ref"), device=self._args.device,
                           engine=self._args.engine, tta=self._args.tta,
                           max_pixels=self._args.max_pixels,
                           postprocess=self._args.postprocess, instances=self._args.instances)
        if self._args.out_uri is not None:   # the log says which model wrote its rows
            try:
                record_served_model(self._args.out_uri, {
                    **model.provenance(), "mask_spec": model.artifact.meta["mask_spec"],
                    "reported_metrics": model.artifact.meta.get("metrics") or {}})
            except Exception as error:  # noqa: BLE001 - storage down: serve, log it, go on
                logger.warning("replica: could not record the served model in %s (%s: %s); "
                               "its rows are logged all the same, but `rayseg evaluate` needs "
                               "the record to score them", self._args.out_uri,
                               type(error).__name__, error)
        return model

    async def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """Apply ``BatchSettings`` and the ``model`` pointer from ``user_config``.

        A new model is loaded in a thread while requests go on with the current one, then
        swapped in whole (:func:`pipelines.serve.control.follow_model`).
        """
        self._batch, pointer = split_user_config(user_config)
        if pointer is not None and pointer["uri"] != self._model.uri:
            loaded = await asyncio.get_running_loop().run_in_executor(None, self._load, pointer)
            loaded.segmenter.batch_size = self._batch.max_batch_size
            before, self._model = self._model.describe(), loaded
            logger.info("replica %s: now serving %s (was %s)", self._replica,
                        loaded.describe(), before)
        elif pointer is not None and pointer.get("ref") != self._model.ref:
            self._model = dataclasses.replace(self._model, ref=pointer.get("ref") or pointer["uri"])
        self._enqueue.set_max_batch_size(self._batch.max_batch_size)
        self._enqueue.set_batch_wait_timeout_s(self._batch.batch_wait_timeout_s)
        self._coalescer.set_max_batch_size(self._batch.max_batch_size)
        self._segmenter.batch_size = self._batch.max_batch_size  # a full batch: one forward

    @serve.batch
    async def _enqueue(self, jobs: list[_Job]) -> list[asyncio.Future]:
        """Hand Serve's batch to the coalescer; one future per request (see serve_batching)."""
        return self._coalescer.submit(jobs)

    def _forward(self, jobs: list[_Job]) -> list[Any]:
        """Per job: ``(row, decode_ms, encode_ms, model, prediction)``, or the exception that job
        alone raised.

        Decoding happens here rather than in its own thread hop per request: one hop per batch.
        """
        images, decoded, results = [], [], [None] * len(jobs)
        model = self._model   # the whole batch, rows included, uses the model it took here
        started = time.perf_counter()
        for index, job in enumerate(jobs):
            try:
                images.append(job.pixels if job.pixels is not None
                              else model.decode(job.data, job.name))
                decoded.append(index)
            except Exception as error:  # noqa: BLE001 - handed back to its own request
                results[index] = error
        decode_ms = (time.perf_counter() - started) * 1e3 / max(1, len(jobs))
        # One shared forward for the batch; an image that fails anyway gets its own exception,
        # handed back to its own request, and the others are answered.
        predictions = model.segmenter.predict_each(images, catch=(Exception,),
                                                   fields=model.fields)
        for index, prediction in zip(decoded, predictions):
            if isinstance(prediction, BaseException):
                results[index] = prediction
                continue
            started = time.perf_counter()
            job = jobs[index]
            try:
                row = model.row(prediction, id=job.request_id, source_uri=f"upload:{job.name}",
                                data=job.data, with_confidence=job.with_confidence)
            except Exception as error:  # noqa: BLE001 - too many objects: this request's 413
                results[index] = error
                continue
            row["request_id"] = job.request_id
            results[index] = (row, decode_ms, (time.perf_counter() - started) * 1e3, model,
                              prediction)
        return results

    @api.post("/v1/segment")
    async def segment(self, request: Request, confidence: bool = False) -> Response:
        """Segment one uploaded image (see the module docstring for the protocol)."""
        started = time.perf_counter()
        request_id = http.request_id(request)
        try:
            self._admit(request)
            data, name = await http.read_image_bytes(request, self._args.max_request_bytes)
            received = time.perf_counter()
            [(row, decode_ms, encode_ms, model, _)], done = await self._predict_and_log(
                [_Job(data, name, request_id, confidence)], started)
            timing = {"receive": (received - started) * 1e3, "decode": decode_ms,
                      # batch wait + thread hop + pre/post-processing + forward
                      "infer": (done - received) * 1e3 - decode_ms - encode_ms,
                      "encode": encode_ms, "total": (done - started) * 1e3}
        except Exception as error:  # noqa: BLE001 - every refusal is a 4xx (or the log's 503)
            return http.error_response(_refusal(error), request_id)
        # Serve's proxy puts the request id in x-request-id (taken from the client's header or
        # generated) and echoes it on every response, so it is not repeated here.
        self._observe(model, row)
        headers = {"X-Model-Version": model.artifact.version, "X-Model-Ref": model.ref,
                   "Server-Timing": http.server_timing(timing)}
        if http.wants_png(request):
            return http.png_response(row["mask_png"], headers)
        body = http.segment_body(
            row, request_id=request_id, model=model.describe(), height=row["height"],
            width=row["width"], class_names=model.artifact.mask_spec.names,
            multilabel=model.artifact.mask_spec.multilabel, timing_ms=timing)
        payload = await run_in_threadpool(http.json_bytes, body)
        return Response(payload, media_type="application/json", headers=headers)

    @api.post("/v1/explain")
    async def explain(self, request: Request) -> Response:
        """Why a class is where it is: an attribution map of ``?class=`` (a class name or
        index) for the uploaded image, by ``?method=`` (``gradcam``, the default, ``occlusion``
        or ``integrated_gradients``; :func:`seg_core.explain.explain`).  JSON: the map as an
        8-bit PNG at the image's size (Grad-CAM 0..1 as 0..255; the signed methods -1..1 with
        0 at 128), the pixels predicted as the class, and the model.  Explanations are not
        logged: they hold no prediction."""
        started = time.perf_counter()
        request_id = http.request_id(request)
        try:
            http.check_api_key(request, self._api_key)
            model = self._model
            target, method = http.explain_params(request, model.artifact.mask_spec.names)
            data, name = await http.read_image_bytes(request, self._args.max_request_bytes)
            found = await asyncio.get_running_loop().run_in_executor(
                self._forward_pool, functools.partial(_explain, model, data, name, target,
                                                      method))
        except Exception as error:  # noqa: BLE001 - every refusal is a 4xx
            return http.error_response(_refusal(error), request_id)
        body = {"request_id": request_id, "model": model.describe(), "method": method,
                "class": model.artifact.mask_spec.names[target], **found,
                "timing_ms": {"total": round((time.perf_counter() - started) * 1e3, 3)}}
        return JSONResponse(body, headers={"X-Model-Ref": model.ref})

    # ---------------------------------------------- the Open Inference Protocol (KServe V2)
    @api.post("/v2/models/{model_name}/infer")
    async def v2_infer(self, request: Request, model_name: str) -> Response:
        """Infer through the Open Inference Protocol (:mod:`pipelines.serve.v2`)."""
        return await self._v2_infer(request, model_name, None)

    @api.post("/v2/models/{model_name}/versions/{version}/infer")
    async def v2_infer_version(self, request: Request, model_name: str,
                               version: str) -> Response:
        return await self._v2_infer(request, model_name, version)

    async def _v2_infer(self, request: Request, name: str, version: str | None) -> Response:
        started = time.perf_counter()
        request_id = http.request_id(request)
        try:
            self._admit(request)
            model = self._model
            v2.check_model(name, version, served_name=model.name, served_version=model.version)
            body = await http.read_body(request, self._args.max_request_bytes)
            header_length = request.headers.get(v2.HEADER_LENGTH)
            parse = functools.partial(v2.parse_infer, body, header_length,
                                      max_pixels=model.max_pixels)
            # binary tensors parse in microseconds; JSON pixel lists can take a while
            parsed = parse() if header_length is not None else await run_in_threadpool(parse)
            request_id = parsed.id or request_id
            ids = ([request_id] if parsed.count == 1
                   else [f"{request_id}#{index}" for index in range(parsed.count)])
            confidence = parsed.wants(v2.CONFIDENCE)
            jobs = ([_Job(data, f"{v2.INPUT}[{index}]", ids[index], confidence)
                     for index, data in enumerate(parsed.encoded)]
                    or [_Job(pixels.tobytes(), f"{v2.INPUT}[{index}]", ids[index], confidence,
                             pixels) for index, pixels in enumerate(parsed.arrays)])
            results, _ = await self._predict_and_log(jobs, started)
        except Exception as error:  # noqa: BLE001 - every refusal is a 4xx (or the log's 503)
            return v2.error_response(_refusal(error), request_id)
        model = results[0][3]
        for result in results:
            self._observe(model, result[0])
        tensors = v2.output_tensors(parsed, [result[4] for result in results],
                                    [result[0]["class_pixel_counts"] for result in results],
                                    model.artifact.mask_spec.multilabel)
        answer = functools.partial(
            v2.infer_response, parsed, tensors, model_name=model.name,
            model_version=model.version,
            headers={"X-Model-Version": model.version, "X-Model-Ref": model.ref})
        if all(wanted.binary for wanted in parsed.outputs):
            return answer()
        return await run_in_threadpool(answer)

    @api.get("/v2")
    async def v2_server(self, request: Request) -> JSONResponse:
        """Server metadata: name, version and the binary tensor data extension."""
        from seg_core import __version__

        return self._v2_json(request, lambda: v2.server_metadata(__version__))

    @api.get("/v2/models/{model_name}")
    async def v2_model(self, request: Request, model_name: str) -> JSONResponse:
        """Model metadata: the tensors it takes and answers."""
        return self._v2_json(request, lambda: self._v2_model_metadata(model_name, None))

    @api.get("/v2/models/{model_name}/versions/{version}")
    async def v2_model_version(self, request: Request, model_name: str,
                               version: str) -> JSONResponse:
        return self._v2_json(request, lambda: self._v2_model_metadata(model_name, version))

    @api.get("/v2/health/live")
    async def v2_live(self) -> JSONResponse:
        return JSONResponse({"live": not self._closed})

    @api.get("/v2/health/ready")
    async def v2_ready(self) -> JSONResponse:
        """200 while the replica takes requests; 503 while its log refuses rows (no key)."""
        return self._v2_readiness(None, None)

    @api.get("/v2/models/{model_name}/ready")
    async def v2_model_ready(self, model_name: str) -> JSONResponse:
        return self._v2_readiness(model_name, None)

    @api.get("/v2/models/{model_name}/versions/{version}/ready")
    async def v2_model_version_ready(self, model_name: str, version: str) -> JSONResponse:
        return self._v2_readiness(model_name, version)

    @api.get("/v1/model")
    async def model_info(self, request: Request) -> JSONResponse:
        """The artifact's metadata plus the serving settings of this replica."""
        try:
            http.check_api_key(request, self._api_key)
        except http.RequestRefused as refused:
            return http.error_response(refused, uuid.uuid4().hex)
        settings = {"max_batch_size": self._batch.max_batch_size,
                    "batch_wait_timeout_s": self._batch.batch_wait_timeout_s,
                    "max_request_bytes": self._args.max_request_bytes,
                    "max_pixels": self._model.max_pixels, "device": self._model.device,
                    "tta": self._args.tta, "engine": self._model.engine,
                    "parquet_sink": self._args.out_uri is not None,
                    "forwards": self._coalescer.forwards, "forwarded_requests": self._coalescer.jobs}
        return JSONResponse({**self._model_ref(), "artifact": self._artifact.meta,
                             "serving": settings, "replica": self._replica,
                             "pid": os.getpid()})

    @api.get("/", include_in_schema=False)
    async def page(self) -> Response:
        """The page that segments a dropped image through ``POST /v1/segment`` (public: the
        page holds nothing secret, and the requests it sends carry the key)."""
        from pipelines.serve.page import page_response

        return page_response(self._artifact.mask_spec.palette)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 while the replica takes requests; 503 (and why) while its log refuses rows."""
        stats = {} if self._sink is None else self._sink.stats()
        refusal = None if self._sink is None else self._sink.refusal()
        body = {"status": "ok" if refusal is None else "unavailable", **self._model_ref(),
                "replica": self._replica, "pending_rows": 0, **stats}
        if refusal is None:
            return JSONResponse(body)
        body["detail"] = refusal.detail
        return JSONResponse(body, status_code=503,
                            headers={"Retry-After": str(refusal.retry_after_s)})

    def check_health(self) -> None:
        """Serve's health probe: fail when the replica was closed underneath us, or while its
        log refuses rows because storage fails (or its local disk does)."""
        if self._closed:
            raise RuntimeError("replica already closed")
        problem = None if self._sink is None else self._sink.health()
        if problem is not None:
            raise RuntimeError(f"prediction log unhealthy: {problem}")

    def __del__(self) -> None:
        """Graceful shutdown (Serve calls this once, after draining): flush rows, free files."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self._sink is not None:
            written = self._sink.close()  # rows it cannot ship stay in the node's WAL
            logger.info("replica %s: sink closed, %d rows written", self._replica, written)
        self._forward_pool.shutdown(wait=True)   # the fetched artifact is the node's: it stays

    # ------------------------------------------------------------------------------ helpers
    def _model_ref(self) -> dict[str, str]:
        return self._model.describe()

    def _admit(self, request: Request) -> None:
        """The checks before reading a body: the API key, and a cheap 503 while the log refuses
        rows (before reading and predicting)."""
        http.check_api_key(request, self._api_key)
        if self._sink is not None and (refusal := self._sink.refusal()) is not None:
            raise refusal

    async def _predict_and_log(self, jobs: list[_Job],
                               started: float) -> tuple[list[tuple], float]:
        """Predict ``jobs`` through the shared batch queue, then log every row (fsynced) before
        the caller answers: a 200 always has its rows.  Returns the forward's results and when
        they were ready (``perf_counter``; each row's ``latency_ms`` ends there).  The first
        failing job's exception is raised, and then no row of the request is logged."""
        futures = await asyncio.gather(*(self._enqueue(job) for job in jobs))
        results = await asyncio.gather(*futures)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        done = time.perf_counter()
        for result in results:
            result[0]["latency_ms"] = (done - started) * 1e3
        if self._sink is not None:
            await asyncio.gather(*(self._sink.add_async(result[0]) for result in results))
        return results, done

    def _v2_model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        model = self._model
        v2.check_model(name, version, served_name=model.name, served_version=model.version)
        spec = model.artifact.mask_spec
        return v2.model_metadata(name=model.name, version=model.version,
                                 class_names=spec.names, multilabel=spec.multilabel)

    def _v2_json(self, request: Request, body: Any) -> JSONResponse:
        request_id = http.request_id(request)
        try:
            http.check_api_key(request, self._api_key)
            return JSONResponse(body())
        except http.RequestRefused as refused:
            return v2.error_response(refused, request_id)

    def _v2_readiness(self, name: str | None, version: str | None) -> JSONResponse:
        """Readiness is public, like ``/healthz`` (probes carry no key)."""
        model = self._model
        if name is not None:
            try:
                v2.check_model(name, version, served_name=model.name,
                               served_version=model.version)
            except http.RequestRefused as refused:
                return v2.error_response(refused, uuid.uuid4().hex)
        refusal = None if self._sink is None else self._sink.refusal()
        if refusal is None and not self._closed:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "detail": "replica closed" if refusal is None
                             else refusal.detail}, status_code=503)

    def _observe(self, model: LoadedModel, row: Mapping[str, Any]) -> None:
        """The answered mask's class areas, confidence and emptiness, as Ray metrics."""
        spec, tags = model.artifact.mask_spec, {"model": model.ref}
        pixels = max(row["height"] * row["width"], 1)
        counts = row["class_pixel_counts"]
        for name, count in zip(spec.names, counts):
            self._metrics["area"].observe(count / pixels, tags={**tags, "class": name})
        self._metrics["confidence"].observe(row["mean_confidence"], tags=tags)
        if not sum(counts if spec.multilabel else counts[1:]):
            self._metrics["empty"].inc(tags=tags)


def build_app(args: ServeArgs) -> Application:
    """The Serve application builder (``import_path: pipelines.serve:build_app``).

    Deployment options (replicas, autoscaling, resources, ``user_config``) come from the config
    file that names this builder; only the batch defaults are set here, as ``user_config``.
    A registry URI (``models:/name@champion``) is resolved here, where the application is built
    (the cluster's ``RAYSEG_TRACKING_URI``), so replicas only ever see the artifact's URI.
    """
    from pipelines import registry
    from seg_core.config import to_dict

    if registry.is_models_uri(args.model_uri):
        ref = registry.resolve(args.model_uri)
        args = args.model_copy(update={"model_uri": ref.source, "model_ref": ref.registry_uri})
    return SegmentService.options(user_config=to_dict(BatchSettings())).bind(args)

