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

import io
import struct
import zlib
from typing import Any, Literal, Sequence

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from seg_core.config import MaskSpec
from seg_core.errors import InputError

Format = Literal["png", "jpeg", "bmp", "gif", "tiff", "webp"]

DEFAULT_MAX_PIXELS = 64_000_000
SUPPORTED_FORMATS: tuple[str, ...] = ("png", "jpeg", "bmp", "gif", "tiff")
LOSSY_FORMATS: tuple[str, ...] = ("jpeg", "webp")

_MAX_MASK_CHANNELS = 64  # multi-page TIFF masks: pages x H x W is bounded by this x max_pixels
_MAX_SAMPLE_BYTES = 4    # TIFF samples wider than 32 bits are refused from the header
_ORIENTATION_TAG = 0x0112  # EXIF / TIFF Orientation, 1 (as stored) .. 8

# Decoders raise many types on hostile bytes (PIL plugins, zlib, struct, tifffile); all of them
# mean "these bytes do not decode", which must surface as InputError, never as a crash.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                  ZeroDivisionError, struct.error, zlib.error, RuntimeError)

_SIGNATURES: tuple[tuple[bytes, Format], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"BM", "bmp"),
)


def sniff_format(data: bytes) -> Format | None:
    """Image format from the leading signature bytes, or None if no known signature matches."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for signature, fmt in _SIGNATURES:
        if data.startswith(signature):
            return fmt
    return None


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


# A multi-label mask part that marks pixels to ignore (the manifest's ``ignore=<file>`` part,
# see pipelines.ingest) carries this prefix in front of its file bytes.
IGNORE_PART = b"RSEG-IGNORE\x00"
_PARTS_MAGIC = b"RSMP"  # several mask files packed into one blob, see pack_mask_parts


def pack_mask_parts(parts: Sequence[bytes]) -> bytes:
    """Several mask files (one per class) as one lossless blob: magic, count, (length, bytes)*."""
    header = _PARTS_MAGIC + struct.pack("<I", len(parts))
    return header + b"".join(struct.pack("<Q", len(p)) + p for p in parts)


def unpack_mask_parts(blob: bytes) -> bytes | list[bytes]:
    """Inverse of :func:`pack_mask_parts`; a plain mask file is returned unchanged."""
    if not blob.startswith(_PARTS_MAGIC):
        return blob
    (count,), offset, parts = struct.unpack_from("<I", blob, 4), 8, []
    for _ in range(count):
        (size,) = struct.unpack_from("<Q", blob, offset)
        parts.append(blob[offset + 8: offset + 8 + size])
        offset += 8 + size
    return parts


def decode_mask(data: bytes | Sequence[bytes], spec: MaskSpec, *, source: str = "<bytes>",
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a lossless mask to class ids.

    Multi-class: one file -> H x W int64 in ``0..K-1`` or ``spec.ignore_index``.  Raw values are the
    class ids, or are mapped through ``spec.mask_values`` (grey) or ``spec.palette`` (colour).
    Multi-label (``spec.multilabel``): a list of K binary files, or one file with K channels (e.g.
    a multi-channel TIFF) -> K x H x W uint8 {0, 1}.  Binary files may use 0/1 or 0/255, so 255
    cannot mark "ignore" there: an extra part that starts with :data:`IGNORE_PART` is a binary
    ignore mask, and its non-zero pixels become ``spec.ignore_index`` in every class.  A blob
    from :func:`pack_mask_parts` (how shards and ingest carry several files) is unpacked first.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = unpack_mask_parts(bytes(data))
    files = [data] if isinstance(data, bytes) else list(data)
    for blob in files:
        _refuse_lossy(bytes(blob).removeprefix(IGNORE_PART), source)
    try:
        return _decode_mask_files(files, spec, source=source, max_pixels=max_pixels)
    except MemoryError as error:
        raise _out_of_memory(b"".join(bytes(f) for f in files), source) from error


def _decode_mask_files(files: list, spec: MaskSpec, *, source: str,
                       max_pixels: int) -> np.ndarray:
    if spec.multilabel:
        return _decode_multilabel(files, spec, source=source, max_pixels=max_pixels)
    if len(files) != 1:
        raise InputError("bad_channels", f"got {len(files)} mask files for a multi-class mask",
                         source=source,
                         hint="give one index mask per image, or declare the task multi-label")
    raw = _decode(bytes(files[0]), source=source, max_pixels=max_pixels,
                  palette_indices=spec.palette is None)
    if spec.palette is not None:
        return _map_palette(raw, spec, source)
    return _map_values(_single_channel(raw, source), spec, source)


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


def _check_tiff_page(page: Any, source: str, max_pixels: int, *, max_samples: int) -> None:
    """Refuse, from the header alone, a page whose decoded array would be too large or of a
    type this module does not return: H x W over ``max_pixels``, a volume, more than
    ``max_samples`` samples per pixel, floating-point or wider-than-32-bit samples."""
    height, width = int(page.imagelength), int(page.imagewidth)
    if height * width > max_pixels:
        raise _too_many(f"{width}x{height} = {height * width} pixels > limit {max_pixels}", source)
    samples, depth = int(page.samplesperpixel), int(getattr(page, "imagedepth", 1) or 1)
    if depth > 1:
        raise InputError("bad_channels", f"TIFF page is a volume of depth {depth}",
                         source=source, hint="save one 2-D image per file")
    if samples > max_samples:
        raise InputError("bad_channels", f"TIFF declares {samples} samples per pixel "
                         f"({page.bitspersample}-bit), expected at most {max_samples}",
                         source=source, hint="save the image as grey, RGB or RGBA" if
                         max_samples == 4 else "save one binary page per class")
    dtype = page.dtype
    if dtype is None or dtype.kind not in "uib" or dtype.itemsize > _MAX_SAMPLE_BYTES:
        kind = "unknown" if dtype is None else {"f": "float", "c": "complex"}.get(dtype.kind,
                                                                                  str(dtype))
        raise InputError("unsupported_format", f"TIFF samples are {page.bitspersample}-bit "
                         f"{kind} (sample format {int(page.sampleformat)})", source=source,
                         hint="save as 8- or 16-bit unsigned integers")


def _to_uint(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "ui" and (arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535)):
        return arr.astype(np.uint16)
    raise InputError("unsupported_format", f"pixel type {arr.dtype} is not supported",
                     source=source, hint="save as 8- or 16-bit unsigned integers")


def _undecodable(data: bytes, fmt: str, error: BaseException, source: str) -> InputError:
    text = str(error)
    truncated = ("truncat" in text.lower() or "failed to read" in text.lower()
                 or (fmt == "png" and b"IEND" not in data[-16:])
                 or (fmt == "jpeg" and b"\xff\xd9" not in data[-64:]))
    if truncated:
        return InputError("truncated", f"{fmt} data ends early ({len(data)} bytes; {text})",
                          source=source, hint="the file is incomplete: re-download or re-export it")
    return InputError("corrupt", f"looks like {fmt} but does not decode ({text})", source=source,
                      hint="re-export the file; it is damaged or not really a " + fmt)


def _too_many(detail: str, source: str) -> InputError:
    return InputError("too_many_pixels", detail, source=source,
                      hint="downscale or tile the image, or raise max_pixels if it is trusted")


def _out_of_memory(data: bytes, source: str) -> InputError:
    return InputError("too_large", f"ran out of memory decoding {len(data)} bytes of "
                      f"{sniff_format(data) or 'data'}", source=source,
                      hint="give the worker more memory, or lower max_pixels so that such "
                           "files are refused from their header")


def _describe(data: bytes) -> str:
    """What unknown bytes look like, never quoting them: a file named as an image may hold
    secrets (``/proc/self/environ``, a credentials file), and messages end up in logs."""
    try:
        text = data[:256].decode("utf-8")
    except UnicodeDecodeError:
        return f"{len(data)} bytes of binary data"
    return f"{len(data)} bytes that look like text" if text.isprintable() or "\n" in text else \
        f"{len(data)} bytes of binary data"


# ------------------------------------------------------------------------------ mask internals
def _refuse_lossy(data: bytes, source: str) -> None:
    fmt = sniff_format(data)
    if fmt in LOSSY_FORMATS:
        raise InputError("lossy_mask", f"mask is a {fmt} file", source=source,
                         hint=f"re-export masks as PNG; {fmt.upper()} compression changes label "
                              "values")


def _single_channel(raw: np.ndarray, source: str) -> np.ndarray:
    """H x W x C -> H x W, accepting grey saved as RGB(A) with equal colour channels."""
    if raw.shape[2] == 1:
        return raw[..., 0]
    if raw.shape[2] in (3, 4) and np.array_equal(raw[..., 0], raw[..., 1]) and \
            np.array_equal(raw[..., 0], raw[..., 2]):
        return raw[..., 0]
    raise InputError("bad_channels", f"mask has {raw.shape[2]} colour channels",
                     source=source, hint="colour masks need a palette (--palette r,g,b;...); "
                                         "index masks must be single-channel")


def _map_values(values: np.ndarray, spec: MaskSpec, source: str) -> np.ndarray:
    """Raw grey values -> class ids via ``spec.mask_values`` (or identity); ignore_index kept."""
    raw_values = spec.mask_values if spec.mask_values is not None else range(spec.num_classes)
    lut = np.full(int(values.max(initial=0)) + 1, -1, dtype=np.int64)
    if spec.ignore_index < lut.size:
        lut[spec.ignore_index] = spec.ignore_index
    for class_id, raw in enumerate(raw_values):
        if raw < lut.size:
            lut[raw] = class_id
    mask = lut[values]
    if (mask < 0).any():
        bad, counts = np.unique(values[mask < 0], return_counts=True)
        _raise_unknown([int(b) for b in bad], counts, spec, source)
    return mask


def _map_palette(raw: np.ndarray, spec: MaskSpec, source: str) -> np.ndarray:
    """RGB(A) colours -> class ids via ``spec.palette``; any other colour is an unknown label."""
    rgb = np.repeat(raw, 3, axis=2) if raw.shape[2] == 1 else raw[..., :3]
    rgb = rgb.astype(np.int64)
    keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    uniques, inverse = np.unique(keys, return_inverse=True)
    colour_ids = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(spec.palette or ())}
    class_of_unique = np.array([colour_ids.get(int(k), -1) for k in uniques], dtype=np.int64)
    if (class_of_unique < 0).any():
        missing = class_of_unique < 0
        counts = np.bincount(inverse.ravel(), minlength=uniques.size)[missing]
        colours = [((k >> 16) & 255, (k >> 8) & 255, k & 255) for k in uniques[missing].tolist()]
        _raise_unknown(colours, counts, spec, source)
    return class_of_unique[inverse.reshape(keys.shape)]


def _raise_unknown(bad: list, counts: np.ndarray, spec: MaskSpec, source: str) -> None:
    shown = ", ".join(f"{b} ({int(c)} px)" for b, c in zip(bad[:8], counts[:8]))
    more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
    if spec.palette is not None:
        expected = f"palette {list(spec.palette)}"
        hint = "add the colours to --palette (one per class) or fix the mask colours"
    elif spec.mask_values is not None:
        expected = f"mask_values {list(spec.mask_values)} (or ignore_index {spec.ignore_index})"
        hint = "list every raw value with --mask-values, in class order"
    else:
        expected = f"class ids 0..{spec.num_classes - 1} (or ignore_index {spec.ignore_index})"
        hint = ("raise --num-classes if these are class ids, or map raw values with "
                "--mask-values (e.g. --mask-values 0,255 for binary masks)")
    raise InputError("unknown_label", f"mask values {shown}{more} are outside {expected}",
                     source=source, hint=hint)


def _decode_multilabel(files: list, spec: MaskSpec, *, source: str,
                       max_pixels: int) -> np.ndarray:
    """K binary files, or one K-channel file -> K x H x W uint8 {0, 1} (ignore_index where an
    ignore part marks pixels)."""
    k = spec.num_classes
    ignore = [bytes(f)[len(IGNORE_PART):] for f in files if bytes(f).startswith(IGNORE_PART)]
    files = [f for f in files if not bytes(f).startswith(IGNORE_PART)]
    if len(ignore) > 1:
        raise InputError("bad_channels", f"{len(ignore)} ignore masks for one image, expected at "
                                         f"most one", source=source,
                         hint="list one ignore=<file> part per row")
    if len(files) == 1:
        blob = bytes(files[0])
        if sniff_format(blob) == "tiff":
            raw = _decode_tiff(blob, source=source, max_pixels=max_pixels, all_pages=True)
        else:
            raw = _decode(blob, source=source, max_pixels=max_pixels, palette_indices=True)
        channels = [raw[..., c] for c in range(raw.shape[2])]
    else:
        channels = []
        for i, blob in enumerate(files):
            name = f"{source}[{i}]"
            raw = _decode(bytes(blob), source=name, max_pixels=max_pixels, palette_indices=True)
            channels.append(_single_channel(raw, name))
    if len(channels) != k:
        raise InputError("bad_channels", f"multi-label mask has {len(channels)} channels/files, "
                                         f"expected num_classes={k}", source=source,
                         hint="give one binary mask per class (or a K-channel TIFF)")
    shapes = sorted({c.shape for c in channels})
    if len(shapes) != 1:
        raise InputError("size_mismatch", f"per-class masks differ in size: {shapes}",
                         source=source, hint="all class masks of an image must have its H x W")
    stacked = np.stack(channels)  # K x H x W
    on_values = (1, 255, 65535)
    bad = np.unique(stacked[(stacked != 0) & ~np.isin(stacked, on_values)])
    if bad.size:
        raise InputError("unknown_label", f"multi-label mask values {bad[:8].tolist()} are not "
                                          "binary (expected 0 and 1 or 255)", source=source,
                         hint="save each class mask as binary: 0 = absent, 1 or 255 = present")
    mask = (stacked != 0).astype(np.uint8)
    if ignore:
        name = f"{source}[ignore]"
        plane = _single_channel(_decode(ignore[0], source=name, max_pixels=max_pixels,
                                        palette_indices=True), name)
        if plane.shape != mask.shape[1:]:
            raise InputError("size_mismatch", f"ignore mask is {plane.shape[0]}x{plane.shape[1]}"
                             f", class masks are {mask.shape[1]}x{mask.shape[2]}", source=source,
                             hint="draw the ignore mask at the image's H x W")
        if not 0 <= spec.ignore_index <= 255:
            raise InputError("unknown_label", f"ignore_index={spec.ignore_index} does not fit a "
                             f"uint8 multi-label mask", source=source,
                             hint="use an ignore_index in 2..255 (the default 255 works)")
        mask[:, plane != 0] = spec.ignore_index
    return mask
