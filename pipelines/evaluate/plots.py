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
