"""Learning-curve figure saved next to each trained artifact (loss, val mIoU and learning rate)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def learning_curve_png(history: Sequence[dict[str, Any]], path: str | Path, *,
                       title: str = "") -> Path:
    """Plot per-epoch ``train_loss``, ``val_miou`` and ``lr`` from ``history`` into a PNG.

    ``history`` is the list of per-epoch records kept in the checkpoint (keys ``epoch``,
    ``step``, ``train_loss``, ``val_miou``, ``lr``).  The x axis is the optimizer step at the end
    of each epoch, so a run stopped by ``max_iterations`` mid-epoch still plots correctly.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on workers or CI
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), constrained_layout=True)
    panels = (("train_loss", "train loss", "tab:blue"),
              ("val_miou", "val mIoU", "tab:green"),
              ("lr", "learning rate (end of epoch)", "tab:orange"))
    for axis, (key, label, colour) in zip(axes, panels):
        values = [h.get(key) for h in history]
        points = [(s, v) for s, v in zip(steps, values) if v is not None]
        if points:
            xs, ys = zip(*points)
            axis.plot(xs, ys, marker="o", markersize=3, color=colour)
        axis.set_title(label)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    axes[1].set_ylim(0.0, 1.0)
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def reliability_png(bins: dict[str, list[float]], path: str | Path, *, ece: float,
                    title: str = "") -> Path:
    """The reliability diagram of pixel confidence: per bin, how often the mask was right
    against how sure it was (the diagonal is perfect calibration), with each bin's share of
    the pixels below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(bins["pixels"])
    edges = [i / count for i in range(count)]
    total = max(sum(bins["pixels"]), 1)
    used = [p > 0 for p in bins["pixels"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 5.6), sharex=True, height_ratios=[3, 1],
                                      constrained_layout=True)
    top.bar(edges, [a if u else 0 for a, u in zip(bins["accuracy"], used)], width=1 / count,
            align="edge", color="tab:blue", edgecolor="white", label="accuracy")
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    top.set_ylabel("pixels right")
    top.set_ylim(0, 1)
    top.set_title(f"{title} pixel ECE {ece:.4f}".strip())
    top.legend(loc="upper left")
    bottom.bar(edges, [p / total for p in bins["pixels"]], width=1 / count, align="edge",
               color="tab:grey", edgecolor="white")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("share of pixels")
    bottom.set_xlim(0, 1)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
