"""``rayseg rank``: which unlabelled images would teach the model most (issue 34).

A Ray Data actor pool (the artifact opened once per actor, as for ``rayseg predict``) scores
every input image by how unsure the model is of it (:func:`seg_core.active.uncertainty_score`:
mean pixel ``entropy``, ``margin`` between the two likeliest classes, or ``tta`` disagreement
over the square's symmetries; ``balanced_entropy``, the default, is scored on the driver from
each image's per-class doubt, :func:`seg_core.active.balanced_scores`, so that images unsure
about a rare class come first) and embeds it (:func:`seg_core.active.embedding`, pooled bottleneck
features).  The driver then ranks them (:func:`seg_core.active.rank`: most uncertain first,
near-duplicates of a pick skipped) and writes, under ``--out``:

- ``ranked.parquet`` (:data:`pipelines.records.RANK_SCHEMA`): every image with its score, its
  rank in the picks (null: not picked, or a near-duplicate), and images that could not be read
  with their reason: rows in = rows out;
- ``contact_sheet.png``: the picks' thumbnails with rank and score, for a look before labelling.

Embeddings (a few hundred floats an image) come back to the driver, so a pool of a million
images holds about a gigabyte there: rank a shard of the pool at a time beyond that.
"""
from __future__ import annotations

import io
import math
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pipelines import registry, storage
from pipelines.config import RankConfig
from pipelines.model import open_model
from pipelines.predict.inputs import map_with_actors, plan_inputs
from pipelines.records import RANK_SCHEMA, refusal
from seg_core.errors import InputError

RANKED_FILE = "ranked.parquet"
SHEET_FILE = "contact_sheet.png"
THUMB = 128            # contact sheet thumbnail side, pixels
SHEET_COLUMNS = 8


class Scorer:
    """Ray Data callable class: one score and one embedding per image (or its refusal)."""

    def __init__(self, model_uri: str, by: str, storage_options: dict[str, Any] | None) -> None:
        import torch

        torch.set_num_threads(1)
        self.model = open_model(model_uri, storage_options=storage_options, engine="torch")
        self.by = by

    def __call__(self, batch: pa.Table) -> pa.Table:
        from seg_core.active import class_entropy, embedding, tta_masks, uncertainty_score

        out = []
        for row in batch.to_pylist():
            base = {"id": row["id"], "source_uri": row.get("image_uri"), "rank": None,
                    "class_entropy": None, "class_share": None}
            try:
                if (refused := refusal(row.get("refused"))) is not None:
                    raise refused
                image = self.model.decode(row.get("image_bytes"), row.get("image_uri") or row["id"])
                segmenter = self.model.segmenter
                if self.by == "tta":
                    score = uncertainty_score(tta_masks(segmenter, image), by="tta")
                else:
                    prediction = segmenter.predict(image, fields=frozenset(
                        {"mask", "probs", "entropy"}))
                    doubt, share = class_entropy(prediction).tolist()
                    base.update(class_entropy=doubt, class_share=share)
                    # balanced_entropy needs the whole pool: run_rank scores it
                    score = uncertainty_score(prediction, by="entropy" if self.by == (
                        "balanced_entropy") else self.by)  # type: ignore[arg-type]
                vector = embedding(segmenter, image)
            except InputError as error:
                out.append({**base, "score": None, "embedding": None, "reason": error.reason,
                            "message": str(error)})
                continue
            out.append({**base, "score": float(score),
                        "embedding": np.asarray(vector, np.float32).tolist(),
                        "reason": None, "message": None})
        return pa.Table.from_pylist(out, schema=RANK_SCHEMA)


def run_rank(cfg: RankConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score, rank and write (module docstring); returns the summary."""
    from ray.data import DataContext

    from seg_core.active import balanced_scores, rank

    started = time.perf_counter()
    DataContext.get_current().enable_progress_bars = cfg.progress
    source = registry.resolve(cfg.model).source
    options = storage.resolve_options()
    plan = plan_inputs(cfg.input, pa.array([], pa.string()), split=cfg.split)
    log(f"rank: {len(plan.ids)} images by {cfg.by}; the top {cfg.top} -> {cfg.out}")
    scored = map_with_actors(plan, Scorer, kwargs={"model_uri": source, "by": cfg.by,
                                                   "storage_options": options},
                             schema=RANK_SCHEMA, batch_size=8, actors=cfg.actors,
                             log=log, what="rank")
    rows = scored.to_pylist()
    good = [i for i, r in enumerate(rows) if r["reason"] is None]
    if cfg.by == "balanced_entropy":
        for i, score in zip(good, balanced_scores(np.asarray(
                [[rows[i]["class_entropy"], rows[i]["class_share"]] for i in good],
                np.float64).reshape(len(good), 2, -1))):
            rows[i]["score"] = float(score)
    picks = rank([rows[i]["score"] for i in good],
                 np.asarray([rows[i]["embedding"] for i in good], np.float32).reshape(
                     len(good), -1), cfg.top, min_distance=cfg.min_distance)
    for place, index in enumerate(picks, 1):
        rows[good[index]]["rank"] = place
    rows.sort(key=lambda r: (r["rank"] is None, r["rank"] or 0, -(r["score"] or -math.inf),
                             r["id"]))
    table = pa.Table.from_pylist(rows, schema=RANK_SCHEMA)
    storage.write_bytes(storage.join_uri(cfg.out, RANKED_FILE), storage.parquet_bytes(
        table.drop_columns(["embedding"]) if not cfg.keep_embeddings else table, "zstd"))
    picked = [r for r in rows if r["rank"] is not None]
    storage.write_bytes(storage.join_uri(cfg.out, SHEET_FILE), contact_sheet(picked, options))
    summary = {"images": len(rows), "scored": len(good), "refused": len(rows) - len(good),
               "picked": len(picked), "near_duplicates_skipped": _skipped(rows, picked),
               "seconds": round(time.perf_counter() - started, 2)}
    log(f"rank: {summary['scored']} scored, {summary['refused']} unreadable (reasons in "
        f"{RANKED_FILE}), {summary['picked']} picked; {SHEET_FILE} and {RANKED_FILE} in "
        f"{cfg.out} ({summary['seconds']} s)")
    return summary


def contact_sheet(picked: list[dict[str, Any]], options: dict[str, Any] | None) -> bytes:
    """A PNG grid of the picks' thumbnails, each captioned with its rank and score."""
    from PIL import Image, ImageDraw

    from seg_core.codecs import decode_image

    columns = max(1, min(SHEET_COLUMNS, len(picked)))
    rows = max(1, math.ceil(len(picked) / columns))
    sheet = Image.new("RGB", (columns * THUMB, rows * (THUMB + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for place, row in enumerate(picked):
        x, y = (place % columns) * THUMB, (place // columns) * (THUMB + 14)
        try:
            pixels = decode_image(storage.read_bytes(row["source_uri"], options))
            pixels = pixels if pixels.dtype == np.uint8 else (pixels >> 8).astype(np.uint8)
            thumb = Image.fromarray(pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., 0])
            thumb.thumbnail((THUMB, THUMB))
            sheet.paste(thumb.convert("RGB"), (x, y))
        except (OSError, InputError, TypeError):
            draw.text((x + 4, y + THUMB // 2), "unreadable", fill="red")
        draw.text((x + 2, y + THUMB), f"#{row['rank']} {row['score']:.3f}", fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _skipped(rows: list[dict[str, Any]], picked: list[dict[str, Any]]) -> int:
    """Images more uncertain than the last pick that were passed over as near-duplicates."""
    if not picked:
        return 0
    floor = min(r["score"] for r in picked)
    return sum(1 for r in rows if r["rank"] is None and r["score"] is not None
               and r["score"] > floor)
