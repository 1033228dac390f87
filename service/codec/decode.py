"""Image decoding with limits. Shared by the front-ends (header probe), the worker and the CLI; no torch here.

Decoding applies EXIF orientation, drops alpha, expands grayscale and keeps 16-bit grayscale precision
(Pillow reads 16-bit RGB as 8-bit). Everything it refuses raises `ImageDecodeError` with a one-line reason.

8-bit images stay uint8 until they reach the runtime's device (a quarter of the bytes of float32, and the
conversion runs there). JPEG goes through simplejpeg (libjpeg-turbo without Pillow's copies: 1.6x faster at
1080p, 1.8x at 4K here, see docs/benchmarks.md), and a JPEG much larger than what the model sees is decoded at
a reduced DCT scale (1/2, 1/4, 1/8), never below twice the processing size.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # the fast JPEG path; Pillow decodes everything when it is missing
    import simplejpeg
except ImportError:  # pragma: no cover - a declared dependency; kept optional for odd platforms
    simplejpeg = None

DEFAULT_MAX_PIXELS = 40_000_000
SUPPORTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM"})
#: Only these parsers ever see a client's bytes: Pillow knows dozens of formats (EPS runs Ghostscript, PSD, ICNS,
#: FITS, ...) whose readers are attack surface for no use; anything else is unidentified before any is tried.
OPEN_FORMATS = tuple(sorted(SUPPORTED_FORMATS))
EXIF_ORIENTATION = 0x0112
#: DCT scale denominators libjpeg decodes at cheaply (Pillow's `draft` uses the same ones).
JPEG_SCALES = (8, 4, 2)


class ImageDecodeError(ValueError):
    """An input image that cannot be used; the message is one line, fit to show a user."""


class ImageTooLargeError(ImageDecodeError):
    """Over the configured pixel limit (a decompression-bomb guard as well)."""


@dataclass(frozen=True)
class ImageHeader:
    """What the header alone says: enough to plan the processing size before any pixel is decoded."""

    format: str
    height: int  # after EXIF orientation
    width: int
    orientation: int = 1

    @property
    def transposed(self) -> bool:
        """EXIF orientations 5-8 swap the stored width and height."""
        return self.orientation in (5, 6, 7, 8)


@dataclass(frozen=True)
class DecodedImage:
    """`pixels` is `[h, w, 3]` uint8 (or float32 in [0, 1] for 16-bit sources). `size` is the full image's
    `(H, W)`; `pixels` is smaller only when a JPEG was decoded at a reduced DCT scale."""

    pixels: np.ndarray
    size: tuple[int, int]
    format: str

    @property
    def reduced(self) -> bool:
        return tuple(self.pixels.shape[:2]) != self.size


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int, int]:
    """Check format and size from the header alone (no pixel decoding): `(format, width, height)`."""
    header = read_header(data, max_pixels)
    return header.format, header.width, header.height


def read_header(data: bytes | Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _header(_open(_read(data), max_pixels))


def decode_pixels(
    data: bytes | Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: tuple[int, int] | None = None
) -> DecodedImage:
    """Bytes or a path -> RGB pixels. With `min_size` (`(h, w)` after orientation), a JPEG may be decoded at
    a reduced DCT scale as long as both sides stay at least that large."""
    raw = _read(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(raw, max_pixels)
        header = _header(img)
        size = (header.height, header.width)
        scale = _jpeg_scale(header, min_size)
        if header.format == "JPEG" and simplejpeg is not None and img.mode in ("RGB", "L"):
            pixels = _decode_jpeg_fast(raw, img, header, scale)
            if pixels is not None:
                return DecodedImage(pixels, size, header.format)
        if scale > 1:
            img.draft("RGB", (-(-img.size[0] // scale), -(-img.size[1] // scale)))
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"truncated or corrupt image data ({exc})") from exc
    pixels = _to_rgb(img)
    return DecodedImage(pixels, size if scale > 1 else (pixels.shape[0], pixels.shape[1]), header.format)


def decode_image(data: bytes | Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes or a path -> `[H, W, 3]` float32 RGB in [0, 1], at full size."""
    return to_float(decode_pixels(data, max_pixels).pixels)


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1] (`x / 255`, the same numbers the device computes); float32 as is."""
    if pixels.dtype == np.uint8:
        return np.asarray(pixels, dtype=np.float32) / 255.0
    return pixels


def decode_raw_rgb(data: bytes, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Uncompressed uint8 RGB rows (what a camera driver hands over) -> `[H, W, 3]` uint8, without a copy."""
    check_raw_rgb(len(data), height, width, max_pixels)
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)


def check_raw_rgb(size: int, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    if height < 1 or width < 1:
        raise ImageDecodeError(f"raw image has no pixels ({width} x {height})")
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"image is {width} x {height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    if size != height * width * 3:
        raise ImageDecodeError(f"raw image of {width} x {height} RGB needs {height * width * 3} bytes, got {size}")


def _read(data: bytes | Path | str) -> bytes:
    try:
        raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from exc
    if not raw:
        raise ImageDecodeError("empty file (0 bytes)")
    return raw


def _open(raw: bytes, max_pixels: int) -> Image.Image:
    """Open lazily and refuse what is not a supported image or is too large, before any decoding."""
    try:
        img = Image.open(io.BytesIO(raw), formats=OPEN_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"not a recognised image (corrupt, or not one of the supported formats: {', '.join(OPEN_FORMATS)})"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except (OSError, ValueError, EOFError, SyntaxError, struct.error) as exc:
        # Pillow's header readers raise these when a file is cut short or mangled.
        raise ImageDecodeError(f"truncated or corrupt image header ({exc})") from exc
    if img.format not in SUPPORTED_FORMATS:
        raise ImageDecodeError(
            f"unsupported image format {img.format}; supported: {', '.join(sorted(SUPPORTED_FORMATS))}"
        )
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"image has no pixels ({w} x {h})")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"image is {w} x {h} = {w * h} pixels, over the limit of {max_pixels}")
    return img


def _header(img: Image.Image) -> ImageHeader:
    w, h = img.size
    orientation = _orientation(img)
    header = ImageHeader(str(img.format), h, w, orientation)
    if header.transposed:
        return ImageHeader(header.format, w, h, orientation)
    return header


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation the header carries, without decoding pixels. (Pillow finds a PNG's eXIf chunk only
    by decoding the image data when it comes after IDAT; such a file is oriented on decode, and its size is
    then taken from the decoded pixels.)"""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        orientation = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a mangled EXIF block is ignored, as ImageOps.exif_transpose ignores it
        return 1
    return orientation if orientation in range(1, 9) else 1


def _jpeg_scale(header: ImageHeader, min_size: tuple[int, int] | None) -> int:
    """The largest DCT reduction (8, 4, 2 or 1) that keeps both sides at least `min_size`."""
    if header.format != "JPEG" or min_size is None or min(min_size) < 1:
        return 1
    for scale in JPEG_SCALES:
        if header.height // scale >= min_size[0] and header.width // scale >= min_size[1]:
            return scale
    return 1


def _decode_jpeg_fast(raw: bytes, img: Image.Image, header: ImageHeader, scale: int) -> np.ndarray | None:
    """simplejpeg for baseline and progressive RGB/gray JPEGs; None (Pillow decides) on anything it refuses."""
    assert simplejpeg is not None
    stored_w, stored_h = img.size
    try:
        rgb = simplejpeg.decode_jpeg(
            raw,
            colorspace="RGB",
            min_height=-(-stored_h // scale) if scale > 1 else 0,
            min_width=-(-stored_w // scale) if scale > 1 else 0,
            min_factor=float(scale),
            strict=True,
        )
    except ValueError:  # corrupt, truncated or an unusual layout: Pillow reports it in its own words
        return None
    return _orient(rgb, header.orientation)


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation applied as `ImageOps.exif_transpose` does, on an `[H, W, C]` array."""
    oriented = {
        1: lambda x: x,
        2: lambda x: x[:, ::-1],
        3: lambda x: x[::-1, ::-1],
        4: lambda x: x[::-1],
        5: lambda x: x.transpose(1, 0, 2),
        6: lambda x: np.rot90(x, k=-1),
        7: lambda x: x[::-1, ::-1].transpose(1, 0, 2),
        8: lambda x: np.rot90(x, k=1),
    }[orientation](a)
    return np.ascontiguousarray(oriented)


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow gives 16-bit gray (PNG, TIFF, PGM) as I;16* or I; the scale follows the container's bit
        # depth, never the pixel values (a dark 16-bit image is not an 8-bit one).
        gray = np.asarray(img, dtype=np.float64)
        arr = np.clip(gray / 65535.0, 0.0, 1.0).astype(np.float32)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "F":
        raise ImageDecodeError("floating-point images (mode F) are not supported; send 8- or 16-bit RGB/gray")
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    # RGBA/LA: drop alpha (no compositing); L/1: expand; CMYK/YCbCr/LAB: colour-convert.
    rgb = img if mode == "RGB" else img.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8)
