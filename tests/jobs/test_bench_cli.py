"""`rayseg bench` runs every benchmark of the checkout; each prints one JSON line whose ratio follows
from its own figures, measured against a baseline in the same run.

The whole set runs once with ``--quick`` (tiny sizes, a few seconds each) on data the test makes:
a stand-in for the ISBI slices (generated membranes laid out like the real set).  That executes
every benchmark's figure and ratio code, which the full runs only do on a quiet machine.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import BENCHMARKS, REQUIRED_KEYS, check_ratio, format_table, ratio_of, run_one

REPO = Path(__file__).resolve().parents[2]

# What each benchmark's ratio must be made of: (figure over or minus figure), as its goal says.
RATIO_FROM = {
    "cpu_ceiling": ["torch_gemm_gflops", "/", "numpy_gemm_gflops"],
    "unet_step": ["channels_last_gflops", "/", "ceiling_gflops"],
    "ingest": ["rayseg_shards_pairs_per_s", "/", "plain_shards_pairs_per_s"],
    "lite_unet": ["lite_infer_images_per_s_64", "/", "unet_infer_images_per_s_64"],
    "train_overhead": ["ray_step_ms", "/", "plain_step_ms"],
    "train_throughput": ["rayseg_images_per_s", "/", "plain_images_per_s"],
    "train_real_sizes": ["rayseg_images_per_s", "/", "plain_images_per_s"],
    "batch_predict": ["rayseg_images_per_s_64px_shards_24", "/",
                      "plain_images_per_s_64px_shards_24"],
    "quality_isbi": ["rayseg_membrane_dice", "/", "plain_membrane_dice"],
    "warm_start_isbi": ["B_warm_membrane_dice", "/", "B_scratch_membrane_dice"],
    "quality_multiclass": ["rayseg_miou", "/", "plain_miou"],
    "quality_multilabel": ["rayseg_miou", "/", "plain_miou"],
    "autoconfig": ["zero_score", "/", "hand_score"],
    "instances": ["watershed_map", "/", "components_map"],
    "active_learning": ["balanced_final_miou", "-", "random_final_miou"],
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> dict[str, dict]:
    """``rayseg bench all --quick`` on a generated ISBI stand-in: {bench: its JSON line}."""
    from benchmarks.gpu_check.data import write_membrane_dataset

    tmp = tmp_path_factory.mktemp("bench")
    isbi = write_membrane_dataset(tmp / "isbi", train=6, val=2, size=(64, 96))
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "bench", "all", "--quick", "--isbi-dir", str(isbi),
         "--work-dir", str(tmp / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=540,
        env={**os.environ, "RAYSEG_VERBOSE": "0"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"bench"')]
    assert "bench" in done.stdout and "ratio" in done.stdout   # the table follows the lines
    return {line["bench"]: line for line in lines}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_benchmark_runs_quick_and_its_ratio_follows_from_its_figures(quick_results):
    assert list(quick_results) == list(BENCHMARKS)   # all of them, in the documented order
    for name, line in quick_results.items():
        assert set(REQUIRED_KEYS) <= set(line), name
        assert line["quick"] is True and len(line["load_average_before_after"]) == 2, name
        check_ratio(line)   # ratio == figures[a] op figures[b], to 3 decimals
        a, op, b = line["ratio_from"]
        assert a in line["figures"] and b in line["figures"], name
        assert math.isfinite(line["figures"][b]) and line["figures"][b] != 0, name
        if name in RATIO_FROM:
            assert line["ratio_from"] == RATIO_FROM[name], name
        assert not any("baseline" == k for k in line["figures"]), name   # no constant baseline


@pytest.mark.ray
@pytest.mark.slow
def test_baselines_run_the_same_work_in_the_same_run(quick_results):
    predict = quick_results["batch_predict"]["figures"]
    for key in [k for k in predict if k.startswith("rayseg_images_per_s_")]:
        run = key.removeprefix("rayseg_images_per_s_")
        # both loops, timed before and after each run, and both ratios per run
        assert predict[f"plain_images_per_s_{run}"] > 0 and predict[f"user_loop_images_per_s_{run}"] > 0
        assert predict[f"ratio_{run}"] == pytest.approx(
            predict[key] / predict[f"plain_images_per_s_{run}"], abs=2e-3)
        assert predict[f"vs_user_loop_{run}"] == pytest.approx(
            predict[key] / predict[f"user_loop_images_per_s_{run}"], abs=2e-3)
    assert predict["engine_64px_loose_24_auto"] == "openvino"   # auto: OpenVINO on CPUs
    # loose objects: the plain loop also timed reading them from the same S3 server
    assert predict["plain_from_s3_images_per_s_64px_loose_24_auto"] > 0
    assert "plain_from_s3_images_per_s_64px_shards_24" not in predict

    serve = quick_results["serve"]
    modes = serve["figures"]["ingress_modes"]
    assert modes[0] == "proxy_actor"   # what a fresh clone without haproxy gets, always measured
    for mode in modes:
        figures = serve["figures"]
        assert figures[f"{mode}_overhead_c1_p50_ms"] == pytest.approx(
            figures[f"{mode}_c1_p50_ms"] - figures[f"{mode}_bare_forward_ms"], abs=0.02)
        assert figures[f"{mode}_v2_binary_overhead_c1_p50_ms"] == pytest.approx(
            figures[f"{mode}_v2_binary_c1_p50_ms"] - figures[f"{mode}_bare_forward_ms"],
            abs=0.02)   # the Open Inference Protocol's binary route, in the same halves
        assert figures[f"{mode}_v2_over_v1_overhead"] == pytest.approx(
            figures[f"{mode}_v2_binary_overhead_c1_p50_ms"]
            / figures[f"{mode}_overhead_c1_p50_ms"], abs=2e-3)
    assert serve["ratio_from"] == [f"{modes[-1]}_c1_p50_ms", "-", f"{modes[-1]}_bare_forward_ms"]
    assert serve["figures"]["goal_sink_rows_equal_answered"] is True   # both ingress paths
    assert serve["figures"]["goal_zero_errors"] is True

    ingest = quick_results["ingest"]["figures"]
    assert ingest["loose_ratio"] == pytest.approx(
        ingest["rayseg_loose_pairs_per_s"] / ingest["plain_loose_pairs_per_s"], abs=2e-3)

    for name in ("quality_multiclass", "quality_multilabel"):
        figures = quick_results[name]["figures"]
        assert figures["epochs_planned"] >= 1 and figures["plain_steps_per_round"][0] > 0
        assert figures["rayseg_steps_per_round"][0] > 0
    overhead = quick_results["train_overhead"]["figures"]   # train() to the first step, and
    assert 0 < overhead["startup_s"] and 0 < overhead["shutdown_s"]   # the last step to its end
    assert overhead["startup_s"] + overhead["shutdown_s"] < overhead["fit_wall_s"]
    assert overhead["startup_plus_shutdown_s"] == pytest.approx(
        overhead["startup_s"] + overhead["shutdown_s"], abs=0.011)
    for name in ("train_throughput", "train_real_sizes"):   # both sides validate on one rule
        both = quick_results[name]["figures"]
        assert both["plain_val_passes"] >= 1 and both["plain_val_s"] > 0, name
        assert both["rayseg_val_passes"] >= 1, name
    real = quick_results["train_real_sizes"]["figures"]
    assert real["streamed_epochs"] >= 2 and "torch thread(s)" in real["streamed_thread_lines"][0]
    for share in ("whole", "settled"):
        busy = real[f"streamed_node_busy_{share}"]
        assert busy is None or 0 < busy <= 1, share
    # each epoch after the first: images/s, the node's busy share, the worker's torch threads
    by_epoch = real["streamed_images_per_s_node_busy_and_threads_by_epoch"]
    assert by_epoch and all(ips > 0 and threads >= 1 for ips, _, threads in by_epoch)
    assert real["rayseg_cached"] is True and "uint8 pixels" in real["rayseg_data_line"]
    isbi = quick_results["quality_isbi"]["figures"]
    assert isbi["plain_steps"] > 0 and isbi["rayseg_steps"] > 0
    assert 0 <= isbi["plain_pixel_accuracy"] <= 1 and 0 <= isbi["rayseg_pixel_accuracy"] <= 1
    engines = quick_results["engines"]["figures"]
    assert engines["unet_trained"] is True   # it found the model quality_isbi kept
    scale = quick_results["scale_rows"]["figures"]   # every figure measured, none assumed
    assert scale["done_sources_rows"] == scale["rows"] // 2   # the first half, then resumed
    assert scale["predict_resume_listing_s"] is not None and scale["predict_resume_listing_s"] > 0
    for phase in ("validate", "predict_half", "predict_resume"):
        assert scale[f"{phase}_s3_requests"].get("GET", 0) > 0, phase   # counted at moto
        assert scale[f"{phase}_driver_peak_rss_mib"] >= scale[f"{phase}_driver_rss_before_mib"]
    assert scale["files"] >= 1 and 0 < scale["file_mib_min"] <= scale["file_mib_max"]
    auto = quick_results["autoconfig"]["figures"]   # the plan ran on one side only
    assert auto["street_zero"]["planned"]["augment.vflip"] is False   # sky above, road below
    assert auto["street_zero"]["config"]["class_weights"] == "auto"   # the rare sign
    assert auto["street_hand"]["planned"] is None and auto["street_hand"]["steps"] > 0


def test_check_ratio_refuses_a_ratio_that_does_not_follow_from_the_figures():
    line = {"bench": "x", "figures": {"a": 3.0, "b": 2.0}, "ratio": 1.2, "ratio_from": ["a", "/", "b"]}
    with pytest.raises(ValueError, match="is not a / b"):
        check_ratio(line)
    assert ratio_of(line["figures"], ["a", "-", "b"]) == 1.0


def test_unknown_benchmark_lists_the_valid_names():
    with pytest.raises(ValueError, match="cpu_ceiling"):
        run_one("cpu_cieling")


def test_every_registered_benchmark_has_a_module():
    import importlib

    for name in BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        assert callable(module.run), name


def test_no_baseline_is_a_constant():
    found = subprocess.run(["grep", "-rn", "BASELINE = {", "benchmarks", "pipelines"], cwd=REPO,
                           capture_output=True, text=True)
    assert found.stdout == ""


def test_bench_says_what_to_do_outside_a_checkout():
    probe = ("import sys; sys.modules['benchmarks'] = None; from jobs.cli import main; "
             "sys.exit(main(['bench', 'cpu_ceiling']))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "checkout" in done.stderr and "make install" in done.stderr


def test_the_benchmarks_are_not_part_of_the_wheel():
    import tomllib

    from setuptools import find_packages

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    packaged = find_packages(str(REPO), include=include)
    assert "pipelines" in packaged and not any(p.startswith("benchmarks") for p in packaged)
    assert not any(p.startswith("tests") for p in packaged)


def test_table_shows_each_figure():
    table = format_table([{"bench": "x", "figures": {"alpha": 1.5}, "ratio": 0.5, "goal": ">=1"}])
    assert "alpha" in table and "0.500" in table


def run_quick(name: str) -> dict:
    """``rayseg bench NAME --quick`` in a process of its own (no Ray): its JSON line."""
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "bench", name, "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(next(x for x in done.stdout.splitlines() if x.startswith('{"bench"')))


@pytest.mark.timeout(120)
def test_instances_bench_quick_scores_every_route_beside_components_and_the_oracle():
    """``rayseg bench instances --quick`` needs no Ray: run on its own, within its 20 s."""
    line = run_quick("instances")
    figures = line["figures"]
    assert line["ratio_from"] == ["watershed_map", "/", "components_map"]
    check_ratio(line)
    assert line["wall_s"] <= 20 and figures["components_map"] > 0
    for route in ("none", "components", "watershed", "boundary", "boundary_watershed"):
        assert 0 <= figures[f"{route}_map"] <= 1 and 0 <= figures[f"{route}_pq"] <= 1, route
        assert figures[f"{route}_ms_per_image"] > 0, route
    # the ceiling, from the true masks: the boundary target separates every disc, the watershed
    # most, connected components only the discs that touch nothing
    assert figures["oracle_boundary_map"] >= 0.95
    assert figures["oracle_watershed_map"] > figures["oracle_components_map"]
    assert figures["oracle_none_map"] <= figures["oracle_components_map"]


@pytest.mark.timeout(120)
def test_active_learning_bench_quick_runs_every_arm_round_by_round():
    """``rayseg bench active_learning --quick`` needs no Ray: run on its own, within its 20 s."""
    line = run_quick("active_learning")
    figures = line["figures"]
    assert line["ratio_from"] == ["balanced_final_miou", "-", "random_final_miou"]
    check_ratio(line)
    assert figures["balanced_minus_random"] == pytest.approx(line["ratio"], abs=5e-4)
    assert line["wall_s"] <= 20 and figures["goal_met"] is (line["ratio"] >= 0.02)
    rounds, pool = figures["rounds"], figures["pool_duplicates_test"][0]
    planned = [round(0.10 * pool) + r * round(0.05 * pool) for r in range(rounds + 1)]
    assert figures["random_labelled_per_round"] == planned   # 10%, then 5% more a round
    for arm in ("balanced", "uncertainty", "random"):
        assert len(figures[f"{arm}_miou_per_round"]) == rounds + 1, arm
        assert figures[f"{arm}_miou_per_seed"] == [figures[f"{arm}_miou_per_round"]], arm
        assert all(0 <= v <= 1 for v in figures[f"{arm}_miou_per_round"]
                   + figures[f"{arm}_kite_iou_per_round"]), arm
        labelled = figures[f"{arm}_labelled_per_round"]   # rank may skip near-duplicates
        assert all(a < b <= p for a, b, p in zip(labelled, labelled[1:], planned[1:])), arm
    # round 0 is one model, shared: the arms differ only in what they label after it
    assert (figures["balanced_miou_per_round"][0] == figures["uncertainty_miou_per_round"][0]
            == figures["random_miou_per_round"][0])
    assert figures["uncertainty_by"] == "entropy"
    assert figures["balanced_by"] == "balanced_entropy"
    assert 0 < figures["kite_pixel_share_pool"] < 0.02   # the rare class, in a minority of images
    assert 0 < figures["kite_image_share_pool"] < 0.5
    assert figures["near_duplicates_within_cut"] >= 0.5   # rank's cut catches the copies
