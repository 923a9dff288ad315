"""Deliberately bad files for the hostile-input tests: a decompression bomb, corrupt,
truncated, empty and mislabelled images and masks."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from seg_core.codecs import encode_png
from seg_core.sample_data import _encode_image, render_sample


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit blank PNG of ``width`` x ``height`` (a few kB: a decompression bomb)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body)
            + _png_chunk(b"IEND", b""))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def write_bad_files(out_dir: str | Path, *, size: tuple[int, int] = (32, 32),
                    num_classes: int = 3) -> dict[str, Path]:
    """Write one file per failure mode and return ``{name: path}``.

    Names: ``image`` (a valid RGB PNG of ``size``, to pair masks with), ``corrupt``,
    ``truncated`` (PNG cut in half), ``empty``, ``text``, ``jpeg_mask``, ``bomb``,
    ``mask_size_mismatch`` (valid mask of another size) and ``mask_unknown_label`` (value
    ``num_classes + 6``, outside the classes and not 255).
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    image, mask = render_sample(0, size=size, shape_types=min(num_classes - 1, 3) or 1, seed=7)
    good_png = _encode_image(image, "png")
    unknown = mask.copy()
    unknown[: size[0] // 4, : size[1] // 4] = num_classes + 6
    corrupt = bytearray(good_png)
    # Scramble the pixel data, keep signature, IHDR and IEND: recognisable but undecodable.
    corrupt[41:-12] = bytes((b * 7 + 3) % 256 for b in corrupt[41:-12])
    files = {
        "image": ("image.png", good_png),
        "corrupt": ("corrupt.png", bytes(corrupt)),
        "truncated": ("truncated.png", good_png[: len(good_png) // 2]),
        "empty": ("empty.png", b""),
        "text": ("text.png", b"this is not an image\n"),
        "jpeg_mask": ("jpeg_mask.jpg", _encode_image(np.repeat(mask[..., None], 3, 2) * 60,
                                                     "jpeg")),
        "bomb": ("bomb.png", png_bomb()),
        "mask_size_mismatch": ("mask_size_mismatch.png",
                               encode_png(np.zeros((size[0] + 5, size[1] + 3), np.uint8))),
        "mask_unknown_label": ("mask_unknown_label.png", encode_png(unknown)),
    }
    paths = {}
    for name, (filename, data) in files.items():
        paths[name] = root / filename
        paths[name].write_bytes(data)
    return paths
