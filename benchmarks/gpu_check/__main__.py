"""``python -m benchmarks.gpu_check`` (``make gpu-check``): see the package docstring."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import benchmarks.gpu_check as package
from benchmarks import REPO
from benchmarks.gpu_check.correctness import round_trip
from benchmarks.gpu_check.data import MASK, find_data, load_slices, synthetic_membranes
from benchmarks.gpu_check.inference import inference
from benchmarks.gpu_check.isbi import score, train_isbi
from benchmarks.gpu_check.sizes import CPU_SIZES, GOALS, PRE, Sizes, datasheet_tflops, say
from benchmarks.gpu_check.throughput import gemm_ceiling, train_throughput
from seg_core.artifact import load_artifact, save_artifact
from seg_core.config import Preprocessing
from seg_core.inference import Segmenter

CORRECTNESS_GOALS = ("bf16 agreement >= 0.995", "round trips identical")


def run(cpu: bool, data_dir: str | None, isbi_seconds: float | None) -> dict[str, Any]:
    started = time.perf_counter()
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device here; set GPU_CHECK_CPU=1 (or --cpu) to "
                         "rehearse the check on the CPU with tiny sizes")
    device = torch.device("cpu" if cpu else "cuda")
    sizes = CPU_SIZES if cpu else Sizes()
    if isbi_seconds:
        sizes = Sizes(**{**asdict(sizes), "isbi_budget_s": isbi_seconds})
    torch.backends.cudnn.benchmark = not cpu
    root = find_data(data_dir) if (data_dir or not cpu) else None
    if root is None and not cpu:
        raise SystemExit("gpu-check: the ISBI 2012 slices were not found; run `make "
                         "gpu-check-data` (copies ../shared/data/isbi2012_em_membrane into "
                         ".gpu_check_data/, which a device call can carry) or pass --data")
    data = load_slices(root) if root else {
        "train": synthetic_membranes(8, 64, 96, seed=1), "val": synthetic_membranes(3, 64, 96, 2)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    say(f"device {name or 'cpu'}, torch {torch.__version__}, data "
        f"{root or 'generated membranes'} ({len(data['train'])} train / {len(data['val'])} val)")

    say("1/4 training throughput")
    peaks = {"datasheet": datasheet_tflops(name) if device.type == "cuda" else None,
             "gemm": gemm_ceiling(sizes, device)}
    say(f"bf16 GEMM ceiling {peaks['gemm']:.1f} TFLOP/s; datasheet dense bf16 peak "
        f"{peaks['datasheet']} TFLOP/s")
    compile_deadline = started + (120 if not cpu else 60)   # no compiling after this
    throughput = train_throughput(sizes, device, compile_deadline, peaks)

    say("2/4 ISBI 2012 from scratch")
    model, isbi = train_isbi(data, sizes, device, throughput["best"][str(sizes.isbi_width)])
    with tempfile.TemporaryDirectory() as directory:
        pre = Preprocessing(**PRE, train_size=tuple(isbi["train_size"]))
        save_artifact(directory, model, name="gpu-check-isbi", version="1", mask_spec=MASK,
                      preprocessing=pre)
        artifact = load_artifact(directory)
        fp32, fp32_masks = score(
            Segmenter(artifact, device=device, engine="torch", amp_dtype=None), data["val"])
        bf16, bf16_masks = score(
            Segmenter(artifact, device=device, engine="torch", amp_dtype=torch.bfloat16),
            data["val"])
        agreement = float(np.mean([np.mean(a == b) for a, b in zip(fp32_masks, bf16_masks)]))
        isbi.update({"fp32": fp32, "bf16": bf16, "goal_pixel_accuracy": GOALS["pixel_accuracy"]})
        say(f"ISBI val: fp32 {fp32}, bf16 {bf16}, bf16/fp32 mask agreement {agreement:.5f}")

        say("3/4 inference")
        infer = inference(Path(directory), model, data["val"], sizes, device)

    say("4/4 correctness")
    correct = round_trip(model, sizes, device)
    correct.update({"bf16_fp32_mask_agreement": round(agreement, 5),
                    "goal_bf16_agreement": GOALS["bf16_agreement"]})
    say(f"correctness: {correct}")

    mfu = throughput["best_mfu_datasheet"]
    goals = {
        "mfu (datasheet) >= 0.35": None if mfu is None else mfu >= GOALS["mfu"],
        "pixel_accuracy >= 0.939": isbi["bf16"]["pixel_accuracy"] >= GOALS["pixel_accuracy"],
        "inference ratio 512 >= 0.9": infer["ratio_512"] >= GOALS["inference_ratio_512"],
        "bf16 agreement >= 0.995": agreement >= GOALS["bf16_agreement"],
        "round trips identical": all([correct["checkpoint_device_to_cpu_identical"],
                                      correct["checkpoint_cpu_to_device_identical"],
                                      correct["artifact_device_to_cpu_identical"],
                                      *correct["rng_round_trip"].values()]),
    }
    return {"check": "gpu_check", "mode": "cpu rehearsal" if cpu else "device",
            "device": name or "cpu", "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": str(root) if root else "generated membranes",
            "wall_s": round(time.perf_counter() - started, 1),
            "training": throughput, "isbi": isbi, "inference": infer, "correctness": correct,
            "goals": goals}


def table(result: dict[str, Any]) -> str:
    """The Markdown report: one table per part, goals last."""
    training = result["training"]
    lines = [f"# gpu-check: {result['device']} ({result['mode']}), torch {result['torch']}, "
             f"{result['date']}, {result['wall_s']} s", "",
             f"MFU against the datasheet's dense bf16 peak ({training['datasheet_bf16_tflops']} "
             f"TFLOP/s) and against the bf16 GEMM ceiling measured here "
             f"({training['gemm_ceiling_bf16_tflops']} TFLOP/s).", "",
             "| width | batch | variant | images/s | TFLOP/s | MFU (datasheet) | MFU (GEMM) | "
             "peak GiB | first step s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in training["rows"]:
        if "error" in row:
            lines.append(f"| {row['width']} | {row['batch']} | {row['variant']} | "
                         f"{row['error']} | | | | | |")
        else:
            lines.append(f"| {row['width']} | {row['batch']} | {row['variant']} | "
                         f"{row['images_per_s']} | {row['tflops']} | {row['mfu_datasheet']} | "
                         f"{row['mfu_gemm']} | {row['peak_gib']} | {row['first_step_s']} |")
    isbi, infer = result["isbi"], result["inference"]
    lines += ["", "| ISBI val (6 slices, full resolution) | pixel accuracy | membrane Dice |",
              "|---|---|---|",
              f"| fp32 Segmenter | {isbi['fp32']['pixel_accuracy']} | "
              f"{isbi['fp32']['membrane_dice']} |",
              f"| bf16 Segmenter | {isbi['bf16']['pixel_accuracy']} | "
              f"{isbi['bf16']['membrane_dice']} |",
              "", f"Trained {isbi['steps']} steps of {isbi['batch']} ({isbi['epochs']} epochs) in "
              f"{isbi['train_s']} s, width {isbi['width']}, {isbi['augmentation']}.", "",
              "| inference | Segmenter images/s | plain model(x) images/s | ratio |",
              "|---|---|---|---|",
              f"| {infer['side'][0]}x{infer['side'][1]} | "
              f"{infer['segmenter_images_per_s_512']} | {infer['plain_images_per_s_512']} | "
              f"{infer['ratio_512']} |",
              f"| {infer['big_side'][0]}x{infer['big_side'][1]} tiled vs one whole-image forward "
              f"| {infer['segmenter_images_per_s_big']} | "
              f"{infer['plain_whole_image_images_per_s_big']} | "
              f"{round(1 / infer['tiled_overhead_big'], 3)} |", "",
              "| goal | met |", "|---|---|"]
    lines += [f"| {goal} | {'n/a (no GPU)' if met is None else ('yes' if met else 'no')} |"
              for goal, met in result["goals"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make gpu-check", description=package.__doc__.split("\n\n")[0] + " Runs training "
        "throughput and MFU, ISBI 2012 at 512x512, Segmenter inference against a plain loop, "
        "and GPU correctness checks; writes gpu_check.json and gpu_check.md.  Exits 1 when a "
        "correctness goal fails (bf16 agreement, or a round trip that is not identical).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  make gpu-check-data && make gpu-check        # on a GPU machine\n"
               "  GPU_CHECK_CPU=1 make gpu-check                  # rehearsal on the CPU (~1 min)")
    parser.add_argument("--cpu", action="store_true", default=os.environ.get("GPU_CHECK_CPU") == "1",
                        help="run on the CPU with tiny sizes and generated data (GPU_CHECK_CPU=1)")
    parser.add_argument("--data", default=None,
                        help="ISBI folder with manifest.csv (default: $GPU_CHECK_DATA, "
                             ".gpu_check_data/isbi2012_em_membrane, ../shared/data/...)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "rayseg_work" /
                                                                     "gpu_check"),
                        help="folder for gpu_check.json and gpu_check.md (default: $OUT, else "
                             "rayseg_work/gpu_check)")
    parser.add_argument("--isbi-seconds", type=float, default=None,
                        help="ISBI training budget in seconds (default 240; 12 on the CPU)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args.cpu, args.data, args.isbi_seconds)
    report = table(result)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(report)
    print(json.dumps(result, separators=(",", ":")))
    print(report)
    say(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    failed = [goal for goal in CORRECTNESS_GOALS if not result["goals"][goal]]
    if failed:
        say(f"FAILED correctness: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
