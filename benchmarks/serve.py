"""``serve``: endpoint latency over the replica's own forward, per ingress, batching and autoscaling.

Everything runs in this invocation, on loopback only (127.0.0.1):

- **bare forward** (the baseline): the replica's own network, as the replica runs it:
  :meth:`seg_core.inference.Segmenter.logits` of a ``Segmenter`` built with the shipped engine
  (``engine: auto``: OpenVINO on CPUs, torch on GPUs), BatchNorm folded, at batch 1, with the
  replica's thread count.  Also, for context: ``Segmenter.predict`` (pre + tiled forward + post),
  the whole in-process path (decode + predict + PNG row), and the unfolded torch model.
- **the two ingress paths**: Ray Serve's proxy actor, which is what a fresh clone gets (no
  ``haproxy`` binary: ``RAY_SERVE_ENABLE_HA_PROXY=0``), and Ray Serve's HAProxy ingress, which
  ``rayseg serve`` uses when ``haproxy`` is on PATH (``.ci/run`` and ``infra/Dockerfile``
  install it).  The ingress is chosen when Ray starts, so each gets its own local Ray here.  ``--quick``
  (a smoke run) measures the proxy actor alone.
  For each: :func:`pipelines.serve.control.start_endpoint` with the shipped ``serve.yaml`` on one
  replica (sink on, as in production), then a bounded load generator (fixed request count and
  time limit) posts the same PNG with ``Accept: image/png`` over keep-alive connections at
  concurrency 1, in alternating halves with the same PNG sent through the Open Inference
  Protocol (V2 binary: a BYTES tensor in, binary tensors out); the bare forward is timed right
  before and right after and averaged.  ``overhead`` = p50 latency - that bare forward, per
  route; the V2 goal is at most 1.2x ``/v1/segment``'s overhead.
- **the rest on the recommended ingress** (HAProxy when present): concurrency 4, and 16 with the
  configured ``max_batch_size`` against ``max_batch_size=1`` (``reconfigure``), in alternating
  halves; then the same app with ``max_replicas=3`` and short delays, loaded until it scales up
  and left idle until it is back to one (replica states from ``serve.status()`` as a
  timeline); then the Parquet rows are counted against the answers.

``ratio`` = the overhead on the recommended ingress (HAProxy when installed, else the proxy
actor, as ``figures["ingress"]`` says), in ms; the goal is <= 5 ms.  The replica's
``Server-Timing`` splits its own time into receive, decode, infer and encode.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from benchmarks import REPO, Context
from benchmarks.common import result, torch_threads

SERVE_YAML = REPO / "jobs" / "configs" / "serve.yaml"  # shipped
THREADS = 1  # torch threads per replica and for the bare forward
ROUTES = ("v1", "v2")   # POST /v1/segment, and the Open Inference Protocol's binary infer
ROUTE_NAMES = {"v1": "v1", "v2": "v2 binary"}
_STATE = {"RUNNING": "R", "STARTING": "S", "STOPPING": "X"}


def run(ctx: Context) -> dict[str, Any]:
    size = 64 if ctx.quick else 128
    requests = {1: 20, 4: 20, 16: 40} if ctx.quick else {1: 300, 4: 600, 16: 1200}
    limit_s = 10.0 if ctx.quick else 60.0
    scale_max = 2 if ctx.quick else 3
    # proxy_actor: what a fresh clone without haproxy gets, always measured.  --quick runs it
    # alone (the same measuring code; a second ingress is a second Ray and Serve start)
    modes = ["proxy_actor"] + (["haproxy"] if shutil.which("haproxy") and not ctx.quick else [])
    recommended = modes[-1]
    figures: dict[str, Any] = {"ingress": recommended, "ingress_modes": modes,
                               "model": "UNet depth 3, base width 16, 3 classes",
                               "torch_threads": THREADS}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, torch_threads(THREADS):
        model_dir, png = _setup(Path(tmp), size)
        figures["image"] = f"{size}x{size} PNG, {len(png)} bytes"
        bare = _Bare(model_dir, png)
        figures["engine"] = bare.segmenter.engine
        answered = errors = 0
        for mode in modes:
            with _local_ray(mode):
                endpoint = _Endpoint(model_dir, png, tmp, mode)
                warm = [endpoint.load(1, 20, limit_s, route=route) for route in ROUTES]
                before = bare.medians()
                # /v1/segment and V2 binary in alternating halves, between the bare timings
                halves: dict[str, list[dict[str, Any]]] = {route: [] for route in ROUTES}
                for _ in range(2):
                    for route in ROUTES:
                        halves[route].append(endpoint.load(1, requests[1] // 2, limit_s / 2,
                                                           route=route))
                after = bare.medians()
                c1, v2_c1 = ({"concurrency": 1, "ingress": mode, "route": route,
                              "max_batch_size": endpoint.batch, **_merge(halves[route])}
                             for route in ROUTES)
                rows += [c1, v2_c1]
                answered += sum(r["ok"] for r in [*warm, c1, v2_c1])
                errors += sum(r["errors"] for r in [*warm, c1, v2_c1])
                medians = {k: round((before[k] + after[k]) / 2, 2) for k in before}
                figures[f"{mode}_c1_p50_ms"] = c1["p50_ms"]
                figures[f"{mode}_c1_p99_ms"] = c1["p99_ms"]
                figures[f"{mode}_bare_forward_ms"] = medians["bare_forward_ms"]
                figures[f"{mode}_overhead_c1_p50_ms"] = round(
                    c1["p50_ms"] - medians["bare_forward_ms"], 2)
                figures[f"{mode}_v2_binary_c1_p50_ms"] = v2_c1["p50_ms"]
                figures[f"{mode}_v2_binary_overhead_c1_p50_ms"] = round(
                    v2_c1["p50_ms"] - medians["bare_forward_ms"], 2)
                figures[f"{mode}_v2_over_v1_overhead"] = round(
                    figures[f"{mode}_v2_binary_overhead_c1_p50_ms"]
                    / max(figures[f"{mode}_overhead_c1_p50_ms"], 1e-3), 3)
                figures[f"{mode}_outside_replica_c1_p50_ms"] = round(
                    c1["p50_ms"] - c1.get("replica_total_p50_ms", 0.0), 2)
                figures.update({f"{mode}_c1_{k}": v for k, v in c1.items()
                                if k.startswith("replica_")})
                if mode == recommended:
                    figures.update(medians)
                    figures["bare_forward_before_after_c1_ms"] = \
                        f"{before['bare_forward_ms']:.2f} / {after['bare_forward_ms']:.2f}"
                    more, scale = _recommended_rest(endpoint, requests, limit_s, scale_max,
                                                    figures)
                    rows += more
                    answered += sum(r["ok"] for r in more) + scale["scale_requests"]
                    errors += sum(r["errors"] for r in more) + scale["scale_errors"]
                    figures.update(scale)
                figures[f"{mode}_sink_rows"] = endpoint.stop()
    figures["table"] = "\n" + _table(rows)
    figures["answered_200"] = answered
    figures["sink_rows"] = sum(figures[f"{m}_sink_rows"] for m in modes)
    figures["errors_total"] = errors
    figures["goal_zero_errors"] = errors == 0
    figures["goal_sink_rows_equal_answered"] = figures["sink_rows"] == answered
    figures["goal_v2_overhead_within_1_2x_v1"] = \
        figures[f"{recommended}_v2_over_v1_overhead"] <= 1.2
    return result("serve", figures, (f"{recommended}_c1_p50_ms", "-",
                                     f"{recommended}_bare_forward_ms"),
                  f"<=5 ms (p50 at concurrency 1 over the replica's own folded forward; "
                  f"{recommended} ingress)")


def _recommended_rest(endpoint: "_Endpoint", requests: dict[int, int], limit_s: float,
                      scale_max: int, figures: dict[str, Any]
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Concurrency 4, batching at concurrency 16, and autoscaling, on one endpoint."""
    from pipelines.serve.control import reconfigure_endpoint

    batch, mode = endpoint.batch, endpoint.mode
    rows = [{"concurrency": 4, "ingress": mode, "route": "v1", "max_batch_size": batch,
             **endpoint.load(4, requests[4], limit_s)}]
    halves: dict[int, list[dict[str, Any]]] = {batch: [], 1: []}
    forwarded = {batch: [0, 0], 1: [0, 0]}  # forwards, requests (one replica here)
    for _ in range(2):
        for max_batch in (batch, 1):
            reconfigure_endpoint(max_batch_size=max_batch)
            before = endpoint.forward_counts()
            halves[max_batch].append(endpoint.load(16, requests[16] // 2, limit_s / 2))
            after = endpoint.forward_counts()
            for i in range(2):
                forwarded[max_batch][i] += after[i] - before[i]
    rows += [{"concurrency": 16, "ingress": mode, "route": "v1", "max_batch_size": b,
              **_merge(halves[b])}
             for b in halves]
    reconfigure_endpoint(max_batch_size=batch)
    figures["c16_requests_per_forward"] = {
        f"max_batch_size={b}": round(carried / max(forwards, 1), 2)
        for b, (forwards, carried) in forwarded.items()}
    for row in rows:
        key = f"c{row['concurrency']}_b{row['max_batch_size']}"
        figures.update({f"{key}_{k}": row[k] for k in ("p50_ms", "p99_ms", "rps", "errors")})
    figures["batching_speedup_c16"] = round(rows[1]["rps"] / rows[2]["rps"], 3)
    figures["goal_batching_beats_batch1"] = rows[1]["rps"] > rows[2]["rps"]
    return rows, endpoint.autoscale(scale_max, limit_s)


# ------------------------------------------------------------------------------------ set-up
def _setup(tmp: Path, size: int) -> tuple[Path, bytes]:
    import torch

    from seg_core.artifact import save_artifact
    from seg_core.codecs import encode_png
    from seg_core.config import MaskSpec, ModelConfig, Preprocessing
    from seg_core.model import UNet
    from seg_core.sample_data import render_sample

    torch.manual_seed(0)
    model = UNet(ModelConfig(in_channels=3, num_classes=3, depth=3, base_width=16)).eval()
    model_dir = save_artifact(tmp / "model", model, name="bench", version="b1",
                              mask_spec=MaskSpec(num_classes=3),
                              preprocessing=Preprocessing(tile_size=size), metrics={})
    image, _ = render_sample(0, size=(size, size), shape_types=2)
    return model_dir, encode_png(image)


@contextlib.contextmanager
def _local_ray(mode: str) -> Iterator[None]:
    """A fresh local Ray whose Serve ingress is ``mode`` (``proxy_actor`` or ``haproxy``)."""
    import ray

    from pipelines.raycluster import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    saved = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY")
    if mode == "proxy_actor":
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    else:
        os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)   # ensure_ray turns it on
    try:
        ensure_ray()
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
        else:
            os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = saved


def _config(data: dict[str, Any], *, max_replicas: int) -> dict[str, Any]:
    """The shipped serve.yaml with bench resources and short autoscaling delays."""
    deployment = data["applications"][0]["deployments"][0]
    deployment["ray_actor_options"] = {"num_cpus": 0.5}
    deployment["autoscaling_config"] = {
        "min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": 2,
        "upscale_delay_s": 1.0, "downscale_delay_s": 3.0, "look_back_period_s": 2.0,
        "metrics_interval_s": 0.5}  # deprecated field, still honoured by 2.60's pushers
    data["applications"][0]["args"].update(torch_threads=THREADS, flush_rows=256)
    return data


class _Bare:
    """The replica's network in this process, for the baseline timings (see the docstring)."""

    def __init__(self, model_dir: Path, png: bytes) -> None:
        from pipelines.model import open_artifact, open_model
        from pipelines.serve.control import load_serve_config
        from seg_core.inference import prepare_image

        engine = load_serve_config(SERVE_YAML)["applications"][0]["args"].get("engine", "auto")
        self.model = open_model(str(model_dir), engine=engine)     # as the replica opens it
        self.segmenter = self.model.segmenter
        self.unfolded = open_artifact(str(model_dir)).model.eval()
        self.png = png
        self.image = self.model.decode(png, "bench.png")
        self.x = prepare_image(self.image, self.model.artifact.preprocessing)[None]  # 1xCxHxW

    def medians(self) -> dict[str, float]:
        """Median ms of the replica's forward, the unfolded model, Segmenter.predict, and
        decode + predict + row."""
        import torch

        def forward(fn: Callable[[Any], Any]) -> Callable[[], None]:
            def call() -> None:
                with torch.inference_mode():
                    fn(self.x)
            return call

        whole = (lambda: self.model.predict_one(self.png, id="bench"))
        return {"bare_forward_ms": round(_median_ms(forward(self.segmenter.logits), 50), 2),
                "unfolded_torch_forward_ms": round(_median_ms(forward(self.unfolded), 50), 2),
                "segmenter_predict_ms": round(_median_ms(
                    lambda: self.segmenter.predict(self.image), 30), 2),
                "in_process_decode_predict_encode_ms": round(_median_ms(whole, 30), 2)}


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


class _Endpoint:
    """One running endpoint of the shipped config and its load generator."""

    def __init__(self, model_dir: Path, png: bytes, tmp: str, mode: str) -> None:
        from pipelines.serve.control import load_serve_config, start_endpoint

        self.model_dir, self.tmp, self.mode = model_dir, tmp, mode
        self.sink = f"{tmp}/sink-{mode}"
        self.config = _config(load_serve_config(SERVE_YAML), max_replicas=1)
        self.config["http_options"].update(host="127.0.0.1", port=_free_port())
        self.batch = self.config["applications"][0]["deployments"][0]["user_config"][
            "max_batch_size"]
        self.url = start_endpoint(str(model_dir), self.sink, config=self.config)
        self.posts = {route: _poster(self.url, png, route) for route in ROUTES}

    def load(self, concurrency: int, total: int, limit_s: float,
             stop: threading.Event | None = None, route: str = "v1") -> dict[str, Any]:
        return _load(self.posts[route], concurrency, total, limit_s, stop)

    def forward_counts(self) -> tuple[int, int]:
        """(forward calls, requests they carried) so far, from ``GET /v1/model``."""
        import json
        import urllib.request

        with urllib.request.urlopen(self.url.rstrip("/") + "/v1/model", timeout=30) as response:
            serving = json.load(response)["serving"]
        return serving["forwards"], serving["forwarded_requests"]

    def autoscale(self, scale_max: int, limit_s: float) -> dict[str, Any]:
        """Raise max_replicas, load until the replicas scale up, then idle until one is left."""
        from pipelines.serve.control import replica_counts, start_endpoint

        config = _config(self.config, max_replicas=scale_max)
        start_endpoint(str(self.model_dir), self.sink, config=config)  # deployment config only
        timeline: list[str] = []
        began = time.monotonic()

        def sample() -> dict[str, int]:
            counts = replica_counts()
            state = "+".join(f"{n}{_STATE.get(k, k)}" for k, n in sorted(counts.items()))
            if not timeline or not timeline[-1].startswith(state + "@"):
                timeline.append(f"{state}@{time.monotonic() - began:.1f}s")
            return counts

        stop = threading.Event()
        found: dict[str, Any] = {}
        loader = threading.Thread(target=lambda: found.update(
            self.load(16, 10**6, 3 * limit_s, stop)), daemon=True)
        loader.start()
        peak = 0
        while loader.is_alive() and peak < scale_max:
            peak = max(peak, sample().get("RUNNING", 0))
            time.sleep(0.5)
        time.sleep(2.0)  # a little load on the full set, then stop
        stop.set()
        loader.join()
        load_end = time.monotonic() - began
        while sample() != {"RUNNING": 1} and time.monotonic() - began < load_end + 3 * limit_s:
            time.sleep(0.5)
        text = " -> ".join(timeline)
        print(f"serve bench: replicas (R running, S starting, X stopping) over time; load "
              f"stopped at {load_end:.1f}s: {text}", flush=True)
        return {"scale_peak_replicas": peak, "scale_final_replicas": sample().get("RUNNING", 0),
                "scale_timeline": text, "scale_load_stopped_s": round(load_end, 1),
                "scale_requests": found.get("ok", 0), "scale_errors": found.get("errors", 0),
                "scale_p50_ms": found.get("p50_ms")}

    def stop(self) -> int:
        """Stop the endpoint; the rows its sink wrote (one per request id)."""
        from pipelines.serve.control import stop_endpoint
        from pipelines.serve.sink import read_serve_log

        stop_endpoint()
        return read_serve_log(self.sink).num_rows


# -------------------------------------------------------------------------------- load generator
def _poster(url: str, png: bytes, route: str) -> Callable:
    """``post(conn) -> (status, conn, server_timing)`` on a reused keep-alive connection.

    ``v1``: the PNG to ``/v1/segment`` with ``Accept: image/png`` (the mask PNG back).  ``v2``:
    the same PNG as a binary BYTES tensor to the Open Inference Protocol's infer route, which
    answers its default outputs as binary tensors (what ``tritonclient`` sends and gets when it
    names no output).
    """
    import json

    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    if host != "127.0.0.1":
        raise ValueError(f"the serve bench only sends traffic to 127.0.0.1, got {host}")
    if route == "v1":
        path, body = "/v1/segment", png
        headers = {"Accept": "image/png", "Content-Type": "application/octet-stream"}
    else:
        tensor = len(png).to_bytes(4, "little") + png
        header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": len(tensor)}}],
                             "parameters": {"binary_data_output": True}}).encode()
        path, body = "/v2/models/bench/infer", header + tensor
        headers = {"Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": str(len(header))}

    def post(conn: http.client.HTTPConnection | None):
        conn = conn or http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            timing = response.getheader("Server-Timing") or ""
            parts = (item.strip().split(";dur=") for item in timing.split(",") if ";dur=" in item)
            return response.status, conn, {name: float(value) for name, value in parts}
        except (OSError, http.client.HTTPException):
            conn.close()
            return 0, None, {}

    return post


def _load(post: Callable, concurrency: int, total: int, limit_s: float,
          stop: threading.Event | None = None) -> dict[str, Any]:
    """``total`` requests over ``concurrency`` connections, ending early at ``limit_s``."""
    lock = threading.Lock()
    issued, errors = [0], [0]
    latencies: list[float] = []
    server: list[dict[str, float]] = []
    deadline = time.monotonic() + limit_s

    def worker() -> None:
        conn = None
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            with lock:
                if issued[0] >= total:
                    break
                issued[0] += 1
            start = time.perf_counter()
            status, conn, timing = post(conn)
            elapsed = (time.perf_counter() - start) * 1e3
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                    server.append(timing)
                else:
                    errors[0] += 1
        if conn is not None:
            conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return _summary(latencies, server, errors[0], time.perf_counter() - started)


def _summary(latencies: list[float], server: list[dict[str, float]], errors: int,
             seconds: float) -> dict[str, Any]:
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    replica = {f"replica_{key}_p50_ms": round(statistics.median(t[key] for t in server), 2)
               for key in ("receive", "decode", "infer", "encode", "total")
               if server and key in server[0]}
    return {"ok": len(latencies), "errors": errors, "seconds": round(seconds, 2),
            "p50_ms": round(float(q[0]), 2), "p95_ms": round(float(q[1]), 2),
            "p99_ms": round(float(q[2]), 2), "rps": round(len(latencies) / seconds, 1),
            **replica, "_latencies": latencies, "_server": server}


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary over several runs of the same setting."""
    return _summary([x for p in parts for x in p["_latencies"]],
                    [x for p in parts for x in p["_server"]],
                    sum(p["errors"] for p in parts), sum(p["seconds"] for p in parts))


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'ingress':<12} {'route':<9} {'conc':>4} {'batch':>5} {'ok':>5} {'err':>4} " \
           f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>7}"
    return "\n".join([head] + [
        f"{r['ingress']:<12} {ROUTE_NAMES[r['route']]:<9} {r['concurrency']:>4} "
        f"{r['max_batch_size']:>5} {r['ok']:>5} "
        f"{r['errors']:>4} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['p99_ms']:>8} {r['rps']:>7}"
        for r in rows])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
