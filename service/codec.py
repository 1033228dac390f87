"""Image decoding with limits, and output encodings. Shared by the front-ends and the CLI; no torch here.

Decoding applies EXIF orientation, drops alpha, expands grayscale and keeps 16-bit grayscale precision
(Pillow reads 16-bit RGB as 8-bit). Everything
it refuses raises `ImageDecodeError` with a one-line reason.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.outputs import PredictionMap

DEFAULT_MAX_PIXELS = 40_000_000
SUPPORTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM"})

# ColorBrewer "Spectral" (11 classes), the control points of matplotlib's Spectral colormap.
_SPECTRAL = np.array(
    [
        [0.619608, 0.003922, 0.258824],
        [0.835294, 0.243137, 0.309804],
        [0.956863, 0.427451, 0.262745],
        [0.992157, 0.682353, 0.380392],
        [0.996078, 0.878431, 0.545098],
        [1.000000, 1.000000, 0.749020],
        [0.901961, 0.960784, 0.596078],
        [0.670588, 0.866667, 0.643137],
        [0.400000, 0.760784, 0.647059],
        [0.196078, 0.533333, 0.741176],
        [0.368627, 0.309804, 0.635294],
    ],
    dtype=np.float64,
)


class ImageDecodeError(ValueError):
    """An input image that cannot be used; the message is one line, fit to show a user."""


class ImageTooLargeError(ImageDecodeError):
    """Over the configured pixel limit (a decompression-bomb guard as well)."""


def decode_image(data: bytes | Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes or a path -> `[H, W, 3]` float32 RGB in [0, 1]."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(_read(data), max_pixels)
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"truncated or corrupt image data ({exc})") from exc
    return _to_rgb_float(img)


def decode_raw_rgb(data: bytes, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Uncompressed uint8 RGB rows (what a camera driver hands over) -> `[H, W, 3]` float32 in [0, 1]."""
    check_raw_rgb(len(data), height, width, max_pixels)
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).astype(np.float32) / 255.0


def check_raw_rgb(size: int, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    if height < 1 or width < 1:
        raise ImageDecodeError(f"raw image has no pixels ({width} x {height})")
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"image is {width} x {height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    if size != height * width * 3:
        raise ImageDecodeError(f"raw image of {width} x {height} RGB needs {height * width * 3} bytes, got {size}")


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int, int]:
    """Check format and size from the header alone (no pixel decoding): `(format, width, height)`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(_read(data), max_pixels)
    return str(img.format), img.size[0], img.size[1]


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
        img = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not a recognised image (corrupt or unsupported format)") from exc
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


def _to_rgb_float(img: Image.Image) -> np.ndarray:
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
    rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.float32) / 255.0


# --------------------------------------------------------------------------- outputs


def encode_png16(values: np.ndarray) -> bytes:
    """`[H, W]` in [0, 1] -> 16-bit grayscale PNG with `round(v * 65535)`."""
    q = np.round(np.clip(values, 0.0, 1.0) * 65535.0).astype(np.uint16)
    return _png(Image.fromarray(q))


def decode_png16(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64).astype(np.float32) / 65535.0


def encode_normals_png(normals: np.ndarray) -> bytes:
    """`[H, W, 3]` unit vectors -> 8-bit RGB PNG with `(n + 1) / 2 * 255`."""
    q = np.round((np.clip(normals, -1.0, 1.0) + 1.0) / 2.0 * 255.0).astype(np.uint8)
    return _png(Image.fromarray(q))


def decode_normals_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0 * 2.0 - 1.0


def encode_npy(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(values, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def spectral(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] to 8-bit RGB along Spectral (0 = dark red, 1 = violet)."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_SPECTRAL) - 1)
    lo = np.floor(v).astype(np.int64).clip(0, len(_SPECTRAL) - 2)
    t = (v - lo)[..., None]
    rgb = _SPECTRAL[lo] * (1.0 - t) + _SPECTRAL[lo + 1] * t
    return np.round(rgb * 255.0).astype(np.uint8)


def encode_spectral_png(values: np.ndarray) -> bytes:
    """`[H, W]` in [0, 1] as a Spectral-coloured 8-bit RGB PNG."""
    return _png(Image.fromarray(spectral(values)))


def encode_color_png(pred: PredictionMap) -> bytes:
    """A preview: Spectral with near in red for depth and disparity alike; normals as their RGB image."""
    if pred.kind == "normals":
        return encode_normals_png(pred.array)
    return encode_spectral_png(1.0 - pred.array if pred.near_is_high else pred.array)


def encode_map_png(pred: PredictionMap) -> bytes:
    """The lossless-enough default: 16-bit gray for scalar maps, 8-bit RGB for normals."""
    return encode_normals_png(pred.array) if pred.kind == "normals" else encode_png16(pred.array)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
