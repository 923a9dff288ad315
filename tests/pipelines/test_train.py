"""Training on real local Ray (session cluster) and moto S3: data-parallel run, fault recovery,
resume with the scheduled learning rate; plus Ray-free checks of config and plans.  k-fold CV
runs once in the suite, through the estimator (tests/pipelines/test_api.py).

Tiny data (32x32 or the 96x96 sample set) and a depth-2, width-4 U-Net keep each fit short; the
cost is Ray's worker start-up, so every Ray test runs exactly the fits it needs.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import storage
from pipelines.config import config_from_dict, config_to_dict, load_train_config
from pipelines.train.train import default_cpus_per_worker, plan_steps

TINY_MODEL = ["model.depth=2", "model.base_width=4"]


def _cfg(manifest: str, root: str, *extra: str):
    return load_train_config("jobs/configs/train_sample.yaml", [
        f"data.manifest={manifest}", f"storage.storage_path={root}/ray_results",
        f"storage.models_uri={root}/models", "batch_size=3", "log_every_steps=0",
        "optim.warmup_iterations=2", "stopping_rounds=null", *TINY_MODEL,
        "storage.checkpoint_every_secs=0", *extra])   # resumes here expect every epoch's


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """12 pairs of 32x32, 3 classes: 9 train / 3 val."""
    from seg_core.sample_data import generate_sample_dataset

    root = tmp_path_factory.mktemp("tiny")
    return Path(generate_sample_dataset(root, n=12, size=(32, 32), num_classes=3, seed=1))


def _scheduled_lr(cfg, step: int, total_steps: int) -> float:
    """The LR after ``step`` optimizer steps, from a fresh seg_core schedule (independent of the
    Ray loop and its checkpoints)."""
    from seg_core.engine import build_optimizer, build_scheduler
    from seg_core.model import UNet

    optimizer = build_optimizer(UNet(cfg.model), lr=cfg.optim.lr)
    scheduler = build_scheduler(optimizer, total_steps=total_steps,
                                warmup_steps=cfg.optim.warmup_iterations,
                                schedule=cfg.optim.schedule)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


# ------------------------------------------------------------------------------ Ray-free checks


def test_yaml_round_trip_and_dotted_overrides():
    cfg = load_train_config("jobs/configs/train_isbi.yaml",
                            ["optim.lr=1e-3", "scaling.num_workers=2", "mask.class_names=[m,c]"])
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)  # YAML 1.1 "1e-3" is a str
    assert cfg.scaling.num_workers == 2 and cfg.mask.class_names == ("m", "c")
    assert cfg.mask.mask_values == (0, 255) and cfg.preprocessing.resize == (256, 256)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert cfg.run_name == "unet-isbi-v1"
    assert dataclasses.replace(cfg, nfolds=3).with_fold(2).run_name == "unet-isbi-v1-fold2"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key(s) ['lrr']"),
    ("loss=bce", "does not fit a multi-class mask"),
    ("model.num_classes=4", "model.num_classes=4 but mask.num_classes=2"),
    ("epochs=many", "epochs: expected int, got 'many'"),
    ("nfolds=1", "nfolds must be 0 (off) or >= 2"),
    ("amp=fp8", "expected one of ['auto', 'bf16', 'off']"),
    ("preprocessing.tile_size=512", "larger than the 256x256 inputs training shows the network "
                                    "(preprocessing.resize)"),
    ("augment.crop=[1, 2, 3]", "augment.crop: expected an int or [H, W]"),
    # fault injection is the tests' private channel (pipelines.faults), never a key
    ("fail_at_step=3", "unknown key(s) ['fail_at_step']"),
    ("nan_at_step=3", "unknown key(s) ['nan_at_step']"),
    ("pause_at_step=3", "unknown key(s) ['pause_at_step']"),
    # an artifact fact, recorded by training: never a setting
    ("preprocessing.train_size=[256, 256]", "training records it in the artifact"),
])
def test_bad_settings_say_what_was_expected(override, message):
    with pytest.raises(ValueError) as error:
        load_train_config("jobs/configs/train_isbi.yaml", [override])
    assert message in str(error.value)


def test_step_plan_matches_the_equal_split():
    cfg = load_train_config("jobs/configs/train_sample.yaml", ["batch_size=4", "epochs=3",
                                                               "scaling.num_workers=2"])
    plan = plan_steps(cfg, 18)  # 9 rows per worker -> 3 batches of 4, 4, 1
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 9)
    capped = plan_steps(dataclasses.replace(cfg, max_iterations=5), 18)
    assert capped.total_steps == 5
    with pytest.raises(ValueError, match="cannot feed 2 workers"):
        plan_steps(cfg, 1)


def test_fractional_cpus_leave_one_cpu_for_ray_data():
    assert default_cpus_per_worker(2, 2) == 0.5  # the 2-core hang fix from the notes
    assert default_cpus_per_worker(2, 1) == 1.0
    assert default_cpus_per_worker(2, 1, trainers=3) == 0.25
    assert default_cpus_per_worker(64, 4) == 1.0


def test_validation_keeps_to_its_share_of_the_training_time():
    from pipelines.train.loop import ValClock

    clock = ValClock(0.1)
    clock.trained(10.0)
    assert clock.due(last=False)            # the first epoch is always validated
    clock.val_s = clock.last_val_s = 0.6    # it took 0.6 s
    clock.validations = 1
    clock.trained(1.0)                      # 11 s trained: 0.6 + 0.6 > 1.1
    assert not clock.due(last=False)
    assert clock.due(last=True)             # the last epoch always is
    clock.trained(1.0)                      # 12 s trained: 0.6 + 0.6 <= 1.2
    assert clock.due(last=False)
    assert ValClock(None).due(last=False)   # null: every epoch


def test_cpu_training_starts_on_every_core_of_the_node(ray_session, tiny_dataset):
    import ray

    from pipelines.train.loop import torch_threads

    cfg, cpu = _cfg(str(tiny_dataset), "/tmp/unused"), torch.device("cpu")
    cores = int(ray.cluster_resources()["CPU"])   # the session cluster has one node
    assert torch_threads(cfg, cpu, local_workers=1) == cores   # cached or streamed alike
    assert torch_threads(cfg, cpu, local_workers=2) == max(1, cores // 2)
    assert torch_threads(cfg, torch.device("cuda"), local_workers=1) is None
    pinned = _cfg(str(tiny_dataset), "/tmp/unused", "scaling.torch_threads=3")
    assert torch_threads(pinned, cpu, local_workers=1) == 3


def test_a_warm_start_with_another_class_count_and_epochs_between_validations(
        ray_session, tiny_dataset, tmp_path, capsys):
    """One fit proves two things: a warm start from a 2-class model keeps all but the head, and
    the epochs between validations are recorded without val."""
    from pipelines.train.train import train
    from seg_core.artifact import load_artifact, save_artifact
    from seg_core.config import MaskSpec, ModelConfig, Preprocessing
    from seg_core.model import UNet

    torch.manual_seed(5)   # the "trained" 2-class model: same arch, other head
    start = UNet(ModelConfig(in_channels=3, num_classes=2, depth=2, base_width=4))
    save_artifact(tmp_path / "two_class", start, name="two", version="v1",
                  mask_spec=MaskSpec(num_classes=2), preprocessing=Preprocessing())
    cfg = _cfg(str(tiny_dataset), str(tmp_path), "epochs=3", "val_fraction=1e-6",
               "optim.lr=1e-4", f"init_from={tmp_path / 'two_class'}")
    result = train(cfg)
    out = capsys.readouterr().out
    assert "head was re-initialised for 3 classes (the trained model had 2)" in out
    # the workers' lines reach the driver up to the last one, which comes just before the end
    assert re.search(r"epoch 3/3 loss [0-9.]+ val mIoU", out), out[-2000:]
    trained = load_artifact(result.artifact_uri).model.state_dict()
    before = start.state_dict()
    fresh = UNet(cfg.model).state_dict()
    assert {k for k in trained if trained[k].shape != before[k].shape} == {"head.weight",
                                                                           "head.bias"}
    # the body started from the 2-class weights: a few short epochs at a small lr stay near
    # them, far nearer than a fresh initialisation is
    convs = [k for k in trained if k.endswith("weight") and trained[k].dim() == 4
             and not k.startswith("head.")]
    moved = sum(float((trained[k] - before[k]).norm()) for k in convs)
    apart = sum(float((fresh[k] - before[k]).norm()) for k in convs)
    assert moved < 0.1 * apart, (moved, apart)

    validated = [h["val"] is not None for h in result.history]
    assert validated == [True, False, True]   # first and last always, none between
    assert result.history[1]["val_miou"] is None and result.history[2]["val_miou"] is not None
    assert result.selected_epoch in (1, 3)   # best weights come from validated epochs only
    assert result.metrics == result.history[result.selected_epoch - 1]["val"]
    with pytest.raises(ValueError, match="val_fraction must be in"):
        _cfg(str(tiny_dataset), str(tmp_path), "val_fraction=0")


def test_a_time_budget_fits_the_schedule_to_end_at_the_floor_within_the_budget(
        ray_session, tiny_dataset, tmp_path):
    """10,000 epochs and 35 s: training measures its pace, fits the cosine to the time left
    (start-up, validation and artifact included) and ends at the learning-rate floor."""
    import time

    from pipelines.train.train import train
    from seg_core.engine import WarmupDecay

    budget = 35.0
    cfg = _cfg(str(tiny_dataset), str(tmp_path), "epochs=10000", f"max_runtime_secs={budget}",
               "optim.min_lr_ratio=0.05", "register=false")
    started = time.monotonic()
    result = train(cfg)
    wall = time.monotonic() - started
    report = json.loads(Path(result.artifact_uri, "metrics.json").read_text())
    schedule = report["schedule"]
    total = schedule["total_steps"]
    assert schedule["planned_steps"] == 3 * 10_000 and 8 <= total < 3 * 10_000, schedule
    assert schedule["measured_epoch_end"], schedule   # refitted once an epoch end was timed
    assert report["steps"] == total and f"ended at step {total}" in result.stopped
    # the learning rate is at its floor (within one step), computed apart from the loop
    rule = WarmupDecay(total, min(cfg.optim.warmup_iterations, total), cfg.optim.schedule,
                       cfg.optim.min_lr_ratio)
    floor, last = cfg.optim.lr * cfg.optim.min_lr_ratio, result.history[-1]["lr"]
    assert abs(last - floor) <= abs(cfg.optim.lr * rule(total - 1) - floor) + 1e-12, last
    assert wall <= 1.1 * budget, f"{wall:.1f} s for a {budget:g} s budget; {schedule}"


def test_placement_settings_reach_ray_train(ray_session, tiny_dataset):
    from pipelines.train.train import scaling_config

    cfg = _cfg(str(tiny_dataset), "/tmp/unused", "scaling.num_workers=2",
               "scaling.resources_per_worker={train_node: 1}", "scaling.placement_strategy=SPREAD")
    scaling = scaling_config(cfg)
    assert scaling.resources_per_worker == {"CPU": 0.5, "train_node": 1.0}
    assert scaling.placement_strategy == "SPREAD"
    with pytest.raises(ValueError, match="CPU has its own setting"):
        _cfg(str(tiny_dataset), "/tmp/unused", "scaling.resources_per_worker={CPU: 2}")
    with pytest.raises(ValueError, match="expected one of"):
        _cfg(str(tiny_dataset), "/tmp/unused", "scaling.placement_strategy=spread")


def test_seeded_fold_assignment_is_balanced_and_stable(tiny_dataset):
    from pipelines.ingest import read_manifest
    from pipelines.train.cv import assign_folds

    cfg = _cfg(str(tiny_dataset), "/tmp/unused", "nfolds=3", "fold_assignment=random")
    table, how = assign_folds(read_manifest(str(tiny_dataset)), cfg)
    again, _ = assign_folds(read_manifest(str(tiny_dataset)), cfg)
    folds = table["fold"].to_pylist()
    train = [f for f, s in zip(folds, table["split"].to_pylist()) if s == "train"]
    assert how == "random" and folds == again["fold"].to_pylist()
    assert sorted(train.count(k) for k in range(3)) == [3, 3, 3]
    assert all(f is None for f, s in zip(folds, table["split"].to_pylist()) if s == "val")


# ------------------------------------------------------------------------------ Ray + S3 runs


@pytest.mark.slow
def test_two_workers_on_s3_lose_one_resume_from_s3_and_the_artifact_predicts(
        ray_session, s3_sample_dataset, s3_prefix, tmp_path, inject_faults):
    from pipelines.train.train import train
    from seg_core.artifact import load_artifact
    from seg_core.codecs import decode_image, decode_mask
    from seg_core.config import PostProcess, to_dict
    from seg_core.inference import Segmenter
    from seg_core.metrics import compute_metrics, confusion_counts

    # 18 train rows / 2 workers / batch 4 -> 3 steps per epoch; rank 1 dies before step 5
    # (mid epoch 2) and the run resumes from the epoch-1 checkpoint on S3.  The elastic
    # deformation runs in the loop on each worker's device (here the CPU).
    inject_faults(fail_at_step=4)
    cfg = _cfg(s3_sample_dataset, s3_prefix, "scaling.num_workers=2", "epochs=2",
               "batch_size=4", "storage.max_failures=1", "augment.elastic=4")
    result = train(cfg)

    run = f"{s3_prefix}/ray_results/{cfg.run_name}"
    files = storage.list_uri(run)
    assert f"{run}/checkpoint_epoch_0002/state.pt" in files, files
    assert f"{run}/config.yaml" in files
    assert storage.read_bytes(f"{run}/fault_injected_at_step_4").startswith(
        b"rank 1 killed at step 4")
    assert result.artifact_uri == f"{s3_prefix}/models/unet-sample/v1"
    assert [h["epoch"] for h in result.history] == [1, 2]   # configured epochs, none repeated
    assert [h["step"] for h in result.history] == [3, 6]
    assert len(result.restarts) == 1
    assert (result.restarts[0]["epoch"], result.restarts[0]["step"]) == (1, 3)  # last checkpoint

    local = storage.copy_dir_to_local(result.artifact_uri, tmp_path / "artifact")
    assert {"artifact.json", "weights.pt", "metrics.json", "learning_curve.png",
            "config.yaml"} <= {p.name for p in local.iterdir()}
    artifact = load_artifact(local)  # seg_core alone
    # native 96x96 samples, no crop or resize: the loop recorded what the network saw (max over
    # both workers), and inference runs each image in one forward at that size
    assert artifact.preprocessing.train_size == (96, 96)
    assert artifact.preprocessing.inference_window() == (96, 96)
    # the per-class post-processing chosen on the val split, and why: it never lowers val Dice
    chosen = json.loads((local / "metrics.json").read_text())["postprocess"]
    assert chosen["images"] == 6 and chosen["rules"] == to_dict(artifact.postprocess)
    assert chosen["mean_dice_after"] >= chosen["mean_dice_before"]
    assert artifact.meta["postprocess_choice"]["classes"].keys() == {"disc", "rectangle"}
    for evidence in chosen["classes"].values():
        assert evidence["dice_after"] >= evidence["dice_before"]
        assert "keep_largest" in evidence["tried"] and "min_size 10" in evidence["tried"]
    # the confidence temperature fitted on the same val pairs, in the artifact and metrics.json
    calibration = json.loads((local / "metrics.json").read_text())["calibration"]
    assert calibration == artifact.meta["calibration"] and calibration["images"] == 6
    assert 0.05 <= calibration["temperature"] <= 20
    assert calibration["nll_after"] <= calibration["nll_before"]
    # validation scored the raw masks: re-predict them without the post-processing
    segmenter = Segmenter(artifact, engine="torch", postprocess=PostProcess())

    # Every val pixel was scored exactly once across the two workers, and re-predicting with the
    # loaded artifact reproduces the recorded counts exactly (validation == the predict path).
    manifest = storage.read_bytes(s3_sample_dataset).decode().splitlines()[1:]
    val_rows = [line.split(",") for line in manifest if line.endswith(",val")]
    recorded = json.loads((local / "metrics.json").read_text())["val"]["counts"]
    totals = {k: np.zeros(3, dtype=np.int64) for k in ("tp", "fp", "fn")}
    pixels = 0
    base = s3_sample_dataset.rsplit("/", 1)[0]
    for image_rel, mask_rel, _ in val_rows:
        image = decode_image(storage.read_bytes(f"{base}/{image_rel}"))
        mask = decode_mask(storage.read_bytes(f"{base}/{mask_rel}"), artifact.mask_spec)
        prediction = segmenter.predict(image)
        assert prediction.mask.shape == image.shape[:2]
        assert prediction.mask.max() < 3
        counts = confusion_counts(prediction.mask.astype(np.int64), mask, 3)
        for key in totals:
            totals[key] += counts[key]
        pixels += mask.size
    assert sum(np.add(recorded["tp"], recorded["fn"])) == pixels
    # metrics.json holds the val counts of the weights in the artifact (best epoch); the worker
    # ran with one thread, this process with more, so allow float-order ties to flip a few pixels.
    again = compute_metrics(totals["tp"], totals["fp"], totals["fn"], reduction="macro")
    assert again["per_class"]["iou"] == pytest.approx(result.metrics["per_class"]["iou"], abs=0.005)
    assert abs(int(totals["tp"].sum()) - sum(recorded["tp"])) <= 0.001 * pixels


@pytest.fixture(scope="module")
def failed_run(ray_session, tiny_dataset, tmp_path_factory, fault_env):
    """One run that died in epoch 3 with no automatic restarts, like a job whose cluster went
    away: 9 train rows, 1 worker, batch 3 -> 3 steps an epoch; it dies before step 8, after
    the checkpoints of epochs 1 and 2.  Tests resume copies of it."""
    from ray.train import TrainingFailedError

    from pipelines.train.train import train

    root = tmp_path_factory.mktemp("failed")
    cfg = _cfg(str(tiny_dataset), str(root), "epochs=3", "storage.max_failures=0")
    with fault_env(fail_at_step=7), pytest.raises(TrainingFailedError):
        train(cfg)
    return cfg, root / "ray_results" / cfg.run_name


def _copy_of(failed_run, tiny_dataset, tmp_path):
    """The failed run's config, pointed at a copy of its checkpoints under ``tmp_path``."""
    import shutil

    cfg, run = failed_run
    shutil.copytree(run, tmp_path / "ray_results" / cfg.run_name)
    return _cfg(str(tiny_dataset), str(tmp_path), "epochs=3", "storage.max_failures=0")


@pytest.mark.slow
def test_second_invocation_resumes_at_the_scheduled_learning_rate(failed_run, tiny_dataset,
                                                                  tmp_path):
    from pipelines.train.train import train

    cfg = _copy_of(failed_run, tiny_dataset, tmp_path)
    run = tmp_path / "ray_results" / cfg.run_name
    first = torch.load(run / "checkpoint_epoch_0002" / "state.pt", weights_only=False)
    assert (first["epoch"], first["step"]) == (2, 6)

    result = train(cfg)  # same run name: resumes
    resumed = result.restarts[0]
    assert (resumed["epoch"], resumed["step"]) == (2, 6)
    expected = _scheduled_lr(cfg, 6, total_steps=9)
    assert resumed["lr"] == pytest.approx(expected, rel=1e-9)
    assert resumed["lr"] != pytest.approx(_scheduled_lr(cfg, 0, total_steps=9))  # not reset
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[:2] == first["history"]  # epochs 1-2 kept from the first invocation
    assert result.history[-1]["lr"] == pytest.approx(_scheduled_lr(cfg, 9, total_steps=9))


# ------------------------------------------------------------------------ safe restarts


def test_checkpoints_load_as_data_only(tmp_path):
    import os

    from pipelines.train.checkpoint import load_state, plain
    from seg_core.engine import rng_state, set_rng_state

    class Payload:   # what a writer of the checkpoint prefix could plant
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    planted = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload()}, planted)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_state(str(planted))
    assert not (tmp_path / "pwned").exists()
    # a 0.1-era checkpoint (numpy generator state, numpy floats) still loads
    old = tmp_path / "old.pt"
    torch.save({"rng": [{"numpy": np.random.get_state()}], "val_miou": np.float64(0.5)}, old)
    assert load_state(str(old))["val_miou"] == 0.5
    # generator states survive the plain round trip exactly
    state = plain(rng_state())
    expected = (np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.slow
def test_a_torn_newest_checkpoint_falls_back_to_the_one_before(failed_run, tiny_dataset,
                                                               tmp_path):
    from pipelines.train.train import train

    cfg = _copy_of(failed_run, tiny_dataset, tmp_path)
    run = tmp_path / "ray_results" / cfg.run_name
    newest = run / "checkpoint_epoch_0002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])   # torn upload
    result = train(cfg)
    assert (result.restarts[0]["epoch"], result.restarts[0]["step"]) == (1, 3)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]


@pytest.mark.slow
def test_a_non_finite_loss_stops_without_retry_and_exports_the_best_epoch(
        ray_session, tiny_dataset, tmp_path, inject_faults, capsys):
    from PIL import Image

    from pipelines.train.train import train

    inject_faults(nan_at_step=5)
    cfg = _cfg(str(tiny_dataset), str(tmp_path), "epochs=3", "storage.max_failures=2",
               "artifact_weights=last", "data.cache_decoded=false")   # streamed
    result = train(cfg)
    assert "streaming them" in capsys.readouterr().out
    # streamed, nothing counted the classes up front: the shares are those of the batches the
    # network was shown (epoch 1 showed every train image once, uncropped), against the mask
    # files counted here with PIL alone
    root = tiny_dataset.parent
    rows = [line.split(",") for line in tiny_dataset.read_text().splitlines()[1:]]
    truth = np.bincount(np.concatenate([np.asarray(Image.open(root / mask)).ravel()
                                        for _, mask, split in rows if split == "train"]),
                        minlength=3)[:3]
    assert result.class_frequency == pytest.approx(tuple(truth / truth.sum()), abs=1e-9)
    assert "nan%" not in result.class_table()
    assert result.stopped.startswith("non-finite loss at step 5 (epoch 2)")
    assert result.restarts == [] and [h["epoch"] for h in result.history] == [1]
    metrics = json.loads(storage.read_bytes(storage.join_uri(result.artifact_uri,
                                                             "metrics.json")))
    assert metrics["artifact_weights"].startswith("best (epoch 1")
    assert all(torch.isfinite(v).all() for v in torch.load(
        Path(result.artifact_uri) / "weights.pt", weights_only=True).values()
        if v.is_floating_point())


def test_a_loss_that_blows_up_in_the_first_epoch_leaves_nothing_to_export(tiny_dataset,
                                                                         tmp_path):
    from pipelines.train.checkpoint import NON_FINITE
    from pipelines.train.train import write_artifact

    cfg = _cfg(str(tiny_dataset), str(tmp_path), "epochs=2")
    state = {"best": None, "stopped": f"{NON_FINITE} at step 1 (epoch 1)", "history": [],
             "epoch": 0, "step": 1, "restarts": [], "model": {}}
    with pytest.raises(RuntimeError, match="before the first epoch ended"):
        write_artifact(cfg, state, "sha", str(tmp_path / "run"))
    assert not (tmp_path / "models").exists()


def test_cache_decoded_auto_weighs_the_decoded_size_against_the_object_store(
        ray_session, tiny_dataset, tmp_path, monkeypatch):
    from pipelines.train import data

    cfg = _cfg(str(tiny_dataset), str(tmp_path))
    assert cfg.data.cache_decoded == "auto"
    train_sel, val_sel = {"split": "train"}, {"split": "val"}
    cache, why = data.cache_decision(cfg, str(tiny_dataset), "manifest", train_sel, val_sel)
    # 9 train rows and 3 val rows at 32x32, as cached: uint8 RGB pixels and a uint8 mask
    assert data.bytes_per_pixel(cfg.preprocessing, cfg.mask) == (4, 4)
    expected = (9 * 1024 * 4 + 3 * 1024 * 4) / 2**20
    assert cache and why.startswith(f"decoded train + val ~{expected:,.0f} MiB (uint8 pixels, "
                                    f"uint8 masks: 4 B per training pixel)") and \
        why.endswith("caching them")
    # the old rule (float32 images, int64 masks) took 20 bytes per training pixel, 5 times more
    resized = dataclasses.replace(cfg.preprocessing, resize=(32, 32))
    assert data.bytes_per_pixel(resized, cfg.mask) == (3 * 4 + 1, 4)
    monkeypatch.setattr(data, "CACHE_SHARE", 1e-9)          # as if the store were tiny
    cache, why = data.cache_decision(cfg, str(tiny_dataset), "manifest", train_sel, val_sel)
    assert not cache and "streaming them" in why
    forced = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_decoded=True))
    assert data.cache_decision(forced, str(tiny_dataset), "manifest", train_sel, val_sel)[0]


def test_faults_are_armed_only_through_their_environment_variable(monkeypatch):
    from pipelines.api import hyperparameter_names
    from pipelines.faults import ENV, Faults

    monkeypatch.delenv(ENV, raising=False)
    assert Faults.from_env() == Faults()
    monkeypatch.setenv(ENV, '{"nan_at_step": 5}')
    assert Faults.from_env() == Faults(nan_at_step=5)
    monkeypatch.setenv(ENV, '{"explode_at_step": 5}')
    with pytest.raises(ValueError, match="expected a JSON object with keys"):
        Faults.from_env()
    assert not {"fail_at_step", "nan_at_step", "pause_at_step"} & set(hyperparameter_names())
    assert not [k for k in config_to_dict(load_train_config()) if k.endswith("_at_step")]



def test_a_streaming_cpu_worker_drops_a_thread_only_when_fewer_train_faster():
    import torch

    from pipelines.train.loop import ThreadShare

    torch.set_num_threads(3)   # every core of a 3-core node (restored after the test)
    share = ThreadShare()
    assert share.after_epoch(4.1) is None and torch.get_num_threads() == 3   # first execution
    assert share.after_epoch(5.4) == "trying 2 torch threads (5.4 images/s on 3)"
    assert torch.get_num_threads() == 2
    assert share.after_epoch(6.1) == ("2 torch threads trained at 6.1 images/s against 5.4 on "
                                      "3: keeping 2; trying 1 torch thread (6.1 images/s "
                                      "on 2)")
    assert torch.get_num_threads() == 1
    assert share.after_epoch(6.2) == \
        "1 torch thread trained at 6.2 images/s against 6.1 on 2: back to 2"   # under 3% more
    assert torch.get_num_threads() == 2
    assert share.after_epoch(20.0) is None and torch.get_num_threads() == 2      # settled
    torch.set_num_threads(2)   # the 2-core box: one trial, which loses
    two = ThreadShare()
    two.after_epoch(7.0), two.after_epoch(7.5)
    assert torch.get_num_threads() == 1
    assert two.after_epoch(5.5) == \
        "1 torch thread trained at 5.5 images/s against 7.5 on 2: back to 2"
    assert two.after_epoch(1.0) is None and torch.get_num_threads() == 2
    torch.set_num_threads(2)
    down = ThreadShare()   # one fewer wins on the 2-core box: kept, and nothing fewer to try
    down.after_epoch(7.0), down.after_epoch(5.0)
    assert down.after_epoch(9.0) == \
        "1 torch thread trained at 9.0 images/s against 5.0 on 2: keeping 1"
    assert down.after_epoch(1.0) is None and torch.get_num_threads() == 1


def test_checkpoints_wait_for_their_interval_and_the_last_epoch_always_writes_one(
        ray_session, tiny_dataset, tmp_path):
    from pipelines.train.train import train

    cfg = _cfg(str(tiny_dataset), str(tmp_path), "epochs=3", "register=false",
               "storage.checkpoint_every_secs=3600")
    result = train(cfg)
    run = tmp_path / "ray_results" / cfg.run_name
    assert sorted(p.name for p in run.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0003"]
    # every epoch still reported and recorded: the history came back whole in the last one
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert [h["step"] for h in result.history] == [3, 6, 9]
    with pytest.raises(ValueError, match="checkpoint_every_secs must be >= 0"):
        _cfg(str(tiny_dataset), str(tmp_path), "storage.checkpoint_every_secs=-1")


def test_the_next_epoch_is_read_while_this_one_trains_in_order_and_bounded():
    from pipelines.train.data import EpochPrefetch

    made: list[int] = []   # ids of the blocks the epochs produced

    def open_epoch():   # 3 blocks of 4 rows per epoch, numbered 100 * epoch + 10 * block
        epoch = len({i // 100 for i in made})
        for b in range(3):
            made.append(100 * epoch + 10 * b)
            yield {"id": np.arange(4) + made[-1], "image": np.zeros((4, 8), np.uint8)}

    stream = EpochPrefetch(open_epoch, ahead_rows=4, epochs=3)
    first = stream.epoch()
    assert [b["id"][0] for b in first] == [0, 10, 20]
    # epoch 1 opens before anything asks for it, and stops one block past the 4 rows ahead:
    # block 100 queued, block 110 made and waiting
    deadline = time.monotonic() + 5
    while len(made) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert made == [0, 10, 20, 100, 110]
    second = stream.epoch()
    assert next(second)["id"][0] == 100   # epoch 1 left after one block: the rest is dropped
    assert [b["id"][0] for b in stream.epoch()] == [200, 210, 220]
    with pytest.raises(RuntimeError, match="only 3 epoch"):
        next(stream.epoch())
    stream.close()

    def broken():
        yield {"id": np.arange(2)}
        raise OSError("s3://bucket/shard-7.parquet: connection reset")

    failing = EpochPrefetch(broken, ahead_rows=64)
    epoch = failing.epoch()
    assert next(epoch)["id"].tolist() == [0, 1]
    with pytest.raises(OSError, match="shard-7"):   # the thread's error, raised in the reader
        next(epoch)
    failing.close()
