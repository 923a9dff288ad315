"""The online endpoint over real HTTP on 127.0.0.1, on the session's local Ray and moto S3.

One application serves the whole module (starting one costs ~10 s on two cores); the auth tests
redeploy it with a key, and the last test stops it and counts the Parquet rows on S3.  Every 200
answer is recorded, so the sink check covers every request the module sent.  The Parquet buffer
and the Serve configs (jobs/configs/serve.yaml, infra/rayservice.yaml) are also tested without
Ray, first.
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from jobs.options import shipped_config
from pipelines import predictions
from pipelines.serve.app import replica_counts, start_endpoint, stop_endpoint
from pipelines.serve.control import BatchSettings, ServeArgs, load_serve_config
from pipelines.serve.sink import PredictionSink
from pipelines.storage import copy_dir_from_local, list_uri, read_table
from seg_core.artifact import load_artifact, sha256_file
from seg_core.codecs import decode_image
from seg_core.inference import Segmenter, encode_prediction
from tests.hostile_files import png_bomb
from seg_core.sample_data import render_sample
from tests.serve_util import (encode_as, endpoint_config, free_port, get, make_artifact,
                               multipart, post)

FORMATS = ("png", "jpeg", "bmp", "gif", "tiff")
MAX_REQUEST_BYTES = 200_000
MAX_PIXELS = 1_000_000
KEY_ENV = "RAYSEG_TEST_SERVE_KEY"


# ------------------------------------------------------------------ without Ray: sink, configs
def sink_row(request_id: str) -> dict:
    return {"id": request_id, "request_id": request_id, "mask_png": b"png", "latency_ms": 1.5,
            "class_pixel_counts": [1, 2], "created_at": datetime(2026, 11, 24, 23, 59,
                                                                 tzinfo=timezone.utc)}


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_sink_flushes_by_count_then_the_rest_on_close(tmp_path):
    sink = PredictionSink(str(tmp_path), flush_rows=3, flush_interval_s=3600, writer_id="r1")
    for i in range(3):
        sink.add(sink_row(f"req-{i}"))
    assert wait_for(lambda: sink.rows_written == 3)
    sink.add(sink_row("req-3"))
    sink.add(sink_row("req-4"))
    time.sleep(0.3)
    assert sink.pending == 2 and len(sink.files_written) == 1  # below the count: buffered
    assert sink.close() == 5 and sink.close() == 5  # idempotent
    assert len(sink.files_written) == 2
    assert all("/date=2026-11-24/serve-r1-" in uri for uri in sink.files_written)
    table = read_table(str(tmp_path))
    assert sorted(table.column("request_id").to_pylist()) == [f"req-{i}" for i in range(5)]
    with pytest.raises(RuntimeError, match="after close"):
        sink.add(sink_row("late"))


def test_sink_flushes_by_age_into_one_file(tmp_path):
    sink = PredictionSink(str(tmp_path), flush_rows=1000, flush_interval_s=0.2)
    sink.add(sink_row("a"))
    sink.add(sink_row("b"))
    assert wait_for(lambda: sink.rows_written == 2, timeout_s=5)
    assert len(sink.files_written) == 1 and sink.pending == 0
    sink.close()
    assert len(sink.files_written) == 1  # nothing left: no empty file


def test_sink_keeps_rows_when_storage_fails_and_writes_them_later(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output directory should be")
    sink = PredictionSink(str(blocker), flush_rows=1000, flush_interval_s=3600)
    sink.add(sink_row("kept"))
    with pytest.raises(OSError):
        sink.flush()
    assert sink.pending == 1
    blocker.unlink()
    assert sink.close() == 1
    assert read_table(str(blocker)).column("id").to_pylist() == ["kept"]


def test_serve_configs_validate_and_agree():
    """jobs/configs/serve.yaml and the RayService's serveConfigV2 deploy the same application."""
    import yaml

    local = load_serve_config(shipped_config("serve"))
    manifest = yaml.safe_load(Path("infra/rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    cluster = load_serve_config(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
    for data in (local, cluster):
        app = data["applications"][0]
        assert app["import_path"] == "pipelines.serve:build_app"
        ServeArgs.model_validate(app["args"])
        (deployment,) = app["deployments"]
        assert deployment["name"] == "SegmentService" and deployment["num_replicas"] == "auto"
        scaling = deployment["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
        assert scaling["target_ongoing_requests"] > 0
        assert scaling["upscale_delay_s"] >= scaling["look_back_period_s"]  # no flapping
        batch = BatchSettings(**deployment["user_config"])
        assert batch.max_batch_size <= deployment["max_ongoing_requests"]
    assert cluster["applications"][0]["args"]["api_key_env"]
    assert local["http_options"]["host"] == "127.0.0.1"


def test_builder_takes_typed_args_and_sets_no_replica_counts():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from pipelines.serve.app import build_app

    app = call_user_app_builder_with_args_if_necessary(build_app, {"model_uri": "m"})
    deployment = app._bound_deployment
    assert deployment.init_args[0] == ServeArgs(model_uri="m")
    assert deployment.user_config == {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}
    assert deployment.num_replicas == 1  # Serve's default: the config file sets "auto"
    with pytest.raises(Exception, match="model_uri"):
        call_user_app_builder_with_args_if_necessary(build_app, {"out_uri": "x"})


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("serve-model") / "tiny")


@pytest.fixture(scope="module")
def segmenter(model_dir) -> Segmenter:
    return Segmenter(load_artifact(model_dir), engine="auto")   # the endpoint's default


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """One 96 x 80 scene in each of the five formats (GIF is palette-quantised, JPEG lossy)."""
    image, _ = render_sample(3, size=(96, 80), shape_types=2, seed=1)
    return {fmt: encode_as(image, fmt) for fmt in FORMATS}


@pytest.fixture(scope="module")
def endpoint(ray_session, s3_bucket, model_dir):
    """The app on a free loopback port; the sink holds every row until shutdown."""
    out = f"s3://{s3_bucket}/serve-{uuid.uuid4().hex[:8]}"
    config = endpoint_config(free_port())
    args = {"flush_rows": 10_000, "flush_interval_s": 3600, "max_unflushed_age_s": 7200,
            "max_request_bytes": MAX_REQUEST_BYTES, "max_pixels": MAX_PIXELS}
    url = start_endpoint(str(model_dir), out, config=config, args=args)
    state = {"url": url, "out": out, "config": config, "args": args, "answered": [],
             "running": True}
    yield state
    if state["running"]:
        stop_endpoint()


# -------------------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gets_the_local_mask(endpoint, segmenter, images, model_dir, fmt):
    status, headers, body = post(endpoint["url"], images[fmt], answered=endpoint["answered"])
    assert status == 200, body
    answer = json.loads(body)
    expected = encode_prediction(segmenter.predict(decode_image(images[fmt])),
                                 segmenter.mask_spec, with_confidence=False)
    assert base64.b64decode(answer["mask_png"]) == expected["mask_png"]
    assert answer["class_pixel_counts"] == expected["class_pixel_counts"]
    assert sum(1 for n in answer["class_pixel_counts"] if n) >= 2  # a mask worth comparing
    assert answer["class_areas"]["a"]["pixels"] == expected["class_pixel_counts"][1]
    assert (answer["height"], answer["width"]) == (96, 80)
    assert answer["model"] == {"name": "tiny", "version": "t1", "ref": str(model_dir),
                               "weights_sha256": sha256_file(model_dir / "weights.pt")}
    assert answer["mean_confidence"] == pytest.approx(expected["mean_confidence"], abs=1e-6)
    assert answer["timing_ms"]["total"] >= answer["timing_ms"]["infer"] > 0
    assert "confidence_png" not in answer
    assert headers["X-Request-Id"] == answer["request_id"]
    assert "infer;dur=" in headers["Server-Timing"]


@pytest.mark.slow
def test_png_accept_multipart_and_confidence(endpoint, segmenter, images):
    url, answered = endpoint["url"], endpoint["answered"]
    expected = encode_prediction(segmenter.predict(decode_image(images["png"])),
                                 segmenter.mask_spec, with_confidence=True)
    status, headers, body = post(url, images["png"], headers={"Accept": "image/png"},
                                 answered=answered)
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body == expected["mask_png"]
    form, content_type = multipart("image", "scene.tiff", images["tiff"])
    status, _, body = post(url, form, headers={"Content-Type": content_type}, answered=answered)
    assert status == 200, body
    tiff_mask = encode_prediction(segmenter.predict(decode_image(images["tiff"])),
                                  segmenter.mask_spec, with_confidence=False)["mask_png"]
    assert base64.b64decode(json.loads(body)["mask_png"]) == tiff_mask
    status, _, body = post(url, images["png"], query="?confidence=true", answered=answered)
    assert status == 200
    assert base64.b64decode(json.loads(body)["confidence_png"]) == expected["confidence_png"]


BAD_INPUTS = {
    "garbage": (b"this is not an image at all\n" * 4, 415, "not_an_image"),
    "empty": (b"", 422, "empty_file"),
    "bomb": (png_bomb(), 413, "too_many_pixels"),
    "oversized": (b"\x89PNG\r\n\x1a\n" + bytes(MAX_REQUEST_BYTES), 413, "payload_too_large"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", [*BAD_INPUTS, "truncated", "multipart_without_file"])
def test_bad_input_gets_4xx_and_the_replica_keeps_answering(endpoint, images, case):
    url = endpoint["url"]
    headers: dict = {}
    if case == "truncated":
        data, status_expected, reason = images["png"][: len(images["png"]) // 2], 422, "truncated"
    elif case == "multipart_without_file":
        boundary = uuid.uuid4().hex
        data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n"
                f"--{boundary}--\r\n").encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        status_expected, reason = 422, "missing_image"
    else:
        data, status_expected, reason = BAD_INPUTS[case]
    status, _, body = post(url, data, headers=headers)
    assert status == status_expected, body
    answer = json.loads(body)
    assert answer["error"] == reason and answer["detail"] and answer["request_id"]
    assert get(url, "/healthz")[0] == 200
    assert post(url, images["bmp"], answered=endpoint["answered"])[0] == 200


@pytest.mark.slow
def test_model_route_reports_artifact_and_batching(endpoint):
    status, info = get(endpoint["url"], "/v1/model")
    assert status == 200
    assert info["name"] == "tiny"
    assert info["artifact"]["mask_spec"]["class_names"] == ["bg", "a", "b"]
    user_config = endpoint["config"]["applications"][0]["deployments"][0]["user_config"]
    assert info["serving"]["max_batch_size"] == user_config["max_batch_size"]
    assert info["serving"]["max_pixels"] == MAX_PIXELS
    assert info["serving"]["engine"] == "openvino"   # engine: auto on a CPU replica
    assert replica_counts() == {"RUNNING": 1}


@pytest.mark.slow
def test_concurrent_requests_all_reach_the_forward_counters(endpoint, images):
    """A burst of 12 is answered whole, carried by at most 12 forward calls."""
    from concurrent.futures import ThreadPoolExecutor

    url, answered = endpoint["url"], endpoint["answered"]
    before = get(url, "/v1/model")[1]["serving"]
    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(lambda _: post(url, images["png"], answered=answered)[0],
                                 range(12)))
    assert statuses == [200] * 12
    after = get(url, "/v1/model")[1]["serving"]
    assert after["forwarded_requests"] - before["forwarded_requests"] == 12
    assert 1 <= after["forwards"] - before["forwards"] <= 12


@pytest.mark.slow
def test_a_second_address_is_refused_while_serve_runs(endpoint, model_dir):
    other = load_serve_config(endpoint["config"])
    other["http_options"]["port"] = free_port()
    with pytest.raises(ValueError, match="already listens on"):
        start_endpoint(str(model_dir), endpoint["out"], config=other, args=endpoint["args"])
    assert get(endpoint["url"], "/healthz")[0] == 200


@pytest.mark.slow
def test_parity_with_rayseg_predict(endpoint, images, model_dir, tmp_path):
    """The batch job (Ray Data + predictor actors) and the endpoint give the same mask bytes."""
    from pipelines.predict.predict import PredictConfig, run_predict

    folder = tmp_path / "images"
    folder.mkdir()
    name = {fmt: f"scene_{fmt}.{'tif' if fmt == 'tiff' else fmt}" for fmt in images}
    for fmt, data in images.items():
        (folder / name[fmt]).write_bytes(data)
    out = str(tmp_path / "predictions")
    run_predict(PredictConfig(model=str(model_dir), input=str(folder), out=out, batch_size=2,
                              actors=1, cpus_per_actor=0.5, progress=False), log=lambda _: None)
    batch = {row["id"]: row["mask_png"]
             for row in predictions.scan(out, ["id", "mask_png"]).to_pylist()}
    assert sorted(batch) == sorted(name[fmt] for fmt in FORMATS)   # ids: paths under the prefix
    for fmt, data in images.items():
        status, _, body = post(endpoint["url"], data, headers={"Accept": "image/png"},
                               answered=endpoint["answered"])
        assert status == 200
        assert body == batch[name[fmt]], fmt


@pytest.mark.slow
def test_api_key_on_and_off(endpoint, images, model_dir, monkeypatch):
    """Redeploys with a key, and with the artifact read from S3 (copied to the replica)."""
    url, answered = endpoint["url"], endpoint["answered"]
    assert post(url, images["png"], answered=answered)[0] == 200  # off: no header needed
    monkeypatch.setenv(KEY_ENV, "s3cret-key")
    model_uri = copy_dir_from_local(model_dir, f"{endpoint['out']}-model")
    start_endpoint(model_uri, endpoint["out"], config=endpoint["config"],
                   args=endpoint["args"], api_key_env=KEY_ENV)
    status, _, body = post(url, images["png"])
    assert status == 401 and json.loads(body)["error"] == "unauthorized"
    assert post(url, images["png"], headers={"X-API-Key": "wrong"})[0] == 401
    assert get(url, "/v1/model")[0] == 401
    status, info = get(url, "/v1/model", headers={"X-API-Key": "s3cret-key"})
    assert status == 200 and info["version"] == "t1"
    assert get(url, "/healthz")[0] == 200  # probes never need the key
    status, _, _ = post(url, images["png"], headers={"X-API-Key": "s3cret-key"},
                        answered=answered)
    assert status == 200


@pytest.mark.slow
def test_every_answered_request_is_in_parquet_after_shutdown(endpoint, images):
    url, answered = endpoint["url"], endpoint["answered"]
    headers = {"X-API-Key": "s3cret-key"}
    own = [f"sink-{i}" for i in range(12)]
    for request_id in own:
        status, head, _ = post(url, images["gif"], headers={**headers, "X-Request-Id": request_id},
                               answered=answered)
        assert status in (200, 401)
        if status == 401:  # run alone: the key test did not run, the endpoint is open
            status, head, _ = post(url, images["gif"], headers={"X-Request-Id": request_id},
                                   answered=answered)
        assert status == 200 and head["X-Request-Id"] == request_id
    stop_endpoint()
    endpoint["running"] = False
    files = list_uri(endpoint["out"], suffixes=(".parquet",))
    table = read_table(endpoint["out"])
    ids = table.column("request_id").to_pylist()
    assert len(ids) == len(answered) and sorted(ids) == sorted(answered)
    assert set(own) <= set(ids)
    assert table.column("id").to_pylist() == ids
    assert min(table.column("latency_ms").to_pylist()) > 0
    # Buffered: one file per replica lifetime (the key test restarted it once), not per request.
    assert 1 <= len(files) <= 2 < len(ids)
    dates = {c.astimezone(timezone.utc).strftime("%Y-%m-%d")
             for c in table.column("created_at").to_pylist()}
    assert all(uri.split("/")[-2] in {f"date={d}" for d in dates} for uri in files), files
