"""Codec round trips (encoded here with PIL / tifffile) and every refusal reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from seg_core.codecs import (IGNORE_PART, decode_image, decode_mask, encode_png, pack_mask_parts,
                             sniff_format, unpack_mask_parts)
from seg_core.config import MaskSpec
from seg_core.errors import InputError
from tests.hostile_files import png_bomb

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (17, 23, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (17, 23), dtype=np.uint8)


def pil_bytes(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def tiff_bytes(arr: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, arr, **kwargs)
    return buffer.getvalue()


def refusal(call, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        call(*args, source="s3://b/sample_7.png", **kwargs)
    assert "s3://b/sample_7.png" in str(info.value)
    assert info.value.source == "s3://b/sample_7.png"
    return info.value


def test_truncated_loading_is_not_globally_enabled() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_rgb_round_trip(fmt: str) -> None:
    out = decode_image(pil_bytes(RGB, fmt))
    assert out.dtype == np.uint8 and out.shape == (17, 23, 3)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_lossless_grey_round_trip(fmt: str) -> None:
    out = decode_image(pil_bytes(GREY, fmt))
    # GIF stores grey as a grey palette, which decodes to RGB with equal channels.
    assert out.shape == ((17, 23, 3) if fmt == "GIF" else (17, 23, 1))
    for channel in range(out.shape[2]):
        np.testing.assert_array_equal(out[..., channel], GREY)


def test_jpeg_is_close() -> None:
    smooth = np.repeat(np.linspace(0, 255, 23, dtype=np.uint8)[None, :, None], 17, 0)
    smooth = np.repeat(smooth, 3, 2)
    out = decode_image(pil_bytes(smooth, "JPEG", quality=95))
    assert out.shape == (17, 23, 3)
    assert np.abs(out.astype(int) - smooth).mean() < 3


def test_rgba_png_keeps_alpha() -> None:
    rgba = RNG.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(pil_bytes(rgba, "PNG")), rgba)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])
def test_palette_image_becomes_rgb(fmt: str) -> None:
    image = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    image.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90])
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    out = decode_image(buffer.getvalue())
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 0].tolist() == [70, 80, 90]
    mask = decode_mask(buffer.getvalue(), MaskSpec(3))  # masks keep the indices
    np.testing.assert_array_equal(mask, [[0, 1], [2, 1]])


def test_gif_first_frame() -> None:
    frames = [Image.fromarray(np.full((6, 8), v, dtype=np.uint8)) for v in (40, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buffer.getvalue())
    assert out.shape[:2] == (6, 8)
    assert np.all(out == 40)


def test_16bit_tiff_and_png() -> None:
    deep = RNG.integers(0, 65536, (13, 7), dtype=np.uint16)
    for data in (tiff_bytes(deep), pil_bytes(deep, "PNG")):
        out = decode_image(data)
        assert out.dtype == np.uint16 and out.shape == (13, 7, 1)
        np.testing.assert_array_equal(out[..., 0], deep)


@pytest.mark.parametrize("compression", ["tiff_lzw", "packbits", "tiff_deflate"])
def test_compressed_tiff(compression: str) -> None:
    np.testing.assert_array_equal(decode_image(pil_bytes(RGB, "TIFF", compression=compression)),
                                  RGB)


def test_16bit_rgb_tiff_via_tifffile() -> None:
    deep = RNG.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    np.testing.assert_array_equal(decode_image(tiff_bytes(deep, photometric="rgb")), deep)


def test_sniff_format() -> None:
    assert sniff_format(pil_bytes(GREY, "PNG")) == "png"
    assert sniff_format(pil_bytes(RGB, "JPEG")) == "jpeg"
    assert sniff_format(tiff_bytes(GREY)) == "tiff"
    assert sniff_format(b"hello") is None


def test_encode_png_round_trips_masks() -> None:
    mask = RNG.integers(0, 5, (10, 12)).astype(np.int64)
    decoded = decode_image(encode_png(mask))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[..., 0], mask)
    assert decode_image(encode_png(np.array([[0, 300]]))).dtype == np.uint16
    deep = np.array([[0, 1000], [65535, 3]], dtype=np.uint16)
    np.testing.assert_array_equal(decode_image(encode_png(deep))[..., 0], deep)
    np.testing.assert_array_equal(decode_image(encode_png(RGB)), RGB)
    with pytest.raises(ValueError, match="0..255"):
        encode_png(np.full((2, 2, 3), 300, dtype=np.int64))


# ----------------------------------------------------------------------------------- masks
def test_index_mask_identity_and_ignore() -> None:
    raw = np.array([[0, 1, 2], [255, 2, 0]], dtype=np.uint8)
    out = decode_mask(pil_bytes(raw, "PNG"), MaskSpec(num_classes=3))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, raw.astype(np.int64))


def test_mask_values_mapping() -> None:
    raw = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    spec = MaskSpec(num_classes=2, mask_values=(0, 255), ignore_index=254)
    np.testing.assert_array_equal(decode_mask(pil_bytes(raw, "PNG"), spec), [[0, 1], [1, 0]])


def test_palette_png_mask_keeps_indices() -> None:
    image = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_mask(buffer.getvalue(), MaskSpec(3)), [[0, 1], [2, 1]])


def test_colour_mask_through_palette() -> None:
    palette = ((0, 0, 0), (255, 0, 0), (0, 0, 255))
    colours = np.array([[palette[0], palette[2]], [palette[1], palette[1]]], dtype=np.uint8)
    out = decode_mask(pil_bytes(colours, "PNG"), MaskSpec(3, palette=palette))
    np.testing.assert_array_equal(out, [[0, 2], [1, 1]])


def test_unknown_colour_is_named() -> None:
    colours = np.array([[[0, 0, 0], [9, 9, 9]]], dtype=np.uint8)
    spec = MaskSpec(2, palette=((0, 0, 0), (255, 255, 255)))
    error = refusal(decode_mask, pil_bytes(colours, "PNG"), spec)
    assert error.reason == "unknown_label" and "(9, 9, 9)" in str(error)


def test_unknown_label_names_values_and_fix() -> None:
    raw = np.array([[0, 1, 7], [7, 3, 0]], dtype=np.uint8)
    error = refusal(decode_mask, pil_bytes(raw, "PNG"), MaskSpec(num_classes=3))
    assert error.reason == "unknown_label"
    assert "3 (1 px)" in str(error) and "7 (2 px)" in str(error)
    assert "--num-classes" in error.hint and "--mask-values" in error.hint


def test_multilabel_from_files_and_tiff() -> None:
    a = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    b = np.array([[1, 1], [0, 0]], dtype=np.uint8)
    spec = MaskSpec(num_classes=2, multilabel=True)
    expected = np.stack([a > 0, b > 0]).astype(np.uint8)
    out = decode_mask([pil_bytes(a, "PNG"), pil_bytes(b, "PNG")], spec)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(decode_mask(tiff_bytes(np.stack([a, b])), spec), expected)
    planar = tiff_bytes(np.stack([a, b]), photometric="minisblack", planarconfig="separate")
    np.testing.assert_array_equal(decode_mask(planar, spec), expected)


def test_multilabel_ignore_part_marks_every_class() -> None:
    """255 means "on" in a binary class file, so ignore regions come as their own part."""
    a = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    b = np.array([[1, 1], [0, 0]], dtype=np.uint8)
    void = np.array([[0, 0], [0, 255]], dtype=np.uint8)
    spec = MaskSpec(num_classes=2, multilabel=True, ignore_index=200)
    out = decode_mask([pil_bytes(a, "PNG"), IGNORE_PART + pil_bytes(void, "PNG"),
                       pil_bytes(b, "PNG")], spec)
    np.testing.assert_array_equal(out, [[[0, 1], [1, 200]], [[1, 1], [0, 200]]])
    error = refusal(decode_mask, [pil_bytes(a, "PNG"), pil_bytes(b, "PNG"),
                                  IGNORE_PART + pil_bytes(np.zeros((3, 2), np.uint8), "PNG")], spec)
    assert error.reason == "size_mismatch" and "ignore mask is 3x2" in str(error)
    error = refusal(decode_mask, [pil_bytes(a, "PNG"), IGNORE_PART + pil_bytes(void, "PNG")] * 2,
                    spec)
    assert error.reason == "bad_channels" and "2 ignore masks" in str(error)
    with pytest.raises(ValueError, match="collides with the 0/1 values"):
        MaskSpec(num_classes=2, multilabel=True, ignore_index=1)


def test_multilabel_wrong_channel_count() -> None:
    spec = MaskSpec(num_classes=3, multilabel=True)
    error = refusal(decode_mask, [pil_bytes(GREY, "PNG")] * 2, spec)
    assert error.reason == "bad_channels" and "expected num_classes=3" in str(error)
    error = refusal(decode_mask, tiff_bytes(np.zeros((2, 4, 4), np.uint8)), spec)
    assert error.reason == "bad_channels"


# -------------------------------------------------------------------------------- refusals
def test_jpeg_mask_refused() -> None:
    error = refusal(decode_mask, pil_bytes(GREY, "JPEG"), MaskSpec(2))
    assert error.reason == "lossy_mask" and "PNG" in error.hint


def test_empty_bytes() -> None:
    assert refusal(decode_image, b"").reason == "empty_file"


def test_garbage_and_text() -> None:
    assert refusal(decode_image, b"id,label\n1,cat\n").reason == "not_an_image"
    assert refusal(decode_image, bytes(range(7, 200))).reason == "not_an_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt: str) -> None:
    data = pil_bytes(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8), fmt)
    for cut in (len(data) // 2, 40):
        assert refusal(decode_image, data[:cut]).reason == "truncated"


def test_corrupt_header() -> None:
    data = bytearray(pil_bytes(RGB, "PNG"))
    data[16:24] = b"\xff" * 8  # IHDR width/height garbage, CRC now wrong
    assert refusal(decode_image, bytes(data)).reason in ("corrupt", "too_many_pixels")
    assert refusal(decode_image, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 + b"IEND" + b"\0" * 8
                   ).reason == "corrupt"


def test_bomb_refused_before_decode() -> None:
    # A valid blank 1-bit 20000 x 20000 PNG of ~50 kB: refused from the header.
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < 100_000
    assert refusal(decode_image, bomb).reason == "too_many_pixels"
    assert refusal(decode_image, bomb, max_pixels=10**12).reason == "too_many_pixels"  # PIL's guard
    small = pil_bytes(GREY, "PNG")
    assert refusal(decode_image, small, max_pixels=100).reason == "too_many_pixels"
    assert refusal(decode_image, tiff_bytes(GREY), max_pixels=100).reason == "too_many_pixels"
    assert refusal(decode_mask, small, MaskSpec(2), max_pixels=100).reason == "too_many_pixels"
    pages = tiff_bytes(np.zeros((70, 4, 4), np.uint8))  # 70 pages of 16 px > 64 x 16
    spec = MaskSpec(num_classes=70, multilabel=True)
    assert refusal(decode_mask, pages, spec, max_pixels=16).reason == "too_many_pixels"


def test_unsupported_webp() -> None:
    assert refusal(decode_image, b"RIFF\x00\x00\x00\x00WEBPVP8 ").reason == "unsupported_format"


def test_mask_parts_container_roundtrip():
    parts = [b"\x89PNG one", b"", b"three" * 100]
    assert unpack_mask_parts(pack_mask_parts(parts)) == parts
    assert unpack_mask_parts(b"\x89PNG plain") == b"\x89PNG plain"


def test_decode_mask_unpacks_a_packed_multilabel_blob():
    a = np.array([[0, 255, 0]], np.uint8)
    b = np.array([[255, 255, 0]], np.uint8)
    ignore = np.array([[0, 0, 255]], np.uint8)
    spec = MaskSpec(2, multilabel=True)
    blob = pack_mask_parts([encode_png(a), encode_png(b), IGNORE_PART + encode_png(ignore)])
    mask = decode_mask(blob, spec)
    assert mask.tolist() == [[[0, 1, spec.ignore_index]], [[1, 1, spec.ignore_index]]]


def test_instance_label_masks_give_object_or_boundary_classes():
    from seg_core.codecs import decode_instance_labels
    from seg_core.instances import boundary_target

    labels = np.zeros((10, 14), np.uint16)
    labels[1:6, 1:6], labels[1:6, 6:11] = 300, 65000      # two touching objects, 16-bit ids
    data = encode_png(labels)
    assert np.array_equal(decode_instance_labels(data), labels.astype(np.int32))
    two = decode_mask(data, MaskSpec(num_classes=2, instance_labels=True))
    assert np.array_equal(two, (labels > 0).astype(np.int64))
    three = decode_mask(data, MaskSpec(num_classes=3, instance_labels=True))
    assert np.array_equal(three, boundary_target(labels.astype(np.int32)))
    assert (three[1:6, 5] == 2).all() and (three[1:6, 6] == 2).all()   # the shared edge
    for bad in ({"num_classes": 4}, {"num_classes": 2, "mask_values": (0, 255)},
                {"num_classes": 2, "multilabel": True}):
        with pytest.raises(ValueError, match="instance_labels"):
            MaskSpec(instance_labels=True, **bad)
