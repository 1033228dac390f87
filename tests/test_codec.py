"""`service.codec`: decoding real image bytes (made with Pillow here) and the output writers.

Every decode case either yields exact pixels or raises `ImageDecodeError` with a one-line message.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.outputs import OutputKind, PredictionMap
from service.codec import (
    SUPPORTED_FORMATS,
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    decode_normals_png,
    decode_npy,
    decode_png16,
    encode_color_png,
    encode_map_png,
    encode_normals_png,
    encode_npy,
    encode_png16,
    spectral,
)

RED = (220, 20, 30)
GREEN = (20, 200, 40)
BLUE = (30, 40, 210)
GRAY = (128, 128, 128)


# --------------------------------------------------------------------------- helpers


def _save(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _crafted_png(width: int, height: int, bit_depth: int = 8, color_type: int = 2, raw: bytes = b"") -> bytes:
    """A PNG whose IHDR says `width x height`, with valid CRCs, and whatever (small) IDAT we give it."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _decode_error(data: bytes | Path | str, max_pixels: int | None = None) -> ImageDecodeError:
    """Decode, expecting ImageDecodeError; check its message is one non-empty line, and return it."""
    with pytest.raises(ImageDecodeError) as info:
        if max_pixels is None:
            decode_image(data)
        else:
            decode_image(data, max_pixels)
    msg = str(info.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg and "\r" not in msg, f"message is not one line: {msg!r}"
    return info.value


def _as_u8(decoded: np.ndarray) -> np.ndarray:
    return np.round(decoded * 255.0).astype(np.int64)


def _check_rgb_float(decoded: np.ndarray, h: int, w: int) -> None:
    assert decoded.shape == (h, w, 3)
    assert decoded.dtype == np.float32
    assert float(decoded.min()) >= 0.0
    assert float(decoded.max()) <= 1.0


def _corner_image() -> np.ndarray:
    """24 x 40 (H x W), gray, red 8x8 block top-left, green top-right, blue bottom-left: no symmetry."""
    arr = np.empty((24, 40, 3), dtype=np.uint8)
    arr[:] = GRAY
    arr[:8, :8] = RED
    arr[:8, -8:] = GREEN
    arr[-8:, :8] = BLUE
    return arr


# --------------------------------------------------------------------------- refusals


def test_random_bytes_are_refused() -> None:
    data = np.random.default_rng(123).bytes(4096)
    err = _decode_error(data)
    assert "not a recognised image" in str(err)
    assert not isinstance(err, ImageTooLargeError)


def test_empty_bytes_are_refused() -> None:
    assert "empty file" in str(_decode_error(b""))


def test_empty_file_on_disk_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert "empty file" in str(_decode_error(path))


def test_nonexistent_path_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-image.png"
    for arg in (missing, str(missing)):
        msg = str(_decode_error(arg))
        assert "cannot read file" in msg
        assert "No such file" in msg


def test_directory_path_is_refused(tmp_path: Path) -> None:
    assert "cannot read file" in str(_decode_error(tmp_path))


def test_truncated_png_is_refused() -> None:
    data = _save(Image.fromarray(_noise(64, 64)), "PNG")
    msg = str(_decode_error(data[: len(data) // 2]))
    assert "truncated" in msg


def test_truncated_jpeg_is_refused() -> None:
    # Noise compresses badly, so half the file is well past the headers, inside the entropy-coded data.
    data = _save(Image.fromarray(_noise(128, 128)), "JPEG", quality=90)
    assert len(data) > 8000
    msg = str(_decode_error(data[: len(data) // 2]))
    assert "truncated" in msg


def test_png_with_corrupted_image_data_is_refused() -> None:
    data = bytearray(_save(Image.fromarray(_noise(64, 64, seed=1)), "PNG"))
    for i in range(200, 210):  # inside the IDAT stream
        data[i] ^= 0xFF
    assert "corrupt" in str(_decode_error(bytes(data)))


# Truncations that end inside the headers make `Image.open` itself raise OSError / ValueError; they must
# come out as ImageDecodeError, or one such file in a CLI list would abort the whole run.
def test_jpeg_truncated_in_its_headers_is_refused() -> None:
    data = _save(Image.fromarray(_noise(23, 31)), "JPEG")
    _decode_error(data[: len(data) // 2])  # the 600-odd bytes of tables are cut: 'Truncated File Read'


def test_png_truncated_inside_ihdr_is_refused() -> None:
    data = _save(Image.fromarray(_noise(8, 8)), "PNG")
    _decode_error(data[:20])


def test_truncated_webp_is_refused() -> None:
    data = _save(Image.fromarray(_noise(64, 48)), "WEBP", quality=80)
    _decode_error(data[: len(data) // 2])  # 'could not create decoder object'


def test_ppm_truncated_in_its_header_is_refused() -> None:
    data = _save(Image.fromarray(_noise(8, 8)), "PPM")
    assert data.startswith(b"P6")
    _decode_error(data[:4])  # 'Reached EOF while reading header'


def test_pdf_like_bytes_are_refused() -> None:
    data = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
    assert "not a recognised image" in str(_decode_error(data))


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX", "SGI"])
def test_format_pillow_reads_but_not_supported_is_refused(fmt: str) -> None:
    assert fmt not in SUPPORTED_FORMATS
    data = _save(Image.new("RGB", (16, 16), RED), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would happily read it
    msg = str(_decode_error(data))
    assert "not one of the supported formats" in msg  # refused before Pillow's reader of it ever runs
    assert "PNG" in msg and "JPEG" in msg  # names what is supported


@pytest.mark.parametrize(("width", "height"), [(0, 5), (5, 0), (0, 0)])
def test_zero_sized_png_is_refused(width: int, height: int) -> None:
    data = _crafted_png(width, height)
    # Pillow refuses a 0-sized header while identifying it, so codec's own "no pixels" branch is not reached.
    msg = str(_decode_error(data))
    assert "no pixels" in msg or "not a recognised image" in msg


def test_over_max_pixels_raises_too_large_naming_the_limit() -> None:
    data = _save(Image.new("RGB", (6, 5), RED), "PNG")
    err = _decode_error(data, max_pixels=29)
    assert isinstance(err, ImageTooLargeError)
    assert "limit of 29" in str(err)
    assert "6 x 5" in str(err)
    # At the limit is fine.
    _check_rgb_float(decode_image(data, max_pixels=30), 5, 6)


def test_over_max_pixels_is_checked_before_decoding() -> None:
    # A header that claims 3000 x 3000 but carries no pixel data: refused for size, not as truncated.
    err = _decode_error(_crafted_png(3000, 3000), max_pixels=1_000_000)
    assert isinstance(err, ImageTooLargeError)
    assert "limit of 1000000" in str(err)


@pytest.mark.parametrize("max_pixels", [1_000_000, 10**13])
def test_decompression_bomb_header_raises_too_large(max_pixels: int) -> None:
    side = 100_000
    assert side * side > 2 * Image.MAX_IMAGE_PIXELS
    data = _crafted_png(side, side)  # a few dozen bytes claiming 10^10 pixels
    assert len(data) < 100
    err = _decode_error(data, max_pixels=max_pixels)  # even a huge max_pixels does not switch the guard off
    assert isinstance(err, ImageTooLargeError)
    assert "too large" in str(err)


def test_decompression_bomb_warning_range_raises_too_large() -> None:
    # Between MAX_IMAGE_PIXELS and twice that, Pillow only warns; decode_image makes the warning a refusal.
    side = 10_000
    assert Image.MAX_IMAGE_PIXELS < side * side <= 2 * Image.MAX_IMAGE_PIXELS
    err = _decode_error(_crafted_png(side, side), max_pixels=10**12)
    assert isinstance(err, ImageTooLargeError)


def test_float_tiff_is_refused() -> None:
    data = _save(Image.fromarray(np.full((3, 4), 0.5, dtype=np.float32)), "TIFF")
    assert "mode F" in str(_decode_error(data))


# --------------------------------------------------------------------------- decoding


def test_rgb_png_exact_from_bytes_path_and_str(tmp_path: Path) -> None:
    arr = _noise(7, 11, seed=5)
    data = _save(Image.fromarray(arr), "PNG")
    path = tmp_path / "img.png"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        out = decode_image(source)
        _check_rgb_float(out, 7, 11)
        np.testing.assert_array_equal(out, arr.astype(np.float32) / 255.0)


def test_grayscale_is_expanded_to_three_equal_channels() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = decode_image(_save(Image.fromarray(gray, mode="L"), "PNG"))
    _check_rgb_float(out, 3, 4)
    for c in range(3):
        np.testing.assert_array_equal(_as_u8(out[:, :, c]), gray)


def test_rgba_alpha_is_dropped_not_composited() -> None:
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[..., :3] = [[[10, 20, 30], [200, 150, 100], [255, 0, 128]], [[1, 2, 3], [90, 80, 70], [0, 0, 0]]]
    arr[..., 3] = [[0, 128, 255], [0, 1, 254]]  # fully transparent pixels keep their colour
    out = decode_image(_save(Image.fromarray(arr, mode="RGBA"), "PNG"))
    _check_rgb_float(out, 2, 3)
    np.testing.assert_array_equal(_as_u8(out), arr[..., :3])


def test_la_alpha_is_dropped() -> None:
    img = Image.new("LA", (3, 2), (100, 7))
    img.putpixel((2, 1), (250, 0))
    out = decode_image(_save(img, "PNG"))
    _check_rgb_float(out, 2, 3)
    assert _as_u8(out[0, 0]).tolist() == [100, 100, 100]
    assert _as_u8(out[1, 2]).tolist() == [250, 250, 250]


def _palette_image() -> Image.Image:
    img = Image.new("P", (4, 2), 0)
    img.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0, 0, 0] * 253)
    img.putpixel((1, 0), 1)
    img.putpixel((2, 1), 2)
    return img


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_keeps_palette_colours(fmt: str) -> None:
    data = _save(_palette_image(), fmt, transparency=0)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and opened.info.get("transparency") == 0
    out = decode_image(data)
    _check_rgb_float(out, 2, 4)
    expected = np.array([[10, 20, 30]] * 8).reshape(2, 4, 3)
    expected[0, 1] = [200, 100, 50]
    expected[1, 2] = [0, 255, 0]
    np.testing.assert_array_equal(_as_u8(out), expected)  # index 0 is transparent but keeps its colour


def test_16bit_grayscale_png_keeps_precision() -> None:
    values = np.array([[0, 1, 255, 256], [1000, 32768, 65534, 65535]], dtype=np.uint16)
    data = _save(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    _check_rgb_float(out, 2, 4)
    expected = values.astype(np.float64) / 65535.0
    for c in range(3):
        np.testing.assert_allclose(out[:, :, c], expected, rtol=0, atol=1e-6)
    assert abs(float(out[1, 0, 0]) - 1000 / 65535) <= 1e-6


def test_dark_16bit_grayscale_png_is_not_mistaken_for_8bit() -> None:
    values = np.full((3, 4), 200, dtype=np.uint16)  # every value <= 255
    out = decode_image(_save(Image.fromarray(values), "PNG"))
    np.testing.assert_allclose(out, np.full((3, 4, 3), 200 / 65535), rtol=0, atol=1e-6)


def test_16bit_big_endian_tiff_keeps_precision() -> None:
    values = np.array([[1000, 200, 65535]], dtype=np.uint16)
    img = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    data = _save(img, "TIFF")
    out = decode_image(data)
    _check_rgb_float(out, 1, 3)
    np.testing.assert_allclose(out[0, :, 1], values[0] / 65535.0, rtol=0, atol=1e-6)


def test_dark_16bit_pgm_is_not_mistaken_for_8bit() -> None:
    values = np.full((3, 4), 200, dtype=np.uint16)
    data = b"P5\n4 3\n65535\n" + values.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(data)).format == "PPM"
    out = decode_image(data)
    np.testing.assert_allclose(out, np.full((3, 4, 3), 200 / 65535), rtol=0, atol=1e-6)


def test_bright_16bit_pgm_keeps_precision() -> None:
    values = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    data = b"P5\n4 1\n65535\n" + values.astype(">u2").tobytes()
    out = decode_image(data)
    np.testing.assert_allclose(out[0, :, 0], values[0] / 65535.0, rtol=0, atol=1e-6)


def test_16bit_rgb_png_decodes_to_at_least_8bit_precision() -> None:
    # Pillow reads 16-bit RGB PNGs as 8-bit RGB, so only 8-bit precision survives (a documented limitation
    # would be better than the module docstring's "keeps 16-bit precision", which holds for grayscale only).
    values = np.array([[[1000, 2000, 65535], [0, 257, 30000]]], dtype=">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in values)
    out = decode_image(_crafted_png(2, 1, bit_depth=16, color_type=2, raw=raw))
    _check_rgb_float(out, 1, 2)
    np.testing.assert_allclose(out, values.astype(np.float64) / 65535.0, rtol=0, atol=1 / 255)


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [
        ((255, 0, 0, 0), (0, 255, 255)),
        ((0, 255, 0, 0), (255, 0, 255)),
        ((0, 0, 255, 0), (255, 255, 0)),
        ((0, 255, 255, 0), (255, 0, 0)),
        ((0, 0, 0, 128), (127, 127, 127)),
    ],
)
def test_cmyk_jpeg_decodes_to_rgb(cmyk: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    img = Image.new("CMYK", (16, 24), cmyk)
    data = _save(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    _check_rgb_float(out, 24, 16)
    got = _as_u8(out)
    assert np.abs(got - np.array(rgb)).max() <= 6, got[12, 8].tolist()


@pytest.mark.parametrize(("orientation", "k"), [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(orientation: int, k: int) -> None:
    arr = _corner_image()  # 24 x 40
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    data = _save(img, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == orientation

    out = decode_image(data)
    rotated = np.rot90(arr, k)  # k=-1: clockwise (orientation 6), k=1: counter-clockwise (8)
    _check_rgb_float(out, *rotated.shape[:2])
    if orientation in (6, 8):
        assert out.shape == (40, 24, 3)  # transposed

    # Exactly the stored pixels, rotated.
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(out, np.ascontiguousarray(np.rot90(stored, k)))

    # And the coloured corners land where the rotated image has them (within JPEG tolerance).
    got = _as_u8(out)
    assert np.abs(got - rotated.astype(np.int64)).mean() < 3
    h, w = rotated.shape[:2]
    for y, x in [(2, 2), (2, w - 3), (h - 3, 2), (h - 3, w - 3)]:
        assert np.abs(got[y, x] - rotated[y, x].astype(np.int64)).max() <= 12, (y, x)
    if orientation == 6:  # red was top-left; after a clockwise turn it is top-right
        assert np.abs(got[2, w - 3] - np.array(RED)).max() <= 12
    if orientation == 8:  # counter-clockwise: red ends bottom-left
        assert np.abs(got[h - 3, 2] - np.array(RED)).max() <= 12


def test_one_bit_image() -> None:
    img = Image.new("1", (5, 3), 0)
    img.putpixel((0, 0), 1)
    img.putpixel((4, 2), 1)
    data = _save(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    out = decode_image(data)
    _check_rgb_float(out, 3, 5)
    expected = np.zeros((3, 5, 3), dtype=np.float32)
    expected[0, 0] = expected[2, 4] = 1.0
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("PPM", {}),
        ("PNG", {}),
    ],
)
def test_lossless_formats_decode_exactly(fmt: str, kwargs: dict[str, object]) -> None:
    arr = _noise(13, 17, seed=7)
    data = _save(Image.fromarray(arr), fmt, **kwargs)
    assert Image.open(io.BytesIO(data)).format == fmt
    out = decode_image(data)
    _check_rgb_float(out, 13, 17)
    np.testing.assert_array_equal(_as_u8(out), arr)


def test_lossy_webp_and_jpeg_are_close() -> None:
    arr = _corner_image()
    for fmt in ("WEBP", "JPEG"):
        out = decode_image(_save(Image.fromarray(arr), fmt, quality=95))
        _check_rgb_float(out, 24, 40)
        assert np.abs(_as_u8(out) - arr.astype(np.int64)).mean() < 4, fmt


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("P", (4, 3), i) for i in range(2)]
    for f in frames:
        f.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    out = decode_image(data)
    _check_rgb_float(out, 3, 4)
    assert _as_u8(out).reshape(-1, 3).tolist() == [[255, 0, 0]] * 12


# --------------------------------------------------------------------------- writers


def test_png16_exact_integers_and_round_trip() -> None:
    values = np.array([[0.0, 1.0, 0.5, 1 / 65535], [0.25, -0.5, 1.5, 0.123456]], dtype=np.float32)
    data = encode_png16(values)
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.mode == "I;16" and img.size == (4, 2)
    stored = np.asarray(img).astype(np.int64)
    assert stored[0].tolist() == [0, 65535, 32768, 1]
    assert stored[1, :3].tolist() == [round(0.25 * 65535), 0, 65535]  # out of range is clipped
    decoded = decode_png16(data)
    assert decoded.dtype == np.float32 and decoded.shape == (2, 4)
    assert decoded[0, 0] == 0.0 and decoded[0, 1] == 1.0


def test_png16_round_trip_error_is_within_half_a_step() -> None:
    values = np.random.default_rng(3).random((31, 17), dtype=np.float64).astype(np.float32)
    decoded = decode_png16(encode_png16(values))
    assert decoded.shape == values.shape
    err = np.abs(decoded.astype(np.float64) - values.astype(np.float64)).max()
    assert err <= 0.5 / 65535 + 1e-7


def test_npy_round_trip_is_exact_float32() -> None:
    rng = np.random.default_rng(4)
    for arr in (rng.random((9, 5), dtype=np.float32), rng.standard_normal((4, 6, 3)).astype(np.float32)):
        back = decode_npy(encode_npy(arr))
        assert back.dtype == np.float32 and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)
    as64 = rng.random((3, 2))
    back = decode_npy(encode_npy(as64))
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, as64.astype(np.float32))
    fortran = np.asfortranarray(rng.random((5, 7), dtype=np.float32))
    np.testing.assert_array_equal(decode_npy(encode_npy(fortran)), fortran)


def _unit_normals(h: int, w: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((h, w, 3))
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def test_normals_png_stored_bytes_and_round_trip() -> None:
    special = np.array([[[-1.0, 0.0, 1.0]]], dtype=np.float32)
    data = encode_normals_png(special)
    img = Image.open(io.BytesIO(data))
    assert img.mode == "RGB" and img.size == (1, 1)
    assert list(img.getpixel((0, 0))) == [0, 128, 255]

    normals = _unit_normals(11, 13, seed=5)
    decoded = decode_normals_png(encode_normals_png(normals))
    assert decoded.dtype == np.float32 and decoded.shape == (11, 13, 3)
    assert np.abs(decoded - normals).max() <= 1 / 255 + 1e-6


def _pred(array: np.ndarray, kind: OutputKind) -> PredictionMap:
    return PredictionMap(array=array, kind=kind, model_id="test", processing_size=array.shape[:2])


def _color(pred: PredictionMap) -> np.ndarray:
    img = Image.open(io.BytesIO(encode_color_png(pred)))
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8
    return arr


def test_color_preview_puts_near_at_the_same_colour_for_depth_and_disparity() -> None:
    ramp = np.linspace(0.0, 1.0, 15, dtype=np.float32).reshape(3, 5)
    depth = _color(_pred(ramp, "depth"))
    disparity = _color(_pred(1.0 - ramp, "disparity"))  # the same scene: near is high
    assert depth.shape == (3, 5, 3)
    np.testing.assert_array_equal(depth, disparity)
    assert depth[0, 0].tolist() == [158, 1, 66]  # depth 0 (near) is the red end
    assert depth[-1, -1].tolist() == [94, 79, 162]  # far is violet
    assert _color(_pred(np.ones((2, 2), np.float32), "disparity"))[0, 0].tolist() == [158, 1, 66]


def test_color_preview_of_normals_is_the_normals_png() -> None:
    normals = _unit_normals(4, 6, seed=6)
    pred = _pred(normals, "normals")
    assert encode_color_png(pred) == encode_normals_png(normals)
    assert _color(pred).shape == (4, 6, 3)


def test_map_png_is_16bit_for_scalars_and_rgb_for_normals() -> None:
    depth = np.random.default_rng(8).random((6, 9), dtype=np.float32)
    for kind in ("depth", "disparity"):
        img = Image.open(io.BytesIO(encode_map_png(_pred(depth, kind))))
        assert img.mode == "I;16" and img.size == (9, 6)
    img = Image.open(io.BytesIO(encode_map_png(_pred(_unit_normals(6, 9, seed=9), "normals"))))
    assert img.mode == "RGB" and img.size == (9, 6)


def test_spectral_control_points() -> None:
    assert spectral(np.array(0.0)).tolist() == [158, 1, 66]
    assert spectral(np.array(1.0)).tolist() == [94, 79, 162]
    assert spectral(np.array(0.5)).tolist() == [255, 255, 191]  # the middle control point
    out = spectral(np.array([[-3.0, np.nan], [7.0, 0.1]]))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [158, 1, 66]  # clipped low
    assert out[0, 1].tolist() == [158, 1, 66]  # NaN -> 0
    assert out[1, 0].tolist() == [94, 79, 162]  # clipped high
    assert out[1, 1].tolist() == [213, 62, 79]  # 0.1 is exactly the second control point
