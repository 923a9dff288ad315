"""``rayseg runs``: every tracked training run in one place (the registry's MLflow store).

:func:`runs_table` lists runs newest first (name, start, wall time, key settings, best val
scores, registered model); :func:`compare` puts chosen runs side by side, settings that differ
first; :func:`plot_curves` draws their val mIoU and train loss per epoch on one figure.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pipelines import registry

if TYPE_CHECKING:
    import pandas

# settings shown in the list (flattened TrainConfig keys), by the column name they get
KEY_PARAMS = {"model.arch": "arch", "model.base_width": "width", "model.depth": "depth",
              "loss": "loss", "optim.lr": "lr", "batch_size": "batch", "epochs": "epochs",
              "init_from": "init_from"}


def _row(run: Any) -> dict[str, Any]:
    info, data = run.info, run.data
    started = dt.datetime.fromtimestamp(info.start_time / 1000, dt.timezone.utc)
    wall = (info.end_time - info.start_time) / 1000 if info.end_time else None
    return {"run": info.run_name, "started": started.strftime("%Y-%m-%d %H:%M"),
            "wall_s": None if wall is None else round(wall, 1),
            **{label: data.params.get(key) for key, label in KEY_PARAMS.items()},
            "val_miou": _round(data.metrics.get("final_miou")),
            "val_mdice": _round(data.metrics.get("final_mdice")),
            "artifact": data.tags.get("artifact_uri"), "run_id": info.run_id}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def runs_table(limit: int = 50) -> "pandas.DataFrame":
    """The newest ``limit`` training runs, one row each."""
    import pandas

    return pandas.DataFrame([_row(run) for run in registry.training_runs(limit)])


def find_runs(names: Sequence[str], limit: int = 1000) -> list[Any]:
    """Runs by name (the newest of each name) or run id, in the order given."""
    runs = registry.training_runs(limit)
    found = []
    for name in names:
        match = next((r for r in runs if name in (r.info.run_name, r.info.run_id)), None)
        if match is None:
            known = ", ".join(r.info.run_name for r in runs[:10])
            raise KeyError(f"no tracked run named {name!r} in {registry.tracking_uri()}; "
                           f"newest: {known}")
        found.append(match)
    return found


def compare(names: Sequence[str]) -> "pandas.DataFrame":
    """Settings and final metrics of the runs side by side (one column per run): settings
    that differ first, then the metrics."""
    import pandas

    runs = find_runs(names)
    keys = sorted(set().union(*(r.data.params for r in runs)))
    differ = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    rows = {k: [r.data.params.get(k) for r in runs] for k in differ}
    metrics = sorted({k for r in runs for k in r.data.metrics if k.startswith("final_")})
    rows.update({k: [_round(r.data.metrics.get(k)) for r in runs] for k in metrics})
    rows["wall_s"] = [_row(r)["wall_s"] for r in runs]
    return pandas.DataFrame(rows, index=[r.info.run_name for r in runs]).T


def plot_curves(names: Sequence[str], out: str | Path) -> Path:
    """Val mIoU and train loss per epoch of each run, one line per run; returns the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = find_runs(names)
    fig, (iou_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for run in runs:
        for ax, key in ((iou_ax, "val_miou"), (loss_ax, "train_loss")):
            points = registry.metric_history(run.info.run_id, key)
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=run.info.run_name)
    iou_ax.set(title="val mIoU", xlabel="epoch")
    loss_ax.set(title="train loss", xlabel="epoch")
    iou_ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
