"""The fault suite: every hostile input of issue 13, through the real paths.

One manifest on (moto) S3 mixes good pairs with each hostile case; ``rayseg validate`` and
``rayseg predict`` run on it as jobs, and the endpoint gets the hostile images over HTTP.  Each
case must end in its specific outcome (a quarantine row with its reason, or a 4xx with its
message), the jobs must keep ``rows in = rows out + quarantined`` without a retried task, and
the replica must survive every request (same process before and after).
"""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import tifffile

from pipelines import storage
from pipelines import predictions
from seg_core.codecs import encode_png
from tests.hostile_files import write_bad_files
from tests.pipelines.test_serve import make_artifact, post
from tests.pipelines.test_serve_durability import replica_pid
from tests.serve_util import endpoint_config, free_port

pytestmark = pytest.mark.slow

GOOD = 3


def tiff_channel_bomb() -> bytes:
    """A tiny TIFF declaring 64 uint16 samples per pixel (GBs once decoded at larger sides)."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((64, 64, 64), np.uint16), photometric="minisblack",
                     planarconfig="contig", compression="zlib")
    return buffer.getvalue()


def multi_page_tiff() -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((2, 32, 32), np.uint8), photometric="minisblack")
    return buffer.getvalue()


def thin_png(width: int) -> bytes:
    return encode_png(np.full((1, width, 3), 127, np.uint8))


# case -> (image file, expected quarantine reason in validate, in predict); None: not quarantined
CASES = {
    "escape": ("../outside/x.png", "path_refused", "path_refused"),
    "local_file": ("/etc/hostname", "path_refused", "path_refused"),
    "proc": ("/proc/self/environ", "path_refused", "path_refused"),
    "tiff_bomb": ("hostile/bomb64.tif", "bad_channels", "bad_channels"),
    "multi_page": ("hostile/pages.tif", "multi_page", "multi_page"),
    "corrupt": ("hostile/corrupt.png", "corrupt", "corrupt"),
    "empty": ("hostile/empty.png", "empty_file", "empty_file"),
    "text": ("hostile/text.png", "not_an_image", "not_an_image"),
    "missing": ("hostile/nope.png", "missing_image", "missing_image"),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, s3_bucket) -> dict:
    local = tmp_path_factory.mktemp("hostile")
    bad = write_bad_files(local / "hostile", size=(32, 32), num_classes=2)
    (local / "hostile" / "bomb64.tif").write_bytes(tiff_channel_bomb())
    (local / "hostile" / "pages.tif").write_bytes(multi_page_tiff())
    (local / "hostile" / "mask.png").write_bytes(encode_png(np.zeros((32, 32), np.uint8)))
    (local / "hostile" / "thin.png").write_bytes(thin_png(40_000))
    (local / "hostile" / "thin_mask.png").write_bytes(encode_png(np.zeros((1, 40_000), np.uint8)))
    rows = [{"id": f"good{i}", "image": bad["image"].relative_to(local).as_posix(),
             "mask": "hostile/mask.png"} for i in range(GOOD)]
    rows += [{"id": case, "image": image, "mask": "hostile/mask.png"}
             for case, (image, _, _) in CASES.items()]
    rows.append({"id": "thin", "image": "hostile/thin.png", "mask": "hostile/thin_mask.png"})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["id", "image", "mask"])
    writer.writeheader()
    writer.writerows(rows)
    root = storage.copy_dir_from_local(local, f"s3://{s3_bucket}/fault-suite/data")
    storage.write_bytes(f"{root}/manifest.csv", text.getvalue().encode())
    model = storage.copy_dir_from_local(make_artifact(local / "model"),
                                        f"s3://{s3_bucket}/fault-suite/model")
    return {"manifest": f"{root}/manifest.csv", "model": model, "rows": len(rows),
            "local": local, "bucket": s3_bucket}


def test_validate_quarantines_every_hostile_row_with_its_reason(ray_session, hostile):
    from pipelines.validate import validate
    from seg_core.config import MaskSpec

    out = f"s3://{hostile['bucket']}/fault-suite/validate"
    report = validate(hostile["manifest"], MaskSpec(2), out_uri=out, max_pixels=1_000_000)
    assert report.total == hostile["rows"] == report.ok + report.quarantined
    got = {r["id"]: r for r in storage.read_table(f"{out}/quarantine.parquet").to_pylist()}
    assert {k: r["reason"] for k, r in got.items()} == {k: v for k, (_, v, _) in CASES.items()}
    assert all(r["hint"] for r in got.values())
    assert "AWS_" not in json.dumps(list(got.values()), default=str)   # no file contents echoed


@pytest.fixture(scope="module")
def predicted(ray_session, hostile) -> tuple[dict, str]:
    """``rayseg predict`` over the hostile manifest: (summary, output URI)."""
    from pipelines.config import PredictConfig
    from pipelines.predict.predict import run_predict

    out = f"s3://{hostile['bucket']}/fault-suite/predict"
    cfg = PredictConfig(model=hostile["model"], input=hostile["manifest"], out=out,
                        actors=1, cpus_per_actor=0.5, batch_size=4, progress=False)
    return run_predict(cfg, log=lambda _: None), out


def test_predict_quarantines_hostile_rows_and_predicts_the_rest_once(hostile, predicted):
    summary, out = predicted
    bad = {r["id"]: r["reason"] for r in predictions.read_quarantine(out).to_pylist()}
    done = predictions.scan(out, ["id"])["id"].to_pylist()
    assert summary["inputs"] == hostile["rows"] == len(done) + len(bad)   # in = out + quarantined
    assert (summary["duplicates"], summary["missing"]) == (0, 0)
    assert {k: v for k, v in bad.items() if k in CASES} == {k: v for k, (_, _, v) in
                                                            CASES.items()}
    assert set(done) >= {f"good{i}" for i in range(GOOD)}
    # the thin image is predicted cheaply or refused as too large, never a crash or a retry
    assert "thin" in done or bad.get("thin") == "too_large"


def test_evaluate_reports_what_predict_quarantined_as_unscored_not_missing(hostile, predicted,
                                                                           tmp_path):
    from pipelines.config import EvaluateConfig
    from pipelines.evaluate.evaluate import run_evaluate

    _, out = predicted
    cfg = EvaluateConfig(manifest=hostile["manifest"], predictions=out, out=str(tmp_path),
                         split=None, bootstrap=0, overlays=0, progress=False)
    report = run_evaluate(cfg, log=lambda _: None)
    unscored = {u["id"]: u["reason"] for u in report["unscored"]}
    quarantined = {r["id"]: r["reason"] for r in predictions.read_quarantine(out).to_pylist()}
    assert unscored == quarantined and len(unscored) >= len(CASES)
    assert report["missing_predictions"] == []
    assert report["images_in_split"] == hostile["rows"] == report["images_scored"] + len(unscored)
    assert all(u["message"].startswith("quarantined by predict: ") for u in report["unscored"])


def test_the_endpoint_answers_4xx_to_hostile_images_and_its_replica_survives(
        ray_session, hostile, s3_bucket):
    from pipelines.serve.control import start_endpoint, stop_endpoint

    url = start_endpoint(str(hostile["local"] / "model"), f"s3://{s3_bucket}/fault-suite/serve",
                         config=endpoint_config(free_port()), args={"max_pixels": 1_000_000})
    try:
        pid = replica_pid()
        folder = hostile["local"] / "hostile"
        expected = {"bomb64.tif": (422, "bad_channels"), "pages.tif": (422, "multi_page"),
                    "corrupt.png": (422, "corrupt"), "empty.png": (422, "empty_file"),
                    "text.png": (415, "not_an_image")}
        for name, (status, reason) in expected.items():
            got, _, body = post(url, (folder / name).read_bytes())
            assert (got, json.loads(body)["error"]) == (status, reason), name
        got, _, body = post(url, thin_png(400_000))       # 0.4 Mpx: 7 GB before the budget
        assert got in (200, 413), body
        if got == 413:
            assert json.loads(body)["error"] == "too_large"
        good, _, _ = post(url, (folder / "image.png").read_bytes())
        assert good == 200 and replica_pid() == pid       # same process: nothing was killed
    finally:
        stop_endpoint()
