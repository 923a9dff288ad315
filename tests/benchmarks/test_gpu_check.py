"""`make gpu-check` rehearsed on the CPU (GPU_CHECK_CPU=1): the script a lent GPU machine runs
must never rot.  It needs no Ray: the device machine has torch alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_check_rehearses_on_the_cpu_and_reports_every_part(tmp_path):
    env = {**os.environ, "GPU_CHECK_CPU": "1", "OUT": str(tmp_path)}
    done = subprocess.run(["make", "--no-print-directory", "gpu-check"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"] == "cpu rehearsal" and result["wall_s"] < 120

    training = result["training"]
    variants = [row["variant"] for row in training["rows"]]
    assert variants[:2] == ["eager", "eager + fused AdamW"] and variants[2].startswith("compiled")
    for row in training["rows"]:
        assert "error" not in row, row                     # aot_eager compiles on the CPU
        assert row["images_per_s"] > 0 and row["tflops"] > 0
        assert row["mfu_datasheet"] is None                  # no datasheet peak for a CPU
        assert row["mfu_gemm"] == pytest.approx(     # against the GEMM ceiling measured here
            row["tflops"] / training["gemm_ceiling_bf16_tflops"], rel=0.02)
    best = training["best"]["8"]
    assert best["variant"] in variants and best["batch"] in (2, 4)

    isbi = result["isbi"]   # generated membranes: learnt well past the 'all cell' answer
    assert isbi["steps"] >= 80 and isbi["final_loss"] < 0.8    # 80: the rehearsal's step floor
    assert isbi["fp32"]["membrane_dice"] > 0.6                 # 'all cell' scores 0 here

    inference = result["inference"]
    # the CPU rule (seg_core.inference.tiles_per_forward): 64K pixels per thread, 1 to 32
    assert 1 <= inference["tiles_per_forward"] <= 32 and inference["amp"] == "None"
    assert inference["mask_agreement_with_plain_512"] > 0.99   # the same folded network
    assert inference["segmenter_images_per_s_big"] > 0 and inference["tiled_overhead_big"] > 0

    correct = result["correctness"]
    assert correct["checkpoint_device_to_cpu_identical"] is True
    assert correct["checkpoint_cpu_to_device_identical"] is True
    assert correct["artifact_device_to_cpu_identical"] is True
    assert correct["rng_round_trip"] == {"python": True, "numpy": True, "torch": True}
    assert correct["bf16_fp32_mask_agreement"] > 0.99
    assert result["goals"]["round trips identical"] is True
    assert result["goals"]["mfu (datasheet) >= 0.35"] is None   # no GPU: not claimed either way
    assert result["goals"]["bf16 agreement >= 0.995"] is True

    report = (tmp_path / "gpu_check.md").read_text()
    assert "| 8 | 4 | eager |" in report or "| 8 | 2 | eager |" in report
    assert "MFU (datasheet) | MFU (GEMM)" in report
    assert "| bf16 Segmenter |" in report and "| goal | met |" in report
    printed = [line for line in done.stdout.splitlines() if line.startswith('{"check"')]
    assert [json.loads(line) for line in printed] == [result]    # one JSON line, as saved


@pytest.mark.slow
def test_the_gpu_check_imports_no_ray_and_explains_itself():
    probe = ("import sys, benchmarks.gpu_check.__main__; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'ray', 'pydantic', 'pyarrow', 'fsspec', 'yaml', 'mlflow'}))")
    imported = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                              text=True, check=True)
    assert imported.stdout.strip() == "[]"
    shown = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--help"],
                           cwd=REPO, capture_output=True, text=True, check=True)
    assert "GPU_CHECK_CPU=1" in shown.stdout and "--isbi-seconds" in shown.stdout
    refused = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=REPO,
                             capture_output=True, text=True,
                             env={**os.environ, "GPU_CHECK_CPU": "0", "CUDA_VISIBLE_DEVICES": ""})
    assert refused.returncode != 0 and "GPU_CHECK_CPU=1" in refused.stderr
