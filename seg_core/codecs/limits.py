"""What a decoder refuses before it decodes: formats by signature, pixel and sample limits from the
header, and the :class:`~seg_core.errors.InputError` each refusal becomes."""
from __future__ import annotations

import struct
import zlib
from typing import Any, Literal


from seg_core.errors import InputError

Format = Literal["png", "jpeg", "bmp", "gif", "tiff", "webp"]
DEFAULT_MAX_PIXELS = 64_000_000
SUPPORTED_FORMATS: tuple[str, ...] = ("png", "jpeg", "bmp", "gif", "tiff")
LOSSY_FORMATS: tuple[str, ...] = ("jpeg", "webp")
_MAX_MASK_CHANNELS = 64  # multi-page TIFF masks: pages x H x W is bounded by this x max_pixels
_MAX_SAMPLE_BYTES = 4    # TIFF samples wider than 32 bits are refused from the header


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
