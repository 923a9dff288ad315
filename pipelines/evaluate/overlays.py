"""Side-by-side overlay PNGs for evaluation: image | truth | prediction | errors.

Masks are coloured with the spec's palette (or a fixed default) and blended over the image;
the error panel marks wrong pixels in red and ignored pixels in grey.  Large images are shrunk
so each panel is at most ``max_side`` pixels, nearest-neighbour for masks.  Images are decoded
under the predicting model's limits (:class:`pipelines.model.InputLimits`: ``max_pixels``,
``tiff_page``); an image refused there gets no overlay, and its reason is reported instead.  PIL only, no
matplotlib: these are written for every evaluation and must stay cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from pipelines import storage
from pipelines.model import InputLimits
from pipelines.records import decode_prediction, refusal
from seg_core.errors import InputError

if TYPE_CHECKING:
    from seg_core.config import MaskSpec

DEFAULT_PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                   (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60))
_ALPHA = 0.5
_CAPTION = 16  # pixels above the panels for the caption


def render_overlays(ids: list[str], group: str, *, truth: pa.Table, predictions: pa.Table,
                    spec: "MaskSpec", scores: dict[str, float], out_dir: str,
                    limits: InputLimits, max_side: int = 384
                    ) -> tuple[list[str | None], list[dict[str, str]]]:
    """Write one ``<group>_<rank>_<id>.png`` per id under ``out_dir``.

    ``predictions``: rows with ``id``, ``mask_png`` and ``class_mask_pngs`` (truth ids).
    Returns the relative paths in ``ids`` order (``None`` where the image was refused) and the
    refusals (``id``, ``reason``, ``message``).
    """
    from pipelines.ingest import read_limited, read_mask

    if not ids:
        return [], []
    rows = predictions.filter(pc.is_in(predictions["id"], value_set=pa.array(ids, pa.string())))
    by_id = {r["id"]: r for r in rows.to_pylist()}
    columns = [c for c in ("id", "image_uri", "mask_uri", "refused") if c in truth.column_names]
    uris = {r["id"]: r for r in truth.select(columns).to_pylist()}
    paths: list[str | None] = []
    refused: list[dict[str, str]] = []
    for rank, image_id in enumerate(ids):
        image_uri = uris[image_id]["image_uri"]
        try:
            if (policy := refusal(uris[image_id].get("refused"))) is not None:
                raise policy   # a path ingest's policy refuses
            image = limits.decode(read_limited(image_uri), image_uri)
        except InputError as error:
            paths.append(None)
            refused.append({"id": image_id, "reason": error.reason, "message": str(error)})
            continue
        mask_uri = uris[image_id]["mask_uri"]
        truth_mask = read_mask(mask_uri, spec)  # multi-label: one file per class (+ ignore=)
        panel = side_by_side(image, truth_mask, decode_prediction(by_id[image_id], spec), spec,
                             caption=f"{group} #{rank + 1}: {image_id}  mean IoU "
                                     f"{scores.get(image_id, float('nan')):.4f}",
                             max_side=max_side)
        name = f"{group}_{rank + 1}_{_safe(image_id)}.png"
        storage.write_bytes(storage.join_uri(out_dir, name), _png(panel))
        paths.append(f"overlays/{name}")
    return paths, refused


def side_by_side(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, spec: "MaskSpec", *,
                 caption: str = "", max_side: int = 384) -> np.ndarray:
    """RGB uint8 array: caption strip over [image | truth overlay | prediction overlay | errors]."""
    rgb = _to_rgb(image)
    truth_rgb = _colour(truth, spec)
    pred_rgb = _colour(pred, spec)
    valid = truth != spec.ignore_index
    wrong = (truth != pred) & valid
    if spec.multilabel:  # K x H x W: a pixel is wrong if any class is
        valid, wrong = valid.all(axis=0), wrong.any(axis=0)
    errors = (rgb * 0.4).astype(np.uint8)
    errors[wrong] = (230, 25, 25)
    errors[~valid] = (128, 128, 128)
    panels = [rgb, _blend(rgb, truth_rgb), _blend(rgb, pred_rgb), errors]
    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = [np.asarray(Image.fromarray(p).resize(size, Image.NEAREST)) for p in panels]
    strip = np.concatenate(resized, axis=1)
    canvas = Image.new("RGB", (strip.shape[1], strip.shape[0] + _CAPTION), (255, 255, 255))
    canvas.paste(Image.fromarray(strip), (0, _CAPTION))
    labels = ("image", "truth", "prediction", "errors")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), caption, fill=(0, 0, 0))
    for i, label in enumerate(labels):
        draw.text((i * size[0] + 2, _CAPTION + 2), label, fill=(255, 255, 255))
    return np.asarray(canvas)


def _colour(mask: np.ndarray, spec: "MaskSpec") -> np.ndarray:
    palette = np.asarray(spec.palette or DEFAULT_PALETTE, dtype=np.float32)
    palette = np.resize(palette, (max(spec.num_classes, 1), 3))
    if spec.multilabel:  # K x H x W: average the colours of the classes present
        on = (mask == 1).astype(np.float32)
        total = np.einsum("khw,kc->hwc", on, palette[: mask.shape[0]])
        count = np.maximum(on.sum(axis=0), 1.0)[..., None]
        return (total / count).astype(np.uint8)
    ids = np.where(mask == spec.ignore_index, 0, mask).astype(np.int64)
    return palette[np.clip(ids, 0, len(palette) - 1)].astype(np.uint8)


def _blend(rgb: np.ndarray, colour: np.ndarray) -> np.ndarray:
    return (rgb * (1 - _ALPHA) + colour * _ALPHA).astype(np.uint8)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    arr = image.astype(np.float32)
    if image.dtype == np.uint16:
        arr = arr / 257.0
    arr = arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr[..., :1], 3, axis=-1)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


def render_why(ids: list[str], classes: dict[str, int], *, truth: pa.Table,
               predictions: pa.Table, spec: "MaskSpec", model_uri: str, out_dir: str,
               limits: InputLimits, max_side: int = 384) -> tuple[list[str | None], str]:
    """``why_<rank>_<id>.png`` per id: the image and the Grad-CAM map (red) of the class it got
    most wrong (``classes``: id -> class), over the pixels predicted as it, or, when the model
    predicted it nowhere, over the truth's (what the model looked at there).  Returns the
    relative paths (``None`` for an image that could not be read) and, when no map could be
    made at all, why."""
    from pipelines.ingest import read_limited, read_mask
    from pipelines.model import open_model
    from seg_core.explain import explain

    if not ids:
        return [], ""
    try:
        model = open_model(model_uri, engine="torch")
    except Exception as error:  # noqa: BLE001 - the report stands without this panel
        return [None] * len(ids), (f"the model at {model_uri} could not be opened "
                                   f"({type(error).__name__}: {error})")
    rows = predictions.filter(pc.is_in(predictions["id"], value_set=pa.array(ids, pa.string())))
    by_id = {r["id"]: r for r in rows.to_pylist()}
    uris = {r["id"]: r for r in truth.select(["id", "image_uri", "mask_uri"]).to_pylist()}
    paths: list[str | None] = []
    for rank, image_id in enumerate(ids):
        target = classes[image_id]
        try:
            image = limits.decode(read_limited(uris[image_id]["image_uri"]),
                                  uris[image_id]["image_uri"])
            predicted = decode_prediction(by_id[image_id], spec)
            region = predicted[target] if spec.multilabel else predicted == target
            where = "predicted"
            if not region.any():
                true = read_mask(uris[image_id]["mask_uri"], spec)
                region, where = (true[target] == 1 if spec.multilabel else true == target), "true"
            if not region.any():   # neither predicted nor true here: nothing to explain
                paths.append(None)
                continue
            heat = explain(model.segmenter, image, target, region=region.astype(bool))
        except (InputError, KeyError, ValueError):
            paths.append(None)
            continue
        rgb = _to_rgb(image)
        red = np.zeros_like(rgb)
        red[..., 0] = 255
        alpha = np.clip(heat, 0.0, 1.0)[..., None] * 0.75
        panel = np.concatenate([rgb, (rgb * (1 - alpha) + red * alpha).astype(np.uint8)], axis=1)
        height, width = rgb.shape[:2]
        scale = min(1.0, max_side / max(height, width))
        size = (max(1, round(2 * width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", (size[0], size[1] + _CAPTION), (255, 255, 255))
        canvas.paste(Image.fromarray(panel).resize(size, Image.BILINEAR), (0, _CAPTION))
        ImageDraw.Draw(canvas).text(
            (2, 2), f"why {spec.names[target]} ({where} pixels): {image_id}", fill=(0, 0, 0))
        name = f"why_{rank + 1}_{_safe(image_id)}.png"
        storage.write_bytes(storage.join_uri(out_dir, name), _png(np.asarray(canvas)))
        paths.append(f"overlays/{name}")
    return paths, ""
