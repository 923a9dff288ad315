"""``engines``: the same ISBI model through every inference engine, same run.

For the base U-Net that ``rayseg bench quality_isbi`` trained (``<work dir>/isbi_model/``) and,
when present, the lite one (``isbi_model_lite/``, from ``RAYSEG_ISBI_ARCH=lite``): each engine of
``seg_core.runtimes`` (torch eager, OpenVINO, ONNX Runtime and both INT8 graphs) runs through
``seg_core.inference.Segmenter``, the code predict, serve and evaluate run.

- **Speed**: images/s of ``Segmenter.predict_batch`` on 4 grey 256² crops of the ISBI val slices
  (one forward of 4 windows, pre- and post-processing included), engines timed in alternation
  with every core.  A lite model that was never trained is still timed (random weights).
- **Masks**: pixel agreement with torch eager, and membrane Dice against the ground truth on the
  6 full-size val slices (512², resized to the model's 256² as in training).
- **INT8** calibrates on the 24 training slices (prepared as training prepares them), written to
  the artifact's ``calibration.npz`` when the model predates rayseg storing them.

The baseline is torch eager on the same model.  ``ratio`` is the fastest shipped engine's images/s
over torch eager's, base U-Net at 256²; an engine ships when its masks agree with torch on >= 99.9%
of pixels (float) or lose <= 0.005 membrane Dice (INT8).  The models are copied to a temporary
directory; the data never enters the repo.
"""
from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import Context
from benchmarks.common import result, time_interleaved
from benchmarks.quality_isbi import MEMBRANE, model_dir_for

ENGINES = ("torch", "openvino", "onnxruntime", "openvino-int8", "onnxruntime-int8")
CROP = 256
PARITY = 0.999          # float engines: share of pixels that agree with torch
INT8_DICE_LOSS = 0.005  # INT8 engines: membrane Dice they may lose


def load_isbi(ctx: Context) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """(train images, [(val image, val mask)]) from the fixed manifest split."""
    from PIL import Image

    manifest = ctx.isbi_manifest()
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    read = lambda name: np.asarray(Image.open(manifest.parent / name))  # noqa: E731
    train = [read(r["image"]) for r in rows if r["split"] == "train"]
    val = [(read(r["image"]), read(r["mask"])) for r in rows if r["split"] == "val"]
    return train, val


def membrane_dice(masks: list[np.ndarray], val: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Dice of class 0 (membrane: mask value 0) over all val pixels together."""
    inter = sum(int(((m == MEMBRANE) & (t == 0)).sum()) for m, (_, t) in zip(masks, val))
    total = sum(int((m == MEMBRANE).sum() + (t == 0).sum()) for m, (_, t) in zip(masks, val))
    return 2 * inter / max(total, 1)


def model_copy(ctx: Context, arch: str, work: Path, train: list[np.ndarray]
               ) -> tuple[Path, bool]:
    """A private copy of the ISBI model of ``arch`` with calibration images; (dir, trained).
    Without a trained model, a freshly initialised one (timed only)."""
    from seg_core.artifact import load_artifact, save_artifact
    from seg_core.config import MaskSpec, ModelConfig, Preprocessing
    from seg_core.inference import prepare_image
    from seg_core.model import UNet
    from seg_core.runtimes import CALIBRATION_FILE, save_calibration

    source, target = model_dir_for(ctx, arch), work / arch
    if (source / "artifact.json").is_file():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("engines"))
        trained = True
    else:
        torch.manual_seed(0)
        model = UNet(ModelConfig(in_channels=1, num_classes=2, arch=arch)).eval()
        save_artifact(target, model, name=f"untrained-{arch}", version="0",
                      mask_spec=MaskSpec(2, class_names=("membrane", "cell")),
                      preprocessing=Preprocessing(channels=1, mean=(0.5,), std=(0.2,),
                                                  resize=(256, 256), train_size=(256, 256)))
        trained = False
    if not (target / CALIBRATION_FILE).is_file():
        pre = load_artifact(target).preprocessing
        save_calibration(target, [prepare_image(image, pre).numpy() for image in train])
    return target, trained


def measure(directory: Path, val: list[tuple[np.ndarray, np.ndarray]], trained: bool,
            repeats: int) -> dict[str, dict[str, float]]:
    """Per engine: images/s at 256², and (trained models) agreement and membrane Dice."""
    from seg_core.artifact import load_artifact
    from seg_core.inference import Segmenter

    artifact = load_artifact(directory)
    segmenters = {engine: Segmenter(artifact, engine=engine) for engine in ENGINES}
    crops = [image[:CROP, :CROP] for image, _ in val[:4]]
    calls = {engine: (lambda s=s: s.predict_batch(crops)) for engine, s in segmenters.items()}
    seconds = time_interleaved(calls, torch.device("cpu"), warmup=2, repeats=repeats)
    results = {engine: {"images_per_s": round(len(crops) / seconds[engine], 2)}
               for engine in ENGINES}
    if trained:
        images = [image for image, _ in val]
        masks = {engine: [p.mask for p in s.predict_batch(images)]
                 for engine, s in segmenters.items()}
        for engine in ENGINES:
            agree = np.mean([(a == b).mean() for a, b in zip(masks[engine], masks["torch"])])
            results[engine]["agreement"] = round(float(agree), 5)
            results[engine]["membrane_dice"] = round(membrane_dice(masks[engine], val), 4)
    return results


def shipped(engine: str, figures: dict[str, float], torch_figures: dict[str, float]) -> bool:
    """Whether ``engine`` meets its bar against torch (see the module docstring)."""
    if "agreement" not in figures:   # an untrained model: nothing to judge by
        return False
    if engine.endswith("-int8"):
        return figures["membrane_dice"] >= torch_figures["membrane_dice"] - INT8_DICE_LOSS
    return figures["agreement"] >= PARITY


def run(ctx: Context) -> dict[str, Any]:
    repeats = 2 if ctx.quick else 20
    train, val = load_isbi(ctx)
    figures: dict[str, Any] = {"threads": torch.get_num_threads(), "crop": CROP}
    with tempfile.TemporaryDirectory(prefix="rayseg-engines-") as work:
        for arch in ("unet", "lite"):
            directory, trained = model_copy(ctx, arch, Path(work), train)
            results = measure(directory, val, trained, repeats)
            figures[f"{arch}_trained"] = trained
            for engine, values in results.items():
                for key, value in values.items():
                    figures[f"{arch}_{engine}_{key}"] = value
                if engine != "torch":
                    figures[f"{arch}_{engine}_shipped"] = shipped(engine, values,
                                                                 results["torch"])
    fastest = max((e for e in ENGINES if e != "torch" and figures[f"unet_{e}_shipped"]),
                  key=lambda e: figures[f"unet_{e}_images_per_s"], default="torch")
    figures["fastest_shipped"] = fastest
    return result("engines", figures, (f"unet_{fastest}_images_per_s", "/",
                                       "unet_torch_images_per_s"),
                  ">=2.0 (fastest shipped engine / torch eager images/s, same folded network, "
                  "base U-Net, 256²; float masks agree >= 99.9%, INT8 loses <= 0.005 Dice)")
