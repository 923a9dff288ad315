"""``rayseg explain``: attribution maps of one class for many images, as PNG cells in Parquet.

A Ray Data actor pool (the artifact opened once per actor, its torch network, as
``POST /v1/explain`` uses) computes :func:`seg_core.explain.explain` of ``--class`` for every
input image and returns, per image, the map as an 8-bit PNG at the image's size (Grad-CAM 0..1
as 0..255; the signed methods -1..1 with 0 at 128), the pixels predicted as the class, or the
reason the image could not be read: rows in = rows out.  The driver writes them to
``<out>/explanations.parquet`` (:data:`pipelines.records.EXPLANATION_SCHEMA`).

Maps are costly (Grad-CAM: a forward and a backward per window; occlusion: thousands of
forwards per window), so this is for the images a user wants to look at, hundreds rather than
millions: the rows come back to the driver whole.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import pyarrow as pa

from pipelines import registry, storage
from pipelines.config import ExplainConfig
from pipelines.model import open_model
from pipelines.predict.inputs import map_with_actors, plan_inputs
from pipelines.records import EXPLANATION_SCHEMA, refusal
from seg_core.errors import InputError

EXPLANATIONS_FILE = "explanations.parquet"


class Explainer:
    """Ray Data callable class: the map of one class for each image (or its refusal)."""

    def __init__(self, model_uri: str, target: int, method: str,
                 storage_options: dict[str, Any] | None) -> None:
        import torch

        torch.set_num_threads(1)
        self.model = open_model(model_uri, storage_options=storage_options, engine="torch")
        self.target, self.method = target, method
        self.name = self.model.mask_spec.names[target]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from seg_core.explain import explain, map_png

        out = []
        for row in batch.to_pylist():
            base = {"id": row["id"], "source_uri": row.get("image_uri"), "class": self.name,
                    "method": self.method}
            try:
                if (refused := refusal(row.get("refused"))) is not None:
                    raise refused
                image = self.model.decode(row.get("image_bytes"), row.get("image_uri") or row["id"])
                predicted = int((self.model.segmenter.predict(
                    image, fields=frozenset({"mask"})).mask == self.target).sum())
                png = map_png(explain(self.model.segmenter, image, self.target,
                                      method=self.method), self.method) if predicted else None
            except InputError as error:
                out.append({**base, "reason": error.reason, "message": str(error)})
                continue
            out.append({**base, "map_png": png, "height": int(image.shape[0]),
                        "width": int(image.shape[1]), "class_pixels": predicted,
                        "message": None if predicted else "the class is predicted nowhere "
                                                          "in this image: no map"})
        return pa.Table.from_pylist(out, schema=EXPLANATION_SCHEMA)


def run_explain(cfg: ExplainConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Maps for every input image (module docstring); returns the summary."""
    from ray.data import DataContext

    from pipelines.model import artifact_meta

    started = time.perf_counter()
    DataContext.get_current().enable_progress_bars = cfg.progress
    source = registry.resolve(cfg.model).source
    names = artifact_meta(source)["mask_spec"].get("class_names") or []
    count = artifact_meta(source)["mask_spec"]["num_classes"]
    names = list(names) or [f"class_{k}" for k in range(count)]
    if cfg.target_class in names:
        target = names.index(cfg.target_class)
    elif cfg.target_class.isdigit() and int(cfg.target_class) < count:
        target = int(cfg.target_class)
    else:
        raise ValueError(f"class {cfg.target_class!r} is not one of the model's: "
                         f"{', '.join(names)}")
    options = storage.resolve_options()
    plan = plan_inputs(cfg.input, pa.array([], pa.string()), split=cfg.split)
    log(f"explain: {len(plan.ids)} images, class {names[target]} by {cfg.method} -> {cfg.out}")
    table = map_with_actors(plan, Explainer, kwargs={
        "model_uri": source, "target": target, "method": cfg.method,
        "storage_options": options}, schema=EXPLANATION_SCHEMA, batch_size=4,
        actors=cfg.actors, log=log, what="explain")
    storage.write_bytes(storage.join_uri(cfg.out, EXPLANATIONS_FILE),
                        storage.parquet_bytes(table, {n: "none" if n == "map_png" else "zstd"
                                                      for n in table.column_names}))
    refused = sum(1 for r in table.column("reason").to_pylist() if r)
    mapped = sum(1 for p in table.column("map_png").to_pylist() if p)
    summary = {"images": table.num_rows, "maps": mapped, "refused": refused,
               "class": names[target], "seconds": round(time.perf_counter() - started, 2)}
    log(f"explain: {mapped} maps, {table.num_rows - mapped - refused} images without the class, "
        f"{refused} unreadable (reasons in {EXPLANATIONS_FILE}); {cfg.out} "
        f"({summary['seconds']} s)")
    return summary
