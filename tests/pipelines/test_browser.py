"""The endpoint's page (``GET /``) and ``report.html`` in headless Chromium (tests/browser_util.py).

One browser for the module.  The page tests run against one real endpoint (real Serve, real HTTP
on 127.0.0.1, a tiny artifact with its own palette, an API key), upload a real PNG through the
file input, and compare what the canvases hold, read back with ``getImageData``, with the mask
and confidence map that ``POST /v1/segment`` answers for the same bytes.  The report test opens
the ``report.html`` of a real ``run_evaluate`` from disk, copied alone into an empty directory.
"""
from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.evaluate.overlays import DEFAULT_PALETTE
from pipelines.evaluate.report_html import render_html
from pipelines.serve.page import page_html
from tests.browser_util import canvas_rgba, start_chromium, wait_for
from tests.serve_util import endpoint_config

pytestmark = pytest.mark.browser
KEY_ENV = "RAYSEG_TEST_PAGE_KEY"
KEY = "page-test-key"
PALETTE = ((20, 20, 20), (230, 60, 40), (40, 120, 230))
CLASSES = ("bg", "round", "square")
SCENE = "scene.png"


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A 96 x 80 sample scene as a PNG file on disk (the file the page uploads)."""
    from seg_core.sample_data import render_sample

    image, _ = render_sample(3, size=(96, 80), shape_types=2, seed=1)
    path = tmp_path_factory.mktemp("page") / SCENE
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="module")
def endpoint(ray_session, tmp_path_factory):
    """The app with an API key on a free loopback port; rows go to a local directory."""
    import torch

    from pipelines.serve.control import start_endpoint, stop_endpoint
    from seg_core.artifact import save_artifact
    from seg_core.config import MaskSpec, ModelConfig, Preprocessing
    from seg_core.model import UNet

    torch.manual_seed(0)
    model = UNet(ModelConfig(in_channels=3, num_classes=3, depth=2, base_width=4))
    with torch.no_grad():   # scaled random weights: masks that use several classes
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim == 4:
                param.mul_(3.0)
    root = tmp_path_factory.mktemp("page-endpoint")
    artifact = save_artifact(root / "tiny", model.eval(), name="tiny", version="p1",
                             mask_spec=MaskSpec(num_classes=3, class_names=CLASSES,
                                                palette=PALETTE),
                             preprocessing=Preprocessing(tile_size=64, tile_overlap=0.25),
                             metrics={})
    os.environ[KEY_ENV] = KEY
    out = str(root / "rows")
    url = start_endpoint(str(artifact), out, config=endpoint_config(), api_key_env=KEY_ENV,
                         args={"flush_rows": 10_000, "flush_interval_s": 3600,
                               "max_unflushed_age_s": 7200})
    state = {"url": url, "out": out, "running": True}
    yield state
    if state["running"]:
        stop_endpoint()
    os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def answer(endpoint, scene) -> dict:
    """What ``POST /v1/segment?confidence=true`` answers for the scene's bytes."""
    request = urllib.request.Request(f"{endpoint['url']}/v1/segment?confidence=true",
                                     data=scene.read_bytes(), method="POST",
                                     headers={"X-API-Key": KEY})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    assert sum(1 for n in body["class_pixel_counts"] if n) >= 2, "a mask worth comparing"
    return body


@pytest.fixture(scope="module")
def segmented(browser, endpoint, scene) -> str:
    """The page after the user typed the key and picked the scene; returns the request id."""
    browser.get(f"{endpoint['url']}/")
    browser.find_element("id", "key").send_keys(KEY)
    browser.find_element("id", "file").send_keys(str(scene))
    return wait_for(browser, "document.body.dataset.segmented || "
                             "(document.getElementById('status').className === 'error' && "
                             "'error: ' + document.getElementById('status').textContent)")


def decode(base64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(base64_png))))


def rgba(driver, canvas_id: str, height: int, width: int) -> np.ndarray:
    return np.asarray(canvas_rgba(driver, canvas_id), np.uint8).reshape(height, width, 4)


def set_opacity(driver, value: float) -> None:
    driver.execute_script("const s = document.getElementById('opacity'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('input'));", str(value))


# ---------------------------------------------------------------------------- the page
def test_page_is_public_self_contained_and_needs_the_key_to_segment(browser, endpoint, scene):
    with urllib.request.urlopen(f"{endpoint['url']}/", timeout=30) as response:  # no key
        status, kind, html = response.status, response.headers["Content-Type"], \
            response.read().decode()
    assert status == 200 and kind.startswith("text/html")
    assert json.dumps([list(c) for c in PALETTE]) in html       # the artifact's palette
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched
    assert "Content-Security-Policy" in html and "connect-src 'self'" in html
    assert "localStorage" not in html and "cookie" not in html
    with pytest.raises(urllib.error.HTTPError) as refused:     # the API itself keeps its key
        urllib.request.urlopen(urllib.request.Request(f"{endpoint['url']}/v1/segment",
                                                      data=scene.read_bytes()), timeout=30)
    assert refused.value.code == 401
    browser.get(f"{endpoint['url']}/")
    browser.find_element("id", "file").send_keys(str(scene))   # no key typed
    message = wait_for(browser, "document.getElementById('status').className === 'error' && "
                                "document.getElementById('status').textContent")
    assert message.startswith("401 unauthorized") and "X-API-Key" in message
    assert browser.execute_script("return document.getElementById('result').hidden")


def test_canvases_hold_the_apis_mask_and_confidence(browser, segmented, answer, scene):
    assert not segmented.startswith("error"), segmented
    height, width = answer["height"], answer["width"]
    ids = decode(answer["mask_png"])
    expected = np.asarray(PALETTE, np.uint8)[ids]              # H x W x 3
    mask = rgba(browser, "mask", height, width)
    np.testing.assert_array_equal(mask[..., :3], expected)
    assert (mask[..., 3] == 255).all()
    set_opacity(browser, 1.0)                                  # the overlay is the mask alone
    np.testing.assert_array_equal(rgba(browser, "overlay", height, width)[..., :3], expected)
    set_opacity(browser, 0.0)                                  # ... or the image alone
    image = np.asarray(Image.open(scene).convert("RGB"))
    np.testing.assert_array_equal(rgba(browser, "overlay", height, width)[..., :3], image)
    set_opacity(browser, 0.5)
    blended = rgba(browser, "overlay", height, width)[..., :3].astype(int)
    assert np.abs(blended - (image.astype(int) + expected) / 2).max() <= 2   # 8-bit alpha
    confidence = rgba(browser, "confidence", height, width)
    np.testing.assert_array_equal(confidence[..., 0], decode(answer["confidence_png"]))


def test_legend_model_and_timing(browser, segmented, answer):
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#legend tbody tr')].map(r => ({"
        "name: r.querySelector('.name').textContent,"
        "colour: getComputedStyle(r.querySelector('.swatch')).backgroundColor,"
        "pixels: r.querySelector('.pixels').textContent,"
        "fraction: r.querySelector('.fraction').textContent,"
        "visible: r.getBoundingClientRect().height > 0}))")
    assert [r["name"] for r in rows] == list(CLASSES) == answer["class_names"]
    assert [r["colour"] for r in rows] == [f"rgb({r}, {g}, {b})" for r, g, b in PALETTE]
    for row, name in zip(rows, CLASSES):
        area = answer["class_areas"][name]
        assert row["visible"] and row["pixels"] == str(area["pixels"])
        assert row["fraction"] == f"{100 * area['fraction']:.2f} %"
    assert sum(int(r["pixels"]) for r in rows) == answer["height"] * answer["width"]
    text = browser.find_element("id", "model").text
    assert text == "model: tiny p1"
    timing = browser.find_element("id", "timing").text
    assert "infer" in timing and "total" in timing and segmented in timing
    assert browser.execute_script("return localStorage.length + sessionStorage.length") == 0
    assert browser.execute_script("return document.cookie") == ""
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert origins and set(origins) == {browser.execute_script("return location.origin")}


def test_why_overlays_the_map_the_api_answers(browser, endpoint, segmented, answer, scene):
    """The "why" toggle: clicking a legend row asks POST /v1/explain for that class and paints
    its map (red, strength as alpha) over the image; unticking brings the mask back."""
    assert not segmented.startswith("error"), segmented
    height, width = answer["height"], answer["width"]
    request = urllib.request.Request(f"{endpoint['url']}/v1/explain?class=1&method=gradcam",
                                     data=scene.read_bytes(), method="POST",
                                     headers={"X-API-Key": KEY})
    with urllib.request.urlopen(request, timeout=120) as response:
        expected = decode(json.loads(response.read())["map_png"])
    assert expected.max() == 255 and expected.shape == (height, width)
    browser.execute_script("document.getElementById('why').click()")
    browser.execute_script("document.querySelector('#legend tbody tr[data-class=\"1\"]')"
                           ".click()")
    assert wait_for(browser, "document.body.dataset.explained || "
                             "(document.getElementById('status').className === 'error' && "
                             "'error: ' + document.getElementById('status').textContent)"
                    ) == CLASSES[1]
    heat = rgba(browser, "why-map", height, width)
    np.testing.assert_array_equal(heat[..., 3], expected)
    assert (heat[..., 0][expected >= 16] == 255).all() and not heat[..., 1:3].any()
    assert browser.find_element("id", "overlay-caption").text.startswith(f"why {CLASSES[1]}")
    set_opacity(browser, 1.0)
    overlay = rgba(browser, "overlay", height, width)[..., :3]
    assert (overlay[expected == 255] == (255, 0, 0)).all()     # full strength: pure red
    browser.execute_script("document.getElementById('why').click()")   # off: the mask again
    np.testing.assert_array_equal(rgba(browser, "overlay", height, width)[..., :3],
                                  np.asarray(PALETTE, np.uint8)[decode(answer["mask_png"])])
    set_opacity(browser, 0.5)


def test_the_pages_request_is_in_parquet(endpoint, segmented):
    """Last page test: stops the endpoint, whose replica then writes its rows."""
    from pipelines.serve.control import stop_endpoint
    from pipelines.storage import read_table

    stop_endpoint()
    endpoint["running"] = False
    rows = {r["request_id"]: r for r in read_table(endpoint["out"]).to_pylist()}
    assert segmented in rows
    assert rows[segmented]["source_uri"] == f"upload:{SCENE}"   # the file part's own name


def test_page_defaults_to_the_overlays_palette():
    html = page_html(None)
    assert json.dumps([list(c) for c in DEFAULT_PALETTE]) in html
    assert "/*PALETTE*/" not in html


def test_multilabel_pixels_take_the_mean_colour_of_their_classes(browser, tmp_path):
    """The page's own mask painter on the JSON body the endpoint builds for a multi-label
    prediction (per-class PNGs): each pixel the mean colour of its classes, black for none."""
    from pipelines.serve.http import segment_body
    from seg_core.config import MaskSpec
    from seg_core.inference import Prediction, encode_prediction

    rng = np.random.default_rng(0)
    planes = (rng.random((3, 24, 20)) < 0.4).astype(np.uint8)            # K x H x W, overlapping
    probs = np.where(planes == 1, 0.9, 0.1).astype(np.float32)
    prediction = Prediction(probs=probs, mask=planes, confidence=probs.max(axis=0),
                            entropy=np.zeros((24, 20), np.float32))
    spec = MaskSpec(num_classes=3, class_names=("x", "y", "z"), multilabel=True)
    body = segment_body(encode_prediction(prediction, spec), request_id="r", model={"name": "m",
                        "version": "1"}, class_names=spec.names, multilabel=True, height=24,
                        width=20, timing_ms={"total": 1.0})
    page = tmp_path / "page.html"
    page.write_text(page_html(None))
    browser.get(page.as_uri())
    browser.execute_async_script("paintMask(arguments[0]).then(arguments[1])", body)
    palette = np.asarray(DEFAULT_PALETTE[:3], np.int64)
    count = np.maximum(planes.sum(axis=0), 1)[..., None]
    expected = (np.einsum("khw,kc->hwc", planes.astype(np.int64), palette) // count)
    np.testing.assert_array_equal(rgba(browser, "mask", 24, 20)[..., :3], expected)
    assert (planes.sum(axis=0) >= 2).any() and (planes.sum(axis=0) == 0).any()   # both cases


# ------------------------------------------------------------------------- report.html
def write_predictions(out: Path, masks: dict[str, np.ndarray], model_uri: str) -> str:
    """A prediction output made by hand (one committed file and the model record)."""
    from pipelines.predict import store
    from pipelines import predictions
    from pipelines.records import PREDICTION_SCHEMA
    from seg_core.codecs import encode_png
    from seg_core.config import MaskSpec, to_dict

    now = dt.datetime.now(dt.timezone.utc)
    table = pa.Table.from_pylist([{
        "id": image_id, "source_uri": None, "source_sha256": "", "model_name": "hand",
        "model_version": "h1", "height": mask.shape[0], "width": mask.shape[1],
        "mask_png": encode_png(mask), "class_mask_pngs": [],
        "class_pixel_counts": [int((mask == k).sum()) for k in range(3)],
        "mean_confidence": 1.0, "confidence_png": None, "request_id": None, "latency_ms": None,
        "created_at": now} for image_id, mask in masks.items()], schema=PREDICTION_SCHEMA)
    predictions.write_table(table, str(out / "part-hand.parquet"))
    store.claim_output(str(out), {"uri": model_uri, "name": "hand", "version": "h1",
                                  "mask_spec": to_dict(MaskSpec(num_classes=3)), "tta": False,
                                  "confidence_maps": False})
    return str(out)


@pytest.fixture(scope="module")
def evaluated(ray_session, sample_dataset, tmp_path_factory) -> dict:
    """``run_evaluate`` over the sample val split with shifted truth masks as predictions, for a
    "model" whose directory holds a learning curve; ``report.html`` then copied alone."""
    import csv

    from pipelines.evaluate.evaluate import EvaluateConfig, run_evaluate
    from seg_core.codecs import decode_mask
    from seg_core.config import MaskSpec

    root = tmp_path_factory.mktemp("report")
    masks = {}
    with open(sample_dataset, newline="") as handle:
        val = [r for r in csv.DictReader(handle) if r["split"] == "val"]
    for shift, row in enumerate(val):   # a different error per image: distinct best and worst
        truth = decode_mask((sample_dataset.parent / row["mask"]).read_bytes(), MaskSpec(3))
        masks[row["image"]] = np.roll(truth, shift * 2, axis=1).astype(np.uint8)
    model = root / "model"
    model.mkdir()
    Image.fromarray(np.full((60, 200, 3), 200, np.uint8)).save(model / "learning_curve.png")
    preds = write_predictions(root / "preds", masks, str(model))
    report = run_evaluate(EvaluateConfig(manifest=str(sample_dataset), predictions=preds,
                                         out=str(root / "eval"), bootstrap=20, overlays=2,
                                         progress=False), log=lambda _: None)
    alone = root / "copied"
    alone.mkdir()
    shutil.copy(root / "eval" / "report.html", alone / "report.html")
    return {"report": report, "html": alone / "report.html"}


def test_report_html_shows_tables_and_images_when_copied_alone(browser, evaluated):
    report = evaluated["report"]
    browser.get(evaluated["html"].as_uri())
    tables = browser.execute_script(
        "const rows = (id) => [...document.querySelectorAll(`#${id} tbody tr`)].map("
        "  r => [...r.children].map(c => c.textContent));"
        "const box = (id) => document.getElementById(id).getBoundingClientRect();"
        "return {metrics: rows('metrics'), perClass: rows('per-class'), confusion: "
        "rows('confusion'), visible: ['metrics', 'per-class', 'confusion'].every("
        "  id => box(id).width > 0 && box(id).height > 0)};")
    assert tables["visible"]
    assert [r[0] for r in tables["metrics"]] == ["micro", "macro", "per_image"]
    assert tables["metrics"][1][1].startswith(f"{report['metrics']['macro']['iou']:.4f} [")
    assert [r[0] for r in tables["perClass"]] == report["class_names"]
    assert [[int(v) for v in r[1:]] for r in tables["confusion"]] == report["confusion_matrix"]
    images = browser.execute_script(
        "return [...document.images].map(i => ({id: i.id, alt: i.alt, complete: i.complete,"
        "natural: i.naturalWidth, width: i.getBoundingClientRect().width,"
        "height: i.getBoundingClientRect().height, src: i.src.slice(0, 22)}))")
    assert len(images) == 1 + 2 + 2 + 1    # chart, 2 best, 2 worst, learning curve
    assert {"per-class-chart", "learning-curve"} <= {i["id"] for i in images}
    for image in images:
        assert image["complete"] and image["natural"] > 0, image
        assert image["width"] > 0 and image["height"] > 0, image
        assert image["src"].startswith("data:image/"), image   # embedded: works copied alone
    shades = browser.execute_script(
        "return [...document.querySelectorAll('#confusion tbody tr')].map(r => "
        "[...r.querySelectorAll('td')].map(c => getComputedStyle(c).backgroundColor))")
    alpha = [[float(re.findall(r"[\d.]+", s)[3]) if s.startswith("rgba") else 1.0 for s in row]
             for row in shades]
    for k, row in enumerate(report["confusion_matrix"]):   # the heat follows the counts
        assert np.argmax(alpha[k]) == int(np.argmax(row))


def test_report_without_a_known_model_says_why_there_is_no_curve(evaluated):
    report = {**evaluated["report"], "model": {"name": "hand", "version": "h1"}}
    html = render_html(report, {}, None, "the record names no artifact")
    assert 'id="learning-curve-note"' in html and "the record names no artifact" in html
    assert 'id="learning-curve"' not in html and html.count("<img") == 1   # the chart alone
