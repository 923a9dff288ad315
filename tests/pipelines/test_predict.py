"""``rayseg predict`` on a real local Ray and moto S3: counts, schema, parity, crash + resume."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from pipelines.predict import store
from pipelines import predictions
from pipelines.model import open_model
from pipelines.predict.predict import PredictConfig, run_predict
from pipelines.records import PREDICTION_SCHEMA, QUARANTINE_SCHEMA
from pipelines.storage import copy_dir_from_local, list_uri, read_bytes, write_bytes
from seg_core.artifact import load_artifact, save_artifact
from seg_core.codecs import decode_image
from seg_core.config import MaskSpec, ModelConfig, Preprocessing
from seg_core.inference import Segmenter
from seg_core.model import UNet
from tests.hostile_files import write_bad_files
from tests.ray_util import every_cpu_held, settled_free_cpus, wait_for_line

# Planted bad inputs and the quarantine reason each must get.
BAD = {"corrupt": "corrupt", "truncated": "truncated", "empty": "empty_file",
       "text": "not_an_image", "bomb": "too_many_pixels"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_artifact(path: Path, *, seed: int = 0) -> Path:
    """A tiny untrained U-Net artifact; 64-px tiles so the 96-px samples are really tiled."""
    import torch

    torch.manual_seed(seed)
    model = UNet(ModelConfig(in_channels=3, num_classes=3, depth=2, base_width=4))
    return save_artifact(path, model, name="tiny", version="t1",
                         mask_spec=MaskSpec(num_classes=3, class_names=("bg", "a", "b")),
                         preprocessing=Preprocessing(tile_size=64, tile_overlap=0.25),
                         metrics={})


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def s3_case(sample_dataset, s3_bucket, artifact_dir, tmp_path_factory) -> dict:
    """Sample images plus planted bad files and a missing file, behind one manifest on S3."""
    root = f"s3://{s3_bucket}/predict-case"
    bad_dir = tmp_path_factory.mktemp("bad")
    bad = write_bad_files(bad_dir)
    copy_dir_from_local(sample_dataset.parent, f"{root}/sample")
    copy_dir_from_local(bad_dir, f"{root}/bad")
    model_uri = copy_dir_from_local(artifact_dir, f"{root}/model")
    with open(sample_dataset, newline="") as handle:
        rows = [{"image": f"sample/{r['image']}", "mask": f"sample/{r['mask']}"}
                for r in csv.DictReader(handle)]
    rows += [{"image": f"bad/{bad[name].name}", "mask": ""} for name in ("image", *BAD)]
    rows.append({"image": "bad/does_not_exist.png", "mask": ""})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["image", "mask"])
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(f"{root}/manifest.csv", text.getvalue().encode())
    return {"manifest": f"{root}/manifest.csv", "model": model_uri, "root": root,
            "n_good": 25, "n_bad": len(BAD) + 1}


@pytest.fixture(scope="module")
def s3_run(ray_session, s3_case) -> dict:
    """One predict run over the S3 case (TTA and confidence maps on, COCO RLE files too)."""
    out = f"{s3_case['root']}/out"
    cfg = PredictConfig(model=s3_case["model"], input=s3_case["manifest"], out=out, tta=True,
                        confidence_maps=True, batch_size=4, rows_per_file=8, progress=False,
                        format="coco-rle")
    summary = run_predict(cfg, log=lambda _: None)
    return {"summary": summary, "out": out, "cfg": cfg,
            "predictions": predictions.scan(out), "quarantine": predictions.read_quarantine(out)}


def test_counts_schema_and_quarantine_reasons(s3_run, s3_case):
    preds, bad, summary = s3_run["predictions"], s3_run["quarantine"], s3_run["summary"]
    assert preds.schema.equals(PREDICTION_SCHEMA)
    assert bad.schema.equals(QUARANTINE_SCHEMA)
    assert (preds.num_rows, bad.num_rows) == (s3_case["n_good"], s3_case["n_bad"])
    assert summary["inputs"] == preds.num_rows + bad.num_rows == summary["committed_rows"]
    assert (summary["predicted"], summary["quarantined"]) == (preds.num_rows, bad.num_rows)
    assert (summary["duplicates"], summary["missing"], summary["skipped"]) == (0, 0, 0)
    reasons = {row["id"]: row["reason"] for row in bad.to_pylist()}   # ids: paths in the manifest
    assert reasons == {**{f"bad/{name}.png": reason for name, reason in BAD.items()},
                       "bad/does_not_exist.png": "missing_image"}
    assert set(bad.column("stage").to_pylist()) == {"predict"}
    assert all(hint for hint in bad.column("hint").to_pylist())


def test_rows_carry_provenance(s3_run):
    rows = s3_run["predictions"].to_pylist()
    for row in rows:
        data = read_bytes(row["source_uri"])
        image = decode_image(data)
        assert row["source_sha256"] == hashlib.sha256(data).hexdigest()
        assert (row["model_name"], row["model_version"]) == ("tiny", "t1")
        assert (row["height"], row["width"]) == image.shape[:2]
        assert sum(row["class_pixel_counts"]) == row["height"] * row["width"]
        assert len(row["class_mask_pngs"]) == 3
        confidence = np.asarray(Image.open(io.BytesIO(row["confidence_png"])))
        assert confidence.shape == image.shape[:2]
        assert abs(confidence.mean() / 255 - row["mean_confidence"]) < 0.01
        assert row["created_at"] is not None and row["request_id"] is None
    model = store.read_model_record(s3_run["out"])
    assert (model["name"], model["version"], model["tta"]) == ("tiny", "t1", True)
    # the engine that ran, resolved on the actors as on the driver: never the setting 'auto'
    assert model["engine_setting"] == "auto" and model["engine"] == "openvino"
    assert model["device"] == "cpu" and model["max_pixels"] > 0
    reproducibility = json.loads(read_bytes(s3_run["out"] + "/_reproducibility.json"))
    assert reproducibility["settings"]["engine"] == "openvino"


def test_parity_with_segmenter(s3_run, artifact_dir):
    """Each Parquet mask is exactly what seg_core predicts directly with the same (default)
    engine, and the loaded model's predict_one agrees."""
    segmenter = Segmenter(load_artifact(artifact_dir), tta=True, engine="auto")
    loaded = open_model(str(artifact_dir), tta=True, engine="auto")
    assert loaded.engine == segmenter.engine == "openvino"
    for row in s3_run["predictions"].to_pylist():
        data = read_bytes(row["source_uri"])
        expected = segmenter.predict(decode_image(data)).mask
        stored = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
        np.testing.assert_array_equal(stored, expected, err_msg=row["id"])
        for k, png in enumerate(row["class_mask_pngs"]):
            plane = np.asarray(Image.open(io.BytesIO(png)))
            np.testing.assert_array_equal(plane == 255, expected == k)
        again = loaded.predict_one(data, id=row["id"], source_uri=row["source_uri"],
                                   with_confidence=True)
        assert again["mask_png"] == row["mask_png"]
        assert again["confidence_png"] == row["confidence_png"]
        assert again["class_pixel_counts"] == row["class_pixel_counts"]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
def test_coco_rle_files_are_written_after_the_run(s3_run):
    """--format coco-rle: the committed store, exported under <out>/coco/ in S3: one results
    file per part, every predicted image listed, and each RLE decodes to the stored mask."""
    from pycocotools import mask as rle

    from pipelines.predict.coco import DATASET_FILE, image_id
    from pipelines.records import decode_prediction

    out, rows = s3_run["out"], s3_run["predictions"].to_pylist()
    coco_out = f"{out}/coco"
    parts = {f.rsplit("/", 1)[-1].removesuffix(".parquet")
             for f in predictions.prediction_files(out)}
    written = {f.rsplit("/", 1)[-1] for f in list_uri(coco_out)}
    assert written == {DATASET_FILE, *(f"{part}.json" for part in parts)}
    summary = s3_run["summary"]["coco"]
    assert (summary["out"], summary["files"], summary["images"]) == (coco_out, len(parts),
                                                                     len(rows))
    dataset = json.loads(read_bytes(f"{coco_out}/{DATASET_FILE}"))
    assert {i["rayseg_id"]: i["id"] for i in dataset["images"]} == {
        r["id"]: image_id(r["id"]) for r in rows}
    assert [c["name"] for c in dataset["categories"]] == ["bg", "a", "b"]
    results = [a for part in parts for a in json.loads(read_bytes(f"{coco_out}/{part}.json"))]
    assert len(results) == summary["annotations"]
    spec = MaskSpec(num_classes=3)
    for row in rows:
        mine = [a for a in results if a["image_id"] == image_id(row["id"])]
        rebuilt = np.zeros((row["height"], row["width"]), np.uint8)
        for result in mine:
            rebuilt[rle.decode(result["segmentation"]) == 1] = result["category_id"] - 1
        assert np.array_equal(rebuilt, decode_prediction(row, spec)), row["id"]
        assert len(mine) == sum(1 for n in row["class_pixel_counts"] if n)


def test_rerun_after_success_skips_everything(s3_run, capsys):
    summary = run_predict(s3_run["cfg"])
    assert summary["skipped"] == summary["inputs"] == 31
    assert (summary["predicted"], summary["quarantined"], summary["duplicates"]) == (0, 0, 0)
    assert "skipped 31 of 31 inputs" in capsys.readouterr().out


def test_other_model_in_same_output_is_refused(s3_run):
    from dataclasses import replace

    with pytest.raises(ValueError, match="different setup"):
        run_predict(replace(s3_run["cfg"], tta=False), log=lambda _: None)


def test_a_second_run_on_the_same_output_is_refused(s3_run):
    before = store.done_ids(s3_run["cfg"].out)
    with store.lease(s3_run["cfg"].out) as holder:       # another run, still writing
        with pytest.raises(store.LeaseHeld, match=f"run {holder['run']}"):
            run_predict(s3_run["cfg"], log=lambda _: None)
    assert store.done_ids(s3_run["cfg"].out).equals(before)   # nothing written, no _SUCCESS race


def test_crash_midway_then_resume_is_exactly_once(ray_session, sample_dataset, artifact_dir,
                                                  tmp_path, capsys, fault_env):
    """An injected failure after 2 committed files, then the same command again."""
    import ray

    out = str(tmp_path / "out")
    cfg = PredictConfig(model=str(artifact_dir), input=str(sample_dataset), out=out,
                        batch_size=2, rows_per_file=4, actors=1, cpus_per_actor=0.5,
                        progress=False)
    free_before = settled_free_cpus()
    with fault_env(fail_after_files=2), pytest.raises(Exception, match="injected failure") as err:
        run_predict(cfg)
    # the failed run's predictor is gone even while the error is kept (a notebook keeps the
    # last one): the next job gets back every CPU the run took (it waited for them forever
    # before).  Measured against the CPUs free before the run, so that what an earlier test
    # of the session may still hold is not blamed on this run.
    assert "injected failure" in str(err.value)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < free_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) >= free_before, (
        f"a failed run kept its actors: {ray.available_resources().get('CPU', 0)} CPUs free "
        f"after it, {free_before} before")
    before = store.done_ids(out)
    assert 0 < len(before) < 24, "the failure must leave a partial output"
    assert not (Path(out) / store.SUCCESS_FILE).exists()
    capsys.readouterr()

    summary = run_predict(cfg)
    assert f"skipped {len(before)} of 24 inputs" in capsys.readouterr().out
    after = store.done_ids(out).to_pylist()
    assert len(after) == len(set(after)) == 24, "no duplicate ids, no missing ids"
    assert summary["skipped"] == len(before)
    assert summary["predicted"] == 24 - len(before)
    assert pc.all(pc.is_in(before, value_set=store.done_ids(out))).as_py()
    assert not [p for p in Path(out).rglob(".*")], "no staging leftovers"


def test_a_run_whose_cpus_are_held_says_what_it_waits_for_then_runs(ray_session, sample_dataset,
                                                                     artifact_dir, tmp_path):
    """Beside work that holds every CPU (a Serve app, another job's actors), a run used to sit
    without a word until they were freed (Ray Data warns once, after a minute)."""
    import threading

    lines: list[str] = []
    summary: dict = {}
    cfg = PredictConfig(model=str(artifact_dir), input=str(sample_dataset),
                        out=str(tmp_path / "out"), batch_size=4, actors=1, cpus_per_actor=0.5,
                        progress=False)
    run = threading.Thread(target=lambda: summary.update(run_predict(cfg, log=lines.append)))
    try:
        with every_cpu_held():
            run.start()
            waiting = wait_for_line(lines, "waiting for")
            assert len(waiting) == 1 and waiting[0].startswith(
                "predict: waiting for 0.75 CPU (0 of ")
    finally:   # the run goes on once the CPUs are back
        run.join(timeout=300)
    assert summary["predicted"] + summary["quarantined"] == 24 and not summary["missing"]


def test_an_id_that_now_names_another_image_is_reported_not_skipped(
        ray_session, sample_dataset, artifact_dir, tmp_path):
    import shutil

    rows = list(csv.DictReader(sample_dataset.open()))[:3]
    names = []
    for row in rows:   # private copies: one is rewritten below
        shutil.copy(sample_dataset.parent / row["image"], tmp_path / Path(row["image"]).name)
        names.append(Path(row["image"]).name)
    manifest = tmp_path / "m.csv"

    def write(images: list[str]) -> None:
        manifest.write_text("id,image,mask\n" + "".join(f"r{i},{im},\n"
                                                        for i, im in enumerate(images)))

    write(names)
    cfg = PredictConfig(model=str(artifact_dir), input=str(manifest), out=str(tmp_path / "out"),
                        actors=1, cpus_per_actor=0.5, progress=False)
    assert run_predict(cfg, log=lambda _: None)["predicted"] == 3
    write([names[0], names[2], names[1]])                      # r1 and r2 swapped images
    summary = run_predict(cfg, log=lambda _: None)
    assert summary["predicted"] == 0 and summary["duplicates"] == 0
    assert sorted(c.split(":")[0] for c in summary["conflicts"]) == ["r1", "r2"]
    assert names[1] in " ".join(summary["conflicts"])
    write(names)
    (tmp_path / names[0]).write_bytes((tmp_path / names[2]).read_bytes())   # r0 changed
    assert run_predict(cfg, log=lambda _: None)["conflicts"] == []          # paths only
    changed = run_predict(replace(cfg, verify_done=True), log=lambda _: None)["conflicts"]
    assert changed == ["r0: its bytes changed since they were predicted"]


@pytest.mark.parametrize("resources, actors, expected", [
    ({"CPU": 16.0, "GPU": 2.0}, None, (2, 1.0, 1.0, 1)),     # one actor per GPU
    ({"CPU": 2.0}, None, (2, 0.75, 0.0, 1)),                 # one per CPU, half a CPU left over
    ({"CPU": 16.0}, None, (16, 0.96875, 0.0, 1)),
    ({"CPU": 2.0}, 1, (1, 1.5, 0.0, 2)),                     # one actor gets the threads
])
def test_plan_actors(resources, actors, expected):
    from pipelines.predict.predict import plan_actors

    cfg = PredictConfig(model="m", input="i", out="o", actors=actors)
    plan = plan_actors(cfg, resources)
    assert (plan.size, plan.num_cpus, plan.num_gpus, plan.threads) == expected


@pytest.mark.parametrize("actors, blocks", [(1, 4), (2, 8), (8, 24)])
def test_inputs_are_cut_so_that_every_actor_gets_blocks(ray_session, sample_dataset, actors,
                                                        blocks):
    """An actor takes whole blocks: 24 rows in one block of 32 would keep one actor busy and
    leave the others idle.  At least 4 blocks per actor (one row each at most), 32 rows at most."""
    import pyarrow as pa

    from pipelines.predict.inputs import plan_inputs

    plan = plan_inputs(str(sample_dataset), pa.array([], pa.string()), actors=actors)
    assert plan.todo == 24
    assert plan.dataset.materialize().num_blocks() == blocks


def test_from_shards_one_output_file_per_input_shard_by_default(ray_session, sample_dataset,
                                                                artifact_dir, tmp_path):
    """Without rows_per_file, a shard input commits about one file per input shard (not one per
    256 rows: a million tiny rows would be thousands of small files and PUTs)."""
    import pyarrow.parquet as pq

    from pipelines.pack import pack

    pair_bytes = sum(p.stat().st_size for p in (sample_dataset.parent / "images").iterdir()) / 24
    summary = pack(str(sample_dataset), str(tmp_path / "shards"),
                   shard_mb=7 * 2 * pair_bytes / 2**20)          # several rows per shard
    assert 2 <= summary.files < 24
    lines: list[str] = []
    result = run_predict(PredictConfig(model=str(artifact_dir), input=str(tmp_path / "shards"),
                                       out=str(tmp_path / "out"), progress=False),
                         log=lines.append)
    per_shard = -(-24 // summary.files)
    assert f"files of {per_shard} rows" in lines[0]
    files = predictions.prediction_files(str(tmp_path / "out"))
    rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert sum(rows) == result["committed_rows"] == 24 and result["duplicates"] == 0
    # about a shard's rows per file (one file of all 24 before); the last write may split off
    assert max(rows) <= 1.5 * per_shard and len(files) <= summary.files + 1
