"""Bytes -> arrays for images and masks, and arrays -> PNG bytes.

Pure functions, no I/O: callers read the bytes (local file, S3, HTTP upload) and pass a ``source``
name so that every :class:`~seg_core.errors.InputError` says which file is bad.

- :func:`decode_image`: PNG, JPEG, BMP, GIF (first frame), TIFF (8/16-bit, one page) -> H x W x C
  (C in 1, 3, 4; uint8 or uint16), as displayed: an EXIF (or TIFF) orientation tag is applied,
  so a phone photo stored sideways comes out upright, the way annotators saw it when they drew
  its mask.  Palette images become RGB / RGBA.  A multi-page TIFF is refused (``multi_page``)
  unless ``tiff_page`` says which page is the image.
- :func:`decode_mask`: lossless masks only -> H x W int64 class ids (multi-class) or K x H x W
  uint8 {0, 1} (multi-label).  Masks are never re-oriented: they are drawn on the displayed
  image and saved without an orientation tag (PNG), so they match :func:`decode_image`.
- :func:`encode_png`: masks and previews back to PNG bytes.

Limits are checked from the header before any pixel is decoded (decompression bombs): H x W
against ``max_pixels`` and, for TIFF, the pages, samples per pixel, bits and sample format, so a
file of a few kB that declares 64 uint16 samples per pixel is refused without allocating them.  PIL's
own guard (``Image.MAX_IMAGE_PIXELS``) is left as is and mapped to the same reason, so the
effective limit is the smaller of the two.  A decoder that still runs out of memory is an
:class:`InputError` (``too_large``), not a crash.  ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay
False (PIL's default): truncation is detected when ``load()`` fails.
"""
from __future__ import annotations

from seg_core.codecs.image import (
    decode_image,
    encode_png,
)
from seg_core.codecs.limits import (
    Format,
    DEFAULT_MAX_PIXELS,
    SUPPORTED_FORMATS,
    LOSSY_FORMATS,
    sniff_format,
)
from seg_core.codecs.mask import (
    IGNORE_PART,
    pack_mask_parts,
    unpack_mask_parts,
    decode_instance_labels,
    decode_mask,
    instance_classes,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Format",
    "IGNORE_PART",
    "LOSSY_FORMATS",
    "SUPPORTED_FORMATS",
    "decode_image",
    "decode_instance_labels",
    "decode_mask",
    "encode_png",
    "instance_classes",
    "pack_mask_parts",
    "sniff_format",
    "unpack_mask_parts",
]
