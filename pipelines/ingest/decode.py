"""The decode step that splits off bad rows: bytes -> arrays under the limits, or a quarantine row
with its reason."""
from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.records import PAIR_SCHEMA, quarantine_row, refusal
from seg_core.codecs import decode_image, decode_mask, DEFAULT_MAX_PIXELS
from seg_core.config import MaskSpec
from seg_core.errors import InputError


def decode_pair(image_bytes: bytes | None, mask_bytes: bytes | None, spec: MaskSpec, *,
                image_uri: str | None = None, mask_uri: str | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, refused: str | None = None,
                tiff_page: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode and cross-check one pair -> (H x W x C image, H x W or K x H x W mask).

    Raises :class:`InputError` for every kind of bad pair (refused path or file, missing file,
    undecodable bytes, lossy mask, unknown label, pixel limit, size mismatch).
    """
    if (error := refusal(refused)) is not None:
        raise error
    image_src, mask_src = image_uri or "<image>", mask_uri or "<mask>"
    if image_bytes is None:
        raise InputError("missing_image", "no image file for this mask", source=image_src,
                         hint="check the image path, or remove the row from the manifest")
    if mask_bytes is None:
        raise InputError("missing_mask", "no mask file for this image", source=mask_src,
                         hint="add the mask (same stem under masks/) or drop the image")
    image = decode_image(image_bytes, source=image_src, max_pixels=max_pixels, tiff_page=tiff_page)
    mask = decode_mask(mask_bytes, spec, source=mask_src, max_pixels=max_pixels)
    if image.shape[:2] != mask.shape[-2:]:
        raise InputError("size_mismatch", f"image is {image.shape[0]}x{image.shape[1]} (HxW), "
                         f"mask is {mask.shape[-2]}x{mask.shape[-1]}", source=mask_src,
                         hint="masks must have exactly the image's height and width")
    return image, mask


def decode_pairs(batch: dict[str, np.ndarray], mask_spec: MaskSpec,
                 max_pixels: int = DEFAULT_MAX_PIXELS, *, stage: str = "decode",
                 tiff_page: int | None = None
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Decode a batch of fetched rows -> ``(ok_rows, quarantine_rows)``; never raises on bad data.

    ``ok_rows`` keep ``id, image_uri, mask_uri, split, fold`` and add ``image`` / ``mask`` arrays;
    ``quarantine_rows`` follow :data:`records.QUARANTINE_SCHEMA`.  ``len(ok) + len(bad)`` always
    equals the batch size.
    """
    ok, bad = [], []
    for i in range(len(batch["id"])):
        row = {k: _scalar(batch[k][i]) for k in PAIR_SCHEMA.names if k in batch}
        try:
            image, mask = decode_pair(_scalar(batch["image_bytes"][i]), _scalar(batch["mask_bytes"][i]),
                                      mask_spec, image_uri=row.get("image_uri"),
                                      mask_uri=row.get("mask_uri"), max_pixels=max_pixels,
                                      refused=row.get("refused"), tiff_page=tiff_page)
        except InputError as error:
            bad.append(quarantine_row(row, error, stage))
            continue
        ok.append({**row, "image": image, "mask": mask})
    return ok, bad


def _scalar(value: Any) -> Any:
    """numpy scalars/None from a numpy batch -> plain Python values."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value
