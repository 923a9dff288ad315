"""Mask bytes -> class ids or multi-label planes (:func:`decode_mask`); lossless files only."""
from __future__ import annotations

import struct
from typing import Sequence

import numpy as np

from seg_core.codecs.image import _decode, _decode_tiff
from seg_core.codecs.limits import _out_of_memory, DEFAULT_MAX_PIXELS, LOSSY_FORMATS, sniff_format
from seg_core.config import MaskSpec
from seg_core.errors import InputError


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
    if spec.instance_labels:
        return instance_classes(decode_instance_labels(bytes(files[0]), source=source,
                                                       max_pixels=max_pixels), spec)
    raw = _decode(bytes(files[0]), source=source, max_pixels=max_pixels,
                  palette_indices=spec.palette is None)
    if spec.palette is not None:
        return _map_palette(raw, spec, source)
    return _map_values(_single_channel(raw, source), spec, source)


def decode_instance_labels(data: bytes, *, source: str = "<bytes>",
                           max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An instance label image (8- or 16-bit grey, lossless) -> H x W int32: 0 background,
    every other value one object (``MaskSpec.instance_labels``)."""
    blob = unpack_mask_parts(bytes(data))
    if not isinstance(blob, bytes):
        raise InputError("bad_channels", f"got {len(blob)} files for one instance label image",
                         source=source, hint="give one label image per image")
    _refuse_lossy(blob, source)
    raw = _decode(blob, source=source, max_pixels=max_pixels, palette_indices=True)
    return _single_channel(raw, source).astype(np.int32)


def instance_classes(labels: np.ndarray, spec: MaskSpec) -> np.ndarray:
    """The class mask an instance label image stands for (``MaskSpec.instance_labels``): 0/1
    background and object, or with 3 classes 0/1/2 background, interior and boundary."""
    if spec.num_classes == 3:
        from seg_core.instances import boundary_target

        return boundary_target(labels).astype(np.int64)
    return (labels > 0).astype(np.int64)


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
