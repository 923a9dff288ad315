"""Operating models on moto S3 and a real local Ray: the MLflow registry, gated promotion, an
endpoint that follows the alias under load, provenance by hash, and drift monitoring.

One module-scoped training (v1) and a worse v2 (the same network, untrained, registered as an
artifact training did not register) feed every test; the endpoint test and the monitor test
reuse them, so the module trains once.
"""
from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines import registry, storage
from pipelines.config import DriftThresholds, load_train_config
from pipelines.operate.monitor import compare, ks_test, psi, row_features
from seg_core.config import MaskSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(manifest: str, root: str, name: str, version: str, *extra: str):
    from pipelines.train.train import train

    cfg = load_train_config("jobs/configs/train_sample.yaml", [
        f"name={name}", f"version={version}", f"data.manifest={manifest}",
        f"storage.storage_path={root}/ray_results", f"storage.models_uri={root}/models",
        "batch_size=4", "log_every_steps=0", "stopping_rounds=null", "model.depth=2",
        "model.base_width=8", "optim.lr=0.01", "preprocessing.tile_size=null", *extra])
    return train(cfg)


def _upload_dataset(tmp: Path, prefix: str, **kwargs) -> str:
    from seg_core.sample_data import generate_sample_dataset

    manifest = generate_sample_dataset(tmp, size=(64, 64), num_classes=3, formats=("png",),
                                       **kwargs)
    storage.copy_dir_from_local(Path(manifest).parent, prefix)
    return f"{prefix}/manifest.csv"


@pytest.fixture(scope="module")
def flow(ray_session, s3_bucket, tmp_path_factory) -> dict:
    """v1 (6 epochs) registered and promoted to @champion; v2 untrained."""
    from pipelines.operate.promote import promote

    root = f"s3://{s3_bucket}/registry-{uuid.uuid4().hex[:8]}"
    name = f"seg-{uuid.uuid4().hex[:6]}"
    # 48 pairs, half val: the drift baseline gets 24 images
    manifest = _upload_dataset(tmp_path_factory.mktemp("reg"), f"{root}/data", n=48, seed=3,
                               val_fraction=0.5)
    first = _train(manifest, root, name, "v1", "epochs=6")
    first_promotion = promote(first.registry_uri, alias="champion", gate="miou>=0.3",
                              manifest=manifest, out=str(tmp_path_factory.mktemp("promote1")),
                              log=lambda _: None)
    second = _untrained_version(first, root, name, tmp_path_factory.mktemp("v2"))
    return {"root": root, "name": name, "manifest": manifest, "first": first,
            "second": second, "first_promotion": first_promotion}


def _untrained_version(first, root: str, name: str, tmp: Path):
    """v2: the same network with its initial weights (a worse model by far), written next to v1
    and registered as the next version of ``name``, as an artifact training did not register."""
    from types import SimpleNamespace

    import torch

    from seg_core.artifact import load_artifact, save_artifact
    from seg_core.model import UNet

    trained = load_artifact(storage.copy_dir_to_local(first.artifact_uri, tmp / "v1"))
    torch.manual_seed(1)
    local = save_artifact(tmp / "v2", UNet(trained.model_config), name=name, version="v2",
                          mask_spec=trained.mask_spec, preprocessing=trained.preprocessing)
    uri = storage.copy_dir_from_local(local, f"{root}/models/{name}/v2")
    ref = registry.register_artifact(uri, name)
    return SimpleNamespace(registry_uri=ref.uri, artifact_uri=uri)


def test_training_registers_versions_with_hashes_and_tracks_the_run(flow):
    from mlflow import MlflowClient

    first, second, name = flow["first"], flow["second"], flow["name"]
    assert (first.registry_uri, second.registry_uri) == (f"models:/{name}/1", f"models:/{name}/2")
    meta = json.loads(storage.read_bytes(f"{first.artifact_uri}/artifact.json"))
    ref = registry.resolve(first.registry_uri)
    assert ref.source == first.artifact_uri
    assert ref.weights_sha256 == meta["weights_sha256"]
    # content hash of the training rows: 24 train pairs, recomputed here from the raw files
    record = meta["reproducibility"]
    assert record["data_rows"] == 24
    assert record["data_sha256"] == _data_hash(flow["manifest"], "train")
    run = MlflowClient(registry.tracking_uri()).get_run(first.run_id)
    assert run.data.tags["weights_sha256"] == meta["weights_sha256"]
    assert float(run.data.params["optim.lr"]) == 0.01
    history = MlflowClient(registry.tracking_uri()).get_metric_history(first.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 7))
    baseline = json.loads(storage.read_bytes(f"{first.artifact_uri}/baseline.json"))
    assert baseline["images"] == 24 and len(baseline["area"]) == 3


def _data_hash(manifest: str, split: str) -> str:
    """The training rows' content hash, computed from the manifest's files without rayseg."""
    import csv
    import hashlib
    import io

    base = manifest.rsplit("/", 1)[0]
    rows = []
    for row in csv.DictReader(io.StringIO(storage.read_bytes(manifest).decode())):
        if row["split"] != split:
            continue
        image, mask = (storage.read_bytes(f"{base}/{row[k]}") for k in ("image", "mask"))
        inner = hashlib.sha256(hashlib.sha256(image).digest() + hashlib.sha256(mask).digest())
        rows.append(f"{row['image']}\t{inner.hexdigest()}")   # id: path in the manifest
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()


def test_gate_promotes_then_keeps_a_worse_model_out(flow, tmp_path):
    from pipelines.operate.promote import promote

    name = flow["name"]
    assert flow["first_promotion"].promoted
    assert registry.alias_holder(name, "champion").version == "1"
    # v2 passes a lax gate but is worse than the holder: the alias stays, the report says why
    kept = promote(flow["second"].registry_uri, alias="champion", gate="miou>=0.0",
                   manifest=flow["manifest"], out=str(tmp_path / "p2"), log=lambda _: None)
    assert not kept.promoted
    assert registry.alias_holder(name, "champion").version == "1"
    assert kept.holder_metrics["miou"] > kept.candidate_metrics["miou"]
    report = (tmp_path / "p2" / "comparison.md").read_text()
    assert "not promoted" in report and "worse" in report
    # a gate it fails keeps it out on its own: of @champion, and of an alias nobody holds yet
    for alias in ("champion", "staging"):
        failed = promote(flow["second"].registry_uri, alias=alias, gate="miou>=0.99",
                         manifest=flow["manifest"], out=str(tmp_path / f"p-{alias}"),
                         log=lambda _: None)
        assert not failed.promoted and any("fails" in r for r in failed.reasons)
    assert registry.alias_holder(name, "champion").version == "1"
    assert registry.alias_holder(name, "staging") is None


def test_predict_from_the_alias_writes_the_weight_hash_and_a_record(flow, tmp_path):
    from pipelines.config import PredictConfig
    from pipelines import predictions
    from pipelines.predict.predict import run_predict

    out = f"{flow['root']}/preds-champion"
    run_predict(PredictConfig(model=f"models:/{flow['name']}@champion", input=flow["manifest"],
                              out=out, split="val", progress=False), log=lambda _: None)
    sha = json.loads(storage.read_bytes(
        f"{flow['first'].artifact_uri}/artifact.json"))["weights_sha256"]
    table = predictions.scan(out, ["weights_sha256"])
    assert table.num_rows == 24
    assert set(table["weights_sha256"].to_pylist()) == {sha}
    record = json.loads(storage.read_bytes(f"{out}/_reproducibility.json"))
    assert record["model"]["registry_uri"] == f"models:/{flow['name']}/1"
    assert record["model"]["weights_sha256"] == sha
    assert record["model"]["training_data_sha256"]
    # the same output refuses rows of other weights, whatever their name and version say
    with pytest.raises(ValueError, match="different setup"):
        run_predict(PredictConfig(model=flow["second"].registry_uri, input=flow["manifest"],
                                  out=out, split="val", progress=False), log=lambda _: None)


def test_a_version_overwritten_in_place_is_refused(flow, tmp_path):
    copy_root = f"{flow['root']}/models-copy"
    storage.copy_dir_from_local(storage.copy_dir_to_local(
        flow["second"].artifact_uri, tmp_path / "copy"), copy_root)
    original = registry.resolve(flow["second"].registry_uri)
    ref = registry.register(copy_root, f"{flow['name']}-copy",
                            weights_sha256=original.weights_sha256)
    assert registry.resolve(ref.uri).source == copy_root
    meta_uri = f"{copy_root}/artifact.json"
    meta = json.loads(storage.read_bytes(meta_uri))
    meta["weights_sha256"] = "0" * 64   # what a retrain into the same directory leaves
    storage.write_bytes(meta_uri, json.dumps(meta).encode())
    with pytest.raises(registry.RegistryError, match="retrained in place"):
        registry.resolve(ref.uri)


# --------------------------------------------------------------------------- serve follows


def test_the_endpoint_follows_a_promotion_under_load_without_errors(flow, tmp_path):
    from pipelines.operate.promote import promote
    from pipelines.serve.control import start_endpoint, stop_endpoint
    from tests.serve_util import endpoint_config, free_port

    out = f"{flow['root']}/serve-log"
    url = start_endpoint(f"models:/{flow['name']}@champion", out,
                         config=endpoint_config(free_port()),
                         args={"flush_rows": 10_000, "flush_interval_s": 3600,
                               "max_unflushed_age_s": 7200})
    image = storage.read_bytes(f"{flow['manifest'].rsplit('/', 1)[0]}/images/sample_0000.png")
    statuses: dict[int, int] = {}
    refs: list[str] = []
    promoted = threading.Event()
    after = [0]

    def load() -> None:   # bounded: stops 40 answers after the promotion, or at 600
        import urllib.error
        import urllib.request

        for _ in range(600):
            request = urllib.request.Request(f"{url}/v1/segment", data=image, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, ref = response.status, response.headers["X-Model-Ref"]
            except urllib.error.HTTPError as error:
                status, ref = error.code, None
            statuses[status] = statuses.get(status, 0) + 1
            refs.append(ref)
            if promoted.is_set():
                after[0] += 1
                if after[0] >= 40:
                    return

    try:
        worker = threading.Thread(target=load)
        worker.start()
        decision = promote(flow["second"].registry_uri, alias="champion", gate="miou>=0.0",
                           tolerance=1.0, manifest=flow["manifest"], out=str(tmp_path / "p"),
                           serve_app="rayseg", log=lambda _: None)
        promoted.set()
        worker.join(timeout=300)
        assert decision.promoted
    finally:
        stop_endpoint()
    name = flow["name"]
    print(f"promotion under load: statuses {statuses}, answers by model "
          f"{ {r: refs.count(r) for r in set(refs)} }")
    assert set(statuses) == {200}, statuses
    assert refs[0] == f"models:/{name}/1" and refs[-1] == f"models:/{name}/2"
    rows = pa.concat_tables([storage.read_table(f) for f in storage.list_uri(
        out, suffixes=(".parquet",))])
    assert rows.num_rows == sum(statuses.values())
    hashes = {registry.resolve(f"models:/{name}/{v}").weights_sha256 for v in (1, 2)}
    assert set(rows["weights_sha256"].to_pylist()) == hashes


# ------------------------------------------------------------------------------- monitoring


def test_drift_statistics_against_independent_values():
    # KS D by hand: samples {0,1,2} vs {1.5,2.5,3.5}: the CDFs differ most at 1 (2/3 vs 0)
    d, p = ks_test([0, 1, 2], [1.5, 2.5, 3.5])
    assert d == pytest.approx(2 / 3)
    assert 0 < p < 1
    assert ks_test([1, 2, 3], [1, 2, 3])[0] == 0
    same = np.random.default_rng(0).uniform(size=200)
    assert psi(same, same) == pytest.approx(0, abs=1e-9)
    assert psi(same, same + 0.5) > 1
    spec = MaskSpec(num_classes=2)
    rows = [{"class_pixel_counts": [100, 0], "height": 10, "width": 10, "mean_confidence": 0.9}]
    features = row_features(rows, spec)
    assert features == {"area": [[1.0], [0.0]], "empty": [True], "confidence": [0.9]}
    result = compare({"class_names": ["bg", "fg"], "images": 1, **features}, features,
                     DriftThresholds())
    assert not result["judged"] and not result["drift"]   # one row: reported, not flagged


def test_monitor_flags_the_shifted_classes_and_passes_an_unshifted_set(flow, tmp_path):
    from pipelines.config import PredictConfig
    from pipelines.operate.monitor import run_monitor
    from pipelines.predict.predict import run_predict

    results = {}
    for label, kwargs in (("same", {"seed": 21}), ("shifted", {"seed": 22,
                                                               "shape_probs": (1.0, 0.0)})):
        manifest = _upload_dataset(tmp_path / label, f"{flow['root']}/live-{label}", n=30,
                                   val_fraction=0.0, **kwargs)
        out = f"{flow['root']}/live-{label}-preds"
        run_predict(PredictConfig(model=flow["first"].registry_uri, input=manifest, out=out,
                                  progress=False), log=lambda _: None)
        results[label] = run_monitor(out, flow["first"].registry_uri, str(tmp_path / label),
                                     log=print)
    same, shifted = results["same"], results["shifted"]
    print(json.dumps({k: {"flags": v["flags"], "classes": v["classes"]}
                      for k, v in results.items()}, indent=1))
    assert same["judged"] and not same["drift"], same["flags"]
    # only discs were drawn: rectangles vanish and discs cover more of each image
    flagged = {c["name"] for c in shifted["classes"] if c["shifted"]}
    assert {"disc", "rectangle"} <= flagged, shifted["flags"]
    assert shifted["drift"]
    assert (tmp_path / "shifted" / "report.md").read_text().count("**yes**") >= 1
    assert (tmp_path / "shifted" / "drift.png").stat().st_size > 0


@pytest.mark.slow
def test_processes_opening_a_new_sqlite_store_at_once_all_get_it(tmp_path):
    """Two Tune trials registering at once on a fresh store raced MLflow's table creation
    (alembic: "Online migration expected to match one row"); each process now creates or
    upgrades the tables under a lock beside the database."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path}/fresh.db"
    code = ("import sys; from pipelines import registry; "
            "c = registry._client_for(sys.argv[1]); "
            "c.create_registered_model(sys.argv[2]); print('ok')")
    runs = [subprocess.Popen([sys.executable, "-c", code, uri, f"model-{i}"],
                             cwd=Path(__file__).resolve().parents[2], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(4)]
    outcomes = [run.communicate(timeout=180) for run in runs]
    for run, (out, err) in zip(runs, outcomes):
        assert run.returncode == 0 and out.strip() == "ok", err[-2000:]
    names = {m.name for m in registry._client_for(uri).search_registered_models()}
    assert names == {f"model-{i}" for i in range(4)}
