"""The Open Inference Protocol (KServe V2) on the endpoint, called by Triton's own HTTP client.

First the protocol's parser and answers without Ray; then one endpoint on 127.0.0.1 (the
session's local Ray, through Serve's proxy actor; the ``serve`` benchmark runs the same client
through the HAProxy ingress too) that ``tritonclient.http`` calls with binary and JSON tensors,
whose masks are compared byte for byte with ``POST /v1/segment``'s, that refuses 25 hostile
requests with a 4xx from the same replica process, and whose log holds every answered image.
"""
from __future__ import annotations

import io
import json
import socket
import urllib.error
import struct
import uuid
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from pipelines.serve import v2
from pipelines.serve.app import start_endpoint, stop_endpoint
from pipelines.serve.http import RequestRefused
from pipelines.serve.sink import read_serve_log
from seg_core.sample_data import render_sample
from tests.serve_util import encode_as, endpoint_config, free_port, get, make_artifact, post

MAX_REQUEST_BYTES = 200_000
MAX_PIXELS = 1_000_000


def bytes_tensor(elements: list[bytes]) -> bytes:
    """The binary form of a BYTES tensor, written here from the protocol's text (not by the
    code under test): a little-endian uint32 length before each element."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def binary_request(header: dict, *tensors: bytes) -> tuple[bytes, str]:
    text = json.dumps(header).encode()
    return text + b"".join(tensors), str(len(text))


# ------------------------------------------------------------------------ without Ray: parser
def test_parse_bytes_binary_and_uint8_json():
    pngs = [encode_as(np.full((3, 5, 3), i, np.uint8), "png") for i in range(2)]
    raw = bytes_tensor(pngs)
    body, length = binary_request({"id": "r1", "inputs": [{
        "name": "IMAGE", "datatype": "BYTES", "shape": [2],
        "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True}}, raw)
    parsed = v2.parse_infer(body, length, max_pixels=100)
    assert parsed.id == "r1" and parsed.encoded == pngs and parsed.count == 2
    assert [w.name for w in parsed.outputs] == list(v2.DEFAULT_OUTPUTS)
    assert all(w.binary for w in parsed.outputs)

    pixels = np.arange(2 * 3 * 4 * 1, dtype=np.uint8).reshape(2, 3, 4, 1)
    nested = pixels.tolist()       # JSON data may be nested row-major
    parsed = v2.parse_infer(json.dumps({"inputs": [{
        "name": "IMAGE", "datatype": "UINT8", "shape": [2, 3, 4, 1], "data": nested}],
        "outputs": [{"name": "CONFIDENCE"}, {"name": "MASK", "parameters": {
            "binary_data": True}}]}).encode(), None, max_pixels=100)
    assert parsed.id is None and len(parsed.arrays) == 2
    assert np.array_equal(np.stack(parsed.arrays), pixels)
    assert parsed.outputs == (v2.Wanted("CONFIDENCE", False), v2.Wanted("MASK", True))


def test_outputs_pad_a_batch_of_sizes_and_multilabel_keeps_planes():
    from seg_core.inference.segmenter import Prediction

    small = Prediction(probs=None, mask=np.ones((2, 3), np.uint8),
                       confidence=np.full((2, 3), 0.5, np.float32), entropy=None)
    large = Prediction(probs=None, mask=np.zeros((4, 2), np.uint8),
                       confidence=np.ones((4, 2), np.float32), entropy=None)
    request = v2.InferRequest(id=None, outputs=tuple(v2.Wanted(n, False) for n in v2.OUTPUTS))
    tensors = {t.name: t for t in v2.output_tensors(request, [small, large], [[0, 6], [8, 0]],
                                                    multilabel=False)}
    mask = tensors["MASK"].array
    assert mask.shape == (2, 4, 3) and tensors["MASK"].shape == [2, 4, 3]
    assert (mask[0, :2, :3] == 1).all() and (mask[0, 2:] == v2.MASK_PAD).all()
    assert (mask[1, :, :2] == 0).all() and (mask[1, :, 2] == v2.MASK_PAD).all()
    assert np.isnan(tensors["CONFIDENCE"].array[0, 3, 0])
    assert tensors["IMAGE_SIZE"].array.tolist() == [[2, 3], [4, 2]]
    answer = v2.infer_response(request, list(tensors.values()), model_name="m",
                               model_version="1", headers={})
    confidence = next(o for o in json.loads(answer.body)["outputs"] if o["name"] == "CONFIDENCE")
    assert confidence["data"][:3] == [0.5, 0.5, 0.5] and confidence["data"][9] is None

    planes = Prediction(probs=None, mask=np.zeros((3, 2, 2), np.uint8),
                        confidence=np.ones((2, 2), np.float32), entropy=None)
    request = v2.InferRequest(id="x", outputs=(v2.Wanted("MASK", True),))
    [tensor] = v2.output_tensors(request, [planes], [[0, 0, 0]], multilabel=True)
    assert tensor.shape == [1, 3, 2, 2]
    answer = v2.infer_response(request, [tensor], model_name="m", model_version="1", headers={})
    length = int(answer.headers[v2.HEADER_LENGTH])
    header = json.loads(answer.body[:length])
    assert header["id"] == "x" and header["outputs"][0]["parameters"]["binary_data_size"] == 12
    assert len(answer.body) == length + 12


@pytest.mark.parametrize("body, length, reason", [
    (b'{"inputs": []}', None, "expected one input"),
    (b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1]}]}', None, "no data"),
    (b"\xff\xfe", None, "not UTF-8"),
    (b'{"inputs": 1}', "3", "does not parse"),
    (b"{}", "99", "the body has 2"),
    (b"{}", "-2", "not a byte count"),
])
def test_parse_refuses_with_a_400_that_says_why(body, length, reason):
    with pytest.raises(RequestRefused) as refused:
        v2.parse_infer(body, length, max_pixels=100)
    assert refused.value.status == 400 and reason in refused.value.detail


def test_header_guard_drops_what_ray_serve_cannot_decode():
    import asyncio

    from pipelines.serve.http import HeaderGuard

    seen = {}

    async def app(scope, receive, send):
        seen["headers"] = scope["headers"]

    headers = [(b"x-request-id", b"\xc3\x28"), (b"x-note", b"\xff"), (b"accept", b"image/png"),
               (b"x-other", "caf\u00e9".encode())]
    asyncio.run(HeaderGuard(app)({"type": "http", "headers": headers}, None, None))
    assert seen["headers"] == [(b"accept", b"image/png"), (b"x-other", "caf\u00e9".encode())]
    for value, kept in [(b"abc-123", True), (b"", False), (b"r" * 129, False),
                        (b"a b", False), (b"r" * 128, True)]:
        asyncio.run(HeaderGuard(app)({"type": "http", "headers": [(b"x-request-id", value)]},
                                     None, None))
        assert bool(seen["headers"]) is kept, value


# ------------------------------------------------------------------------------ the endpoint
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("serve-v2-model") / "tiny")


@pytest.fixture(scope="module")
def scenes() -> list[np.ndarray]:
    """Four RGB scenes of different, non-square sizes."""
    sizes = [(96, 80), (64, 112), (50, 50), (120, 72)]
    return [render_sample(3, size=size, shape_types=2, seed=seed)[0]
            for seed, size in enumerate(sizes)]


@pytest.fixture(scope="module")
def endpoint(ray_session, s3_bucket, model_dir):
    out = f"s3://{s3_bucket}/serve-v2-{uuid.uuid4().hex[:8]}"
    config = endpoint_config(free_port())
    args = {"flush_rows": 10_000, "flush_interval_s": 3600, "max_unflushed_age_s": 7200,
            "max_request_bytes": MAX_REQUEST_BYTES, "max_pixels": MAX_PIXELS,
            "instances": "watershed"}   # /v1/segment answers carry the objects
    url = start_endpoint(str(model_dir), out, config=config, args=args)
    state = {"url": url, "out": out, "answered": [], "running": True}
    yield state
    if state["running"]:
        stop_endpoint()


@pytest.fixture(scope="module")
def client(endpoint):
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(urlsplit(endpoint["url"]).netloc) as triton:
        yield triton


def v1_mask(endpoint, data: bytes) -> np.ndarray:
    status, _, body = post(endpoint["url"], data, headers={"Accept": "image/png"},
                           answered=endpoint["answered"])
    assert status == 200, body
    return np.asarray(Image.open(io.BytesIO(body)))


@pytest.mark.slow
def test_tritonclient_bytes_in_binary_out_matches_v1(endpoint, client, scenes):
    import tritonclient.http as httpclient

    data = encode_as(scenes[0], "png")
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([data], dtype=np.object_))   # binary by default
    result = client.infer("tiny", [image], request_id="v2-bytes-1")  # names no output: binary
    endpoint["answered"].append("v2-bytes-1")
    response = result.get_response()
    assert response["model_name"] == "tiny" and response["model_version"] == "t1"
    assert response["id"] == "v2-bytes-1"
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    mask = result.as_numpy("MASK")
    assert mask.dtype == np.uint8 and mask.shape == (1, 96, 80)
    expected = v1_mask(endpoint, data)
    assert mask[0].tobytes() == expected.tobytes()
    counts = result.as_numpy("CLASS_PIXEL_COUNTS")
    assert counts.tolist() == [np.bincount(expected.ravel(), minlength=3).tolist()]
    assert sum(1 for n in counts[0] if n) >= 2          # a mask worth comparing
    assert result.as_numpy("IMAGE_SIZE").tolist() == [[96, 80]]
    assert result.as_numpy("CONFIDENCE") is None        # only when asked


@pytest.mark.slow
def test_tritonclient_uint8_in_json_out_with_confidence(endpoint, client, scenes):
    import tritonclient.http as httpclient

    pixels = scenes[1][None]                             # 1 x 64 x 112 x 3
    image = httpclient.InferInput("IMAGE", list(pixels.shape), "UINT8")
    image.set_data_from_numpy(pixels, binary_data=False)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=False)
               for name in ("MASK", "CONFIDENCE")]
    result = client.infer("tiny", [image], outputs=outputs, model_version="t1",
                          request_id="v2-uint8-1")
    endpoint["answered"].append("v2-uint8-1")
    assert all("data" in o for o in result.get_response()["outputs"])
    mask = result.as_numpy("MASK")
    assert mask.shape == (1, 64, 112)
    assert mask[0].tobytes() == v1_mask(endpoint, encode_as(scenes[1], "png")).tobytes()
    confidence = result.as_numpy("CONFIDENCE")
    assert confidence.dtype == np.float32 and confidence.shape == (1, 64, 112)
    assert 0.0 < confidence.min() and confidence.max() <= 1.0


@pytest.mark.slow
def test_tritonclient_batch_of_four_sizes(endpoint, client, scenes):
    import tritonclient.http as httpclient

    formats = ["png", "bmp", "tiff", "gif"]
    encoded = [encode_as(scene, fmt) for scene, fmt in zip(scenes, formats)]
    image = httpclient.InferInput("IMAGE", [4], "BYTES")
    image.set_data_from_numpy(np.array(encoded, dtype=np.object_))
    result = client.infer("tiny", [image], request_id="v2-batch")
    endpoint["answered"].extend(f"v2-batch#{i}" for i in range(4))
    sizes = result.as_numpy("IMAGE_SIZE")
    assert sizes.tolist() == [list(scene.shape[:2]) for scene in scenes]
    mask = result.as_numpy("MASK")
    assert mask.shape == (4, 120, 112)
    for index, data in enumerate(encoded):
        height, width = sizes[index]
        assert mask[index, :height, :width].tobytes() == v1_mask(endpoint, data).tobytes()
        assert (mask[index, height:] == v2.MASK_PAD).all()
        assert (mask[index, :, width:] == v2.MASK_PAD).all()


@pytest.mark.slow
def test_metadata_readiness_and_a_refusal_through_the_client(endpoint, client):
    from tritonclient.utils import InferenceServerException
    import tritonclient.http as httpclient

    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "t1")
    assert not client.is_model_ready("other")
    assert "binary_data_tensor" not in client.get_server_metadata()["extensions"]
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    metadata = client.get_model_metadata("tiny")
    assert metadata["versions"] == ["t1"]
    assert {o["name"]: o["datatype"] for o in metadata["outputs"]} == {
        "MASK": "UINT8", "CONFIDENCE": "FP32", "CLASS_PIXEL_COUNTS": "INT64",
        "IMAGE_SIZE": "INT32"}
    assert metadata["parameters"]["class_names"] == ["bg", "a", "b"]
    with pytest.raises(InferenceServerException, match="serves 'tiny' version 't1'"):
        client.get_model_metadata("tiny", "9")
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="not_an_image") as refused:
        client.infer("tiny", [image])
    assert refused.value.status() == "415"
    with pytest.raises(InferenceServerException, match="serves model 'tiny'"):
        client.infer("other", [image])


# ----------------------------------------------------------------------- hostile requests
def raw_http(url: str, request: bytes) -> tuple[int, bytes]:
    """One request as raw bytes on a socket (headers no HTTP library would send); the status
    and body of the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def v2_post(url: str, body: bytes, *, header_length: str | None = None,
            path: str = "/v2/models/tiny/infer") -> tuple[int, dict]:
    headers = [b"Content-Type: application/octet-stream", b"Connection: close",
               b"Content-Length: " + str(len(body)).encode()]
    if header_length is not None:
        headers.append(f"{v2.HEADER_LENGTH}: {header_length}".encode())
    status, answer = raw_http(url, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                              + b"\r\n".join(headers) + b"\r\n\r\n" + body)
    return status, json.loads(answer)


def hostile_cases(png: bytes) -> dict[str, tuple]:
    """25 requests that break the protocol: ``(body, header_length, path, status)``."""
    def image_input(**fields) -> dict:
        return {"name": "IMAGE", "datatype": "BYTES", "shape": [1], **fields}

    def with_binary(raw: bytes, **fields) -> tuple[bytes, str]:
        return binary_request({"inputs": [image_input(
            parameters={"binary_data_size": len(raw)}, **fields)]}, raw)

    def as_json(header) -> bytes:
        return json.dumps(header).encode()

    good = bytes_tensor([png])
    tiny = encode_as(np.zeros((4, 4, 3), np.uint8), "png")
    body, length = with_binary(good)
    infer = "/v2/models/tiny/infer"
    cases = {
        "wrong_datatype": (*with_binary(good, datatype="FP32"), infer, 400),
        "shape_disagrees_with_bytes": (*with_binary(good, shape=[2]), infer, 400),
        "uint8_shape_disagrees": (*binary_request({"inputs": [{
            "name": "IMAGE", "datatype": "UINT8", "shape": [1, 4, 4, 3],
            "parameters": {"binary_data_size": 10}}]}, bytes(10)), infer, 400),
        "binary_size_past_body": (*binary_request({"inputs": [image_input(
            parameters={"binary_data_size": len(good) + 50})]}, good), infer, 400),
        "negative_binary_size": (*binary_request({"inputs": [image_input(
            parameters={"binary_data_size": -4})]}, good), infer, 400),
        "header_length_past_body": (body, str(len(body) + 1), infer, 400),
        "header_length_negative": (body, "-1", infer, 400),
        "header_length_not_a_number": (body, "12abc", infer, 400),
        "non_utf8_json": (b'{"inputs": "\xff\xfe"}', None, infer, 400),
        "json_not_an_object": (b"[1, 2, 3]", None, infer, 400),
        "json_does_not_parse": (b'{"inputs": [', None, infer, 400),
        "deeply_nested_json": (b"[" * 100_000 + b"]" * 100_000, None, infer, 400),
        "unknown_model": (body, length, "/v2/models/nope/infer", 404),
        "unknown_version": (body, length, "/v2/models/tiny/versions/7/infer", 404),
        "unknown_output_name": (*binary_request({"inputs": [image_input(
            parameters={"binary_data_size": len(good)})], "outputs": [{"name": "LOGITS"}]},
            good), infer, 400),
        "unknown_input_name": (*binary_request({"inputs": [{
            "name": "PIXELS", "datatype": "BYTES", "shape": [1],
            "parameters": {"binary_data_size": len(good)}}]}, good), infer, 400),
        "two_inputs": (as_json({"inputs": [image_input(data=["a"]), image_input(data=["b"])]}),
                       None, infer, 400),
        "element_length_past_tensor": (*with_binary(struct.pack("<I", 10_000) + png[:20]),
                                       infer, 400),
        "trailing_bytes": (body + b"extra", length, infer, 400),
        "bytes_as_json_text": (as_json({"inputs": [image_input(data=["hello"])]}), None, infer,
                               415),
        "uint8_value_out_of_range": (as_json({"inputs": [{
            "name": "IMAGE", "datatype": "UINT8", "shape": [1, 1, 2, 1], "data": [3, 300]}]}),
            None, infer, 400),
        "too_many_pixels": (as_json({"inputs": [{
            "name": "IMAGE", "datatype": "UINT8", "shape": [1, 2000, 2000, 1], "data": []}]}),
            None, infer, 413),
        "too_many_images": (*with_binary(bytes_tensor([tiny] * 65), shape=[65]), infer, 400),
        "truncated_image": (*with_binary(bytes_tensor([png[: len(png) // 2]])), infer, 422),
        "id_with_control_characters": (*binary_request({"id": "a\u0000b", "inputs": [
            image_input(parameters={"binary_data_size": len(good)})]}, good), infer, 400),
    }
    assert len(cases) == 25
    return cases


@pytest.mark.slow
def test_25_hostile_requests_get_a_4xx_from_the_same_replica(endpoint, scenes):
    url = endpoint["url"]
    pid = get(url, "/v1/model")[1]["pid"]
    for case, (body, length, path, expected) in hostile_cases(
            encode_as(scenes[2], "png")).items():
        status, answer = v2_post(url, body, header_length=length, path=path)
        assert status == expected, (case, answer)
        assert isinstance(answer["error"], str) and answer["error"], case
    status, info = get(url, "/v1/model")
    assert status == 200 and info["pid"] == pid


HOSTILE_HEADERS = {
    "not_utf8": b"X-Note: \xff\xfe\xfa",
    "control_characters": b"X-Note: a\x01b\x7fc",
    "request_id_not_utf8": b"X-Request-Id: \xc3\x28\xff",
    "request_id_control": b"X-Request-Id: id\x01\x02",
    "value_over_8kb": b"X-Note: " + b"v" * 9_000,
    "request_id_empty": b"X-Request-Id: ",
    "request_id_10kb": b"X-Request-Id: " + b"r" * 10_000,
}


@pytest.mark.slow
@pytest.mark.parametrize("route", ["v1", "v2"])
def test_hostile_headers_never_get_a_5xx(endpoint, scenes, route):
    png = encode_as(scenes[2], "png")
    if route == "v1":
        path, body, extra = b"/v1/segment", png, []
    else:
        raw = bytes_tensor([png])
        body, length = binary_request({"inputs": [{
            "name": "IMAGE", "datatype": "BYTES", "shape": [1],
            "parameters": {"binary_data_size": len(raw)}}]}, raw)
        path, extra = b"/v2/models/tiny/infer", [f"{v2.HEADER_LENGTH}: {length}".encode()]
    for case, header in HOSTILE_HEADERS.items():
        request = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   + b"\r\n".join([header, *extra, b"Content-Length: %d" % len(body)])
                   + b"\r\n\r\n" + body)
        status, answer = raw_http(endpoint["url"], request)
        assert status < 500, (route, case, status, answer[:300])
        if status == 200:
            endpoint["answered"].append(None)   # logged under a generated id


@pytest.mark.slow
def test_batch_online_and_evaluate_give_the_same_objects(endpoint, scenes, model_dir, tmp_path):
    """One image through the endpoint, `rayseg predict` and evaluate's own prediction, all with
    instances: watershed: the same label image and object table, and the labels are those
    seg_core computes from the answered mask."""
    import base64

    from pipelines import predictions
    from pipelines.config import EvaluateConfig
    from pipelines.evaluate.evaluate import _predict_first
    from pipelines.predict.predict import PredictConfig, run_predict
    from seg_core.instances import label_instances

    png = encode_as(scenes[0], "png")
    status, _, body = post(endpoint["url"], png, answered=endpoint["answered"])
    assert status == 200, body
    answer = json.loads(body)
    online = base64.b64decode(answer["instance_png"])
    labels = np.asarray(Image.open(io.BytesIO(online)))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))))
    assert np.array_equal(labels, label_instances(mask, method="watershed"))
    table = answer["objects"]["table"]
    assert answer["objects"]["count"] == len(table) == labels.max() >= 2
    assert [row["area"] for row in table] == [int((labels == i).sum())
                                              for i in range(1, labels.max() + 1)]

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "scene.png").write_bytes(png)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "scene.png").write_bytes(encode_as(np.zeros((96, 80), np.uint8), "png"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,mask,split\nimages/scene.png,masks/scene.png,val\n")
    batch = str(tmp_path / "batch")
    run_predict(PredictConfig(model=str(model_dir), input=str(tmp_path / "images"), out=batch,
                              instances="watershed", actors=1, cpus_per_actor=0.5,
                              progress=False), log=lambda _: None)
    scored = _predict_first(EvaluateConfig(manifest=str(manifest), model=str(model_dir),
                                           out=str(tmp_path / "eval"), instances="watershed",
                                           progress=False), log=lambda _: None)
    for out in (batch, scored):
        [row] = predictions.scan(out, ["instance_png", "objects"]).to_pylist()
        assert row["instance_png"] == online
        assert row["objects"] == table


@pytest.mark.slow
def test_explain_answers_the_map_seg_core_computes(endpoint, scenes, model_dir):
    """``POST /v1/explain``: the replica's map is seg_core's for the same image and class (the
    replica predicts with OpenVINO; maps come from its folded torch network), and a class or
    method it does not know is a 422 that lists the choices."""
    import base64
    import urllib.request

    from seg_core.artifact import load_artifact
    from seg_core.explain import explain
    from seg_core.inference import Segmenter

    png = encode_as(scenes[1], "png")

    def call(query: str) -> tuple[int, dict]:
        request = urllib.request.Request(f"{endpoint['url']}/v1/explain?{query}", data=png,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    status, answer = call("class=a&method=gradcam")
    assert status == 200, answer
    assert (answer["class"], answer["height"], answer["width"]) == ("a", 64, 112)
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["map_png"]))), np.int16)
    local = explain(Segmenter(load_artifact(model_dir), engine="torch"),
                    scenes[1], 1, method="gradcam")
    assert served.shape == local.shape and served.max() > 0
    assert np.abs(served - np.rint(local * 255)).max() <= 1
    status, answer = call("class=2&method=occlusion")    # by index; signed: 0 at 128
    assert status == 200 and answer["class"] == "b"
    assert call("class=zebra")[0] == 422
    status, answer = call("class=a&method=lime")
    assert status == 422 and "gradcam" in answer["detail"]


@pytest.mark.slow
def test_readme_tritonclient_snippet_runs_as_written(endpoint, scenes, tmp_path, monkeypatch,
                                                    capsys):
    from tests.test_readme_snippet import readme_snippet

    code = readme_snippet("<!-- readme-snippet-tritonclient:")
    line = 'url, model = "127.0.0.1:8000", "unet-sample"'
    assert line in code
    code = code.replace(line, f"url, model = {urlsplit(endpoint['url']).netloc!r}, 'tiny'")
    png = encode_as(scenes[3], "png")
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "images" / "0001.png").write_bytes(png)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_tritonclient"}
    exec(compile(code, "README.md", "exec"), namespace)
    endpoint["answered"].append(None)
    assert capsys.readouterr().out.startswith("(120, 72) [")
    assert namespace["mask"].tobytes() == v1_mask(endpoint, png).tobytes()


@pytest.mark.slow
def test_every_answered_image_is_in_the_log_with_a_bounded_id(endpoint):
    stop_endpoint()
    endpoint["running"] = False
    ids = read_serve_log(endpoint["out"]).column("request_id").to_pylist()
    named = [i for i in endpoint["answered"] if i is not None]
    assert set(named) <= set(ids)
    assert len(ids) == len(endpoint["answered"])
    assert all(0 < len(i) <= 256 and i.isprintable() for i in ids)
    for request_id in ids:
        request_id.encode("utf-8")   # raises on anything that is not valid UTF-8
