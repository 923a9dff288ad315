"""Image bytes -> arrays as displayed (:func:`decode_image`); arrays -> PNG bytes
(:func:`encode_png`)."""
from __future__ import annotations

import io

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from seg_core.codecs.limits import (
    _check_tiff_page,
    _DECODE_ERRORS,
    _describe,
    _MAX_MASK_CHANNELS,
    _out_of_memory,
    _too_many,
    _undecodable,
    DEFAULT_MAX_PIXELS,
    sniff_format,
    SUPPORTED_FORMATS,
)
from seg_core.errors import InputError

_ORIENTATION_TAG = 0x0112  # EXIF / TIFF Orientation, 1 (as stored) .. 8


def decode_image(data: bytes, *, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS,
                 tiff_page: int | None = None) -> np.ndarray:
    """Decode image bytes to an H x W x C array (C in 1, 3, 4; dtype uint8 or uint16).

    Grey stays 1 channel, grey+alpha becomes RGBA, palette becomes RGB (RGBA with transparency).
    The EXIF / TIFF orientation is applied (the array is the image as displayed).
    ``tiff_page`` (``Preprocessing.tiff_page``) picks the page of a multi-page TIFF; without it
    such a file is refused.  Raises InputError (empty_file, not_an_image, unsupported_format,
    too_many_pixels, truncated, corrupt, bad_channels, multi_page, too_large) naming ``source``.
    """
    try:
        arr = _decode(data, source=source, max_pixels=max_pixels, palette_indices=False,
                      tiff_page=tiff_page, is_image=True)
    except MemoryError as error:
        raise _out_of_memory(data, source) from error
    channels = arr.shape[2]
    if channels == 2:  # grey + alpha
        arr = np.concatenate([arr[..., :1]] * 3 + [arr[..., 1:]], axis=2)
    elif channels not in (1, 3, 4):
        raise InputError("bad_channels", f"image has {channels} channels, expected 1, 3 or 4",
                         source=source, hint="save the image as grey, RGB or RGBA")
    return np.ascontiguousarray(arr)


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8/uint16 H x W array or a uint8 H x W x {1, 3, 4} array.

    Bool and other integer arrays are accepted when their values fit: 8-bit PNG if they are
    in 0..255, else (2-D only) 16-bit.  uint16 input always gives a 16-bit PNG.
    """
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"encode_png: expected H x W or H x W x {{1, 3, 4}}, got {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "ui":
        raise ValueError(f"encode_png: expected an integer or bool array, got dtype {arr.dtype}")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    # uint16 stays 16-bit; other integer masks use 8 bits when their values allow it.
    limit = 65535 if arr.ndim == 2 and (arr.dtype == np.uint16 or hi > 255) else 255
    if lo < 0 or hi > limit:
        raise ValueError(f"encode_png: values must be in 0..{limit}, got {lo}..{hi}")
    arr = np.ascontiguousarray(arr, dtype=np.uint16 if limit == 65535 else np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# --------------------------------------------------------------------------- decoding internals
def _decode(data: bytes, *, source: str, max_pixels: int, palette_indices: bool,
            tiff_page: int | None = None, is_image: bool = False) -> np.ndarray:
    """Raw H x W x C array (C in 1..4); palette images keep indices when ``palette_indices``.
    An image (``is_image``, never a mask) gets its orientation tag applied."""
    if not data:
        raise InputError("empty_file", "the file has 0 bytes", source=source,
                         hint="check that the upload or copy finished")
    fmt = sniff_format(data)
    if fmt is None:
        raise InputError("not_an_image", f"no image signature ({_describe(data)})", source=source,
                         hint=f"supported formats: {', '.join(SUPPORTED_FORMATS)}")
    if fmt not in SUPPORTED_FORMATS:
        raise InputError("unsupported_format", f"{fmt} images are not supported", source=source,
                         hint=f"convert to one of {', '.join(SUPPORTED_FORMATS)}")
    if fmt == "tiff":
        return _decode_tiff(data, source=source, max_pixels=max_pixels, all_pages=False,
                            palette_indices=palette_indices, tiff_page=tiff_page,
                            is_image=is_image)
    return _decode_pil(data, fmt, source=source, max_pixels=max_pixels,
                       palette_indices=palette_indices, is_image=is_image)


def _decode_pil(data: bytes, fmt: str, *, source: str, max_pixels: int, palette_indices: bool,
                frame: int = 0, is_image: bool = False) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt.upper()])
        image.seek(frame)  # GIF / multi-frame: the first frame; TIFF: the page chosen
    except Image.DecompressionBombError as error:
        raise _too_many(str(error), source) from error
    except (UnidentifiedImageError, *_DECODE_ERRORS) as error:
        raise _undecodable(data, fmt, error, source) from error
    width, height = image.size
    if width * height > max_pixels:
        raise _too_many(f"{width}x{height} = {width * height} pixels > limit {max_pixels}", source)
    try:
        image.load()
        arr = _pil_to_array(image, palette_indices, source)
    except _DECODE_ERRORS as error:
        raise _undecodable(data, fmt, error, source) from error
    # After load(): PNG's getexif() loads the image itself, and must not swallow its errors.
    return _orient(arr, _exif_orientation(image)) if is_image else arr


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image; 1 when absent, unreadable or invalid."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS:  # a damaged EXIF block does not make the pixels unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """H x W x C as stored -> as displayed for EXIF ``orientation`` (the transforms of
    ``PIL.ImageOps.exif_transpose``); a view, made contiguous by the caller."""
    if orientation in (2, 3):
        arr = arr[:, ::-1]                       # mirror; with 3, rotate 180
    if orientation in (3, 4):
        arr = arr[::-1]
    if orientation in (5, 6, 7, 8):
        arr = arr.swapaxes(0, 1)                 # transpose, then:
        if orientation in (6, 7):
            arr = arr[:, ::-1]                   # 6: 90 clockwise; 7: transverse
        if orientation in (7, 8):
            arr = arr[::-1]                      # 8: 90 counter-clockwise
    return arr


def _pil_to_array(image: Image.Image, palette_indices: bool, source: str) -> np.ndarray:
    mode = image.mode
    if mode == "1":  # masks keep 0/1, images become 0/255
        arr = np.asarray(image, dtype=np.uint8) * (1 if palette_indices else 255)
    elif mode in ("P", "PA"):
        if palette_indices:
            arr = np.asarray(image.convert("P") if mode == "PA" else image)
        else:
            has_alpha = mode == "PA" or "transparency" in image.info
            arr = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    elif mode in ("L", "LA", "RGB", "RGBA"):
        arr = np.asarray(image)
    elif mode.startswith("I;16"):
        arr = np.asarray(image).astype(np.uint16)
    elif mode == "I":
        arr = np.asarray(image)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise InputError("unsupported_format", "32-bit integer pixels outside 0..65535",
                             source=source, hint="save as 8- or 16-bit")
        arr = arr.astype(np.uint16)
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        arr = np.asarray(image.convert("RGB"))
    elif mode == "RGBa":
        arr = np.asarray(image.convert("RGBA"))
    else:
        raise InputError("unsupported_format", f"pixel mode {mode!r} is not supported",
                         source=source, hint="save as 8- or 16-bit grey, RGB or RGBA")
    return arr[..., None] if arr.ndim == 2 else arr


def _decode_tiff(data: bytes, *, source: str, max_pixels: int, all_pages: bool,
                 palette_indices: bool = True, tiff_page: int | None = None,
                 is_image: bool = False) -> np.ndarray:
    """One page (or, with ``all_pages``, the first series as channels) -> H x W x C.

    Everything that sizes the decoded array (pages, H x W, samples per pixel, bits, sample
    format) is checked from the header first; only then are pixels decoded.
    """
    index = 0
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if all_pages:
                series = tif.series[0]
                page = series.keyframe
                _check_tiff_page(page, source, max_pixels, max_samples=_MAX_MASK_CHANNELS)
                if series.size > _MAX_MASK_CHANNELS * max_pixels:
                    raise _too_many(f"TIFF series {series.shape} holds {series.size} values > "
                                    f"{_MAX_MASK_CHANNELS} x limit {max_pixels}", source)
                arr, axes = series.asarray(), series.axes
            else:
                index = _tiff_page_index(tif, tiff_page, source, is_image)
                page = tif.pages[index]
                _check_tiff_page(page, source, max_pixels, max_samples=4)
                arr, axes = page.asarray(), page.axes
            if page.photometric == tifffile.PHOTOMETRIC.PALETTE and not palette_indices:
                colormap = np.asarray(page.colormap)  # 3 x 2**bits, 16-bit entries
                arr, axes = (colormap[:, arr] >> 8).astype(np.uint8), "SYX"  # 3 x H x W
            orientation = int(page.tags.valueof(_ORIENTATION_TAG, 1) or 1) if is_image else 1
    except InputError:
        raise
    except _DECODE_ERRORS as error:
        if "imagecodecs" not in str(error):
            raise _undecodable(data, "tiff", error, source) from error
        if all_pages:  # PIL reads one page only
            raise InputError("unsupported_format", f"TIFF compression needs imagecodecs ({error})",
                             source=source, hint="save uncompressed or zlib TIFF, or install "
                                                 "imagecodecs") from error
        # LZW/PackBits/JPEG TIFFs need imagecodecs in tifffile; PIL decodes them natively.
        return _decode_pil(data, "tiff", source=source, max_pixels=max_pixels,
                           palette_indices=palette_indices, frame=index, is_image=is_image)
    while arr.ndim > 3 and arr.shape[0] == 1:  # leading singleton axes (time, depth, ...)
        arr, axes = arr[0], axes[1:]
    if arr.ndim == 3 and not axes.endswith("S"):
        arr = np.moveaxis(arr, 0, -1)  # C x H x W (planar or pages) -> H x W x C
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise InputError("bad_channels", f"TIFF data has shape {arr.shape} (axes {axes})",
                         source=source, hint="save a single 2-D image (H x W or H x W x C)")
    return _to_uint(_orient(arr, orientation if 1 <= orientation <= 8 else 1), source)


def _tiff_page_index(tif: tifffile.TiffFile, tiff_page: int | None, source: str,
                     is_image: bool) -> int:
    """The page to decode: 0 for a single page, else ``tiff_page``; a multi-page file without
    it (or with too few pages) is refused, listing its pages."""
    count = len(tif.pages)
    if count == 1:
        return 0
    if tiff_page is not None and tiff_page < count:
        return tiff_page
    shown = "; ".join(f"page {i}: {'x'.join(map(str, tif.pages[i].shape))} "
                      f"{tif.pages[i].dtype}" for i in range(min(count, 4)))
    more = f"; and {count - 4} more" if count > 4 else ""
    if tiff_page is not None:
        detail = f"tiff_page={tiff_page} but the TIFF has {count} pages ({shown}{more})"
    else:
        detail = f"TIFF has {count} pages ({shown}{more}) and none was chosen"
    hint = ("set preprocessing.tiff_page to the 0-based page that is the image (page 0 is "
            "sometimes a thumbnail), or save one page per file") if is_image else \
        ("save the mask as one page; multi-page TIFF masks are read as one class per page "
         "only for multi-label tasks")
    raise InputError("multi_page", detail, source=source, hint=hint)


def _to_uint(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "ui" and (arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535)):
        return arr.astype(np.uint16)
    raise InputError("unsupported_format", f"pixel type {arr.dtype} is not supported",
                     source=source, hint="save as 8- or 16-bit unsigned integers")
