"""``ModelPerformance``: the metrics object of the H2O-style API.

Built either from a ``rayseg evaluate`` report (``model.model_performance(frame)`` runs the same
scorer, so the numbers are the CLI's) or from the validation metrics recorded at training
(``model.model_performance()``).  Per-class scores come from integer counts summed over every
pixel of every image (the ``macro`` reduction: per class, then the mean over classes); the
empty-mask policy is stated in :attr:`ModelPerformance.empty_policy`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence

from pipelines import storage

if TYPE_CHECKING:
    import pandas

PlotKind = Literal["per_class", "learning_curve", "confusion_matrix"]
SCORES = ("iou", "dice", "precision", "recall")


@dataclass(frozen=True)
class ModelPerformance:
    """Segmentation scores of one model on one set of images."""

    class_names: tuple[str, ...]
    per_class: dict[str, list[float | None]]       # iou, dice, precision, recall, support
    headline: dict[str, float | None]              # miou, mdice, pixel_accuracy, micro_iou ...
    empty_policy: str
    source: str                                    # "evaluate" or "training"
    confusion: list[list[int]] | None = None       # K x K, rows = truth, columns = prediction
    images: int | None = None
    report_dir: str | None = None                  # report.json / report.md / overlays/
    history: tuple[dict[str, Any], ...] = ()
    report: dict[str, Any] = field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------------- constructors
    @classmethod
    def from_report(cls, report: dict[str, Any], report_dir: str | None = None,
                    history: Sequence[dict[str, Any]] = ()) -> "ModelPerformance":
        """From the dict ``rayseg evaluate`` writes as ``report.json``."""
        macro, micro = report["metrics"]["macro"], report["metrics"]["micro"]
        per_image = report["metrics"]["per_image"]
        return cls(
            class_names=tuple(report["class_names"]),
            per_class={k: list(macro["per_class"][k]) for k in (*SCORES, "support")},
            headline={"miou": macro["iou"], "mdice": macro["dice"],
                      "mprecision": macro["precision"], "mrecall": macro["recall"],
                      "pixel_accuracy": macro["pixel_accuracy"], "micro_iou": micro["iou"],
                      "micro_dice": micro["dice"], "per_image_iou": per_image["iou"]},
            empty_policy=report["empty_policy"], source="evaluate",
            confusion=report.get("confusion_matrix"), images=report["images_scored"],
            report_dir=report_dir, history=tuple(history), report=report)

    @classmethod
    def from_training(cls, val: dict[str, Any], history: Sequence[dict[str, Any]] = (),
                      artifact_uri: str | None = None) -> "ModelPerformance":
        """From the validation block ``pipelines.train.train`` records for the saved weights."""
        per_class = val["per_class"]
        return cls(
            class_names=tuple(val["class_names"]),
            per_class={k: list(per_class[k]) for k in (*SCORES, "support") if k in per_class},
            headline={"miou": val["miou"], "mdice": val["mdice"],
                      "pixel_accuracy": val["pixel_accuracy"],
                      "micro_iou": val.get("iou_pooled"), "micro_dice": val.get("dice_pooled")},
            empty_policy=val.get("empty_policy", "nan"), source="training",
            report_dir=artifact_uri, history=tuple(history), report=dict(val))

    # ----------------------------------------------------------------------- scores
    def mean_iou(self) -> float:
        """Mean over classes of per-class IoU (mIoU)."""
        return self.headline["miou"]

    def mean_dice(self) -> float:
        """Mean over classes of per-class Dice (= F1)."""
        return self.headline["mdice"]

    def pixel_accuracy(self) -> float:
        """Share of labelled pixels predicted right."""
        return self.headline["pixel_accuracy"]

    def iou(self) -> dict[str, float | None]:
        """Per-class IoU, by class name."""
        return self._by_class("iou")

    def dice(self) -> dict[str, float | None]:
        """Per-class Dice, by class name."""
        return self._by_class("dice")

    def f1(self) -> dict[str, float | None]:
        """Per-class F1 (identical to Dice for segmentation masks)."""
        return self._by_class("dice")

    def precision(self) -> dict[str, float | None]:
        """Per-class precision, by class name."""
        return self._by_class("precision")

    def recall(self) -> dict[str, float | None]:
        """Per-class recall, by class name."""
        return self._by_class("recall")

    def metrics_table(self) -> "pandas.DataFrame":
        """One row per class: iou, dice, precision, recall, support (truth pixels)."""
        import pandas

        columns = [k for k in (*SCORES, "support") if k in self.per_class]
        return pandas.DataFrame({k: self.per_class[k] for k in columns},
                                index=list(self.class_names))

    def confusion_matrix(self) -> "pandas.DataFrame":
        """Pixel counts, rows = truth class, columns = predicted class (multi-class only)."""
        import pandas

        if self.confusion is None:
            raise ValueError("no confusion matrix: multi-label masks have none (classes overlap), "
                             "and the training record keeps counts only; score a frame with "
                             "model_performance(frame)")
        names = list(self.class_names)
        return pandas.DataFrame(self.confusion, index=pandas.Index(names, name="truth"),
                                columns=pandas.Index(names, name="predicted"))

    def as_dict(self) -> dict[str, Any]:
        """Headline and per-class scores as plain data."""
        return {"headline": dict(self.headline), "class_names": list(self.class_names),
                "per_class": {k: list(v) for k, v in self.per_class.items()},
                "empty_policy": self.empty_policy, "source": self.source, "images": self.images}

    def _by_class(self, score: str) -> dict[str, float | None]:
        return dict(zip(self.class_names, self.per_class[score]))

    # ----------------------------------------------------------------------- plots
    def plot(self, kind: PlotKind = "per_class", path: str | None = None) -> str:
        """Save a PNG and return its path: per-class bars, the learning curve, or the
        confusion matrix.  Default path: ``<report_dir>/<kind>.png`` (local)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        target = path or storage.join_uri(self.report_dir or ".", f"{kind}.png")
        if kind == "learning_curve":
            if not self.history:
                raise ValueError("no learning curve: this performance object has no training "
                                 "history (use model.model_performance() after train())")
            from pipelines.evaluate.plots import learning_curve_png

            return str(learning_curve_png(list(self.history), storage.strip_scheme(target)))
        fig, axis = plt.subplots(figsize=(max(4.0, 1.4 * len(self.class_names) + 2), 3.4),
                                 constrained_layout=True)
        if kind == "per_class":
            self._bars(axis)
        elif kind == "confusion_matrix":
            self._matrix(axis)
        else:
            raise ValueError(f"plot: kind must be per_class, learning_curve or confusion_matrix, "
                             f"got {kind!r}")
        import io

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        storage.write_bytes(target, buffer.getvalue())
        return target

    def _bars(self, axis: Any) -> None:
        import numpy as np

        x = np.arange(len(self.class_names))
        width = 0.8 / len(SCORES)
        for i, score in enumerate(SCORES):
            values = [math.nan if v is None else v for v in self.per_class[score]]
            axis.bar(x + (i - 1.5) * width, values, width, label=score)
        axis.set_xticks(x, list(self.class_names))
        axis.set_ylim(0, 1)
        axis.set_title(f"per-class scores (mIoU {self.mean_iou():.3f})")
        axis.legend(fontsize=8, ncols=len(SCORES))

    def _matrix(self, axis: Any) -> None:
        matrix = self.confusion_matrix()
        axis.imshow(matrix.to_numpy(), cmap="Blues")
        axis.set_xticks(range(len(matrix)), list(matrix.columns), rotation=30)
        axis.set_yticks(range(len(matrix)), list(matrix.index))
        axis.set_xlabel("predicted")
        axis.set_ylabel("truth")

    # ----------------------------------------------------------------------- display
    def __repr__(self) -> str:
        head = (f"ModelPerformance ({self.source}"
                f"{f', {self.images} images' if self.images is not None else ''}; "
                f"empty-mask policy {self.empty_policy})\n"
                f"mIoU {_fmt(self.headline['miou'])}  mDice {_fmt(self.headline['mdice'])}  "
                f"pixel accuracy {_fmt(self.headline['pixel_accuracy'])}")
        return f"{head}\n{self.metrics_table().to_string(float_format=lambda v: f'{v:.4f}')}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.4f}"


def evaluate_frame(model_uri: str, manifest: str, out: str, *, predictions: str | None = None,
                   history: Sequence[dict[str, Any]] = ()) -> ModelPerformance:
    """Score every row of ``manifest`` with the ``rayseg evaluate`` code path."""
    from pipelines.evaluate.evaluate import EvaluateConfig, run_evaluate

    cfg = EvaluateConfig(manifest=manifest, out=out, model=model_uri, predictions=predictions,
                         split=None, progress=False)
    report = run_evaluate(cfg, log=lambda line: None)
    return ModelPerformance.from_report(json.loads(json.dumps(report, default=str)),
                                        report_dir=out, history=history)
