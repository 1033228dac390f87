"""Map encodings: 16-bit PNG, 8-bit normals PNG, the colour preview, NPY (the float formats, OpenEXR and TIFF,
need the worker's libraries: service/worker/float_maps.py).

Quantisation is defined once here (`round(v * 65535)` for [0, 1] maps, `round((n + 1) / 2 * 255)` for
normals); the runtime's device applies the same arithmetic (models/predictors/forms.py), so a map that
arrives already quantised encodes to the same bytes as one quantised here.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image

from models.colormap import spectral_lut
from models.outputs import PredictionMap
from service.codec.png import DEFAULT_LEVEL, encode_png

TiffCompression = Literal["deflate", "zstd", "none"]


def quantize_unit(values: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint16 `round(v * 65535)` (out of range clipped)."""
    return np.round(np.clip(values, 0.0, 1.0) * 65535.0).astype(np.uint16)


def quantize_normals(normals: np.ndarray) -> np.ndarray:
    """Unit vectors -> uint8 `round((n + 1) / 2 * 255)`."""
    return np.round((np.clip(normals, -1.0, 1.0) + 1.0) / 2.0 * 255.0).astype(np.uint8)


def encode_png16(values: np.ndarray, level: int = DEFAULT_LEVEL) -> bytes:
    """`[H, W]` in [0, 1] -> 16-bit grayscale PNG with `round(v * 65535)`."""
    return encode_png(quantize_unit(values), level)


def decode_png16(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data), formats=("PNG",)), dtype=np.float64).astype(np.float32) / 65535.0


def encode_normals_png(normals: np.ndarray, level: int = DEFAULT_LEVEL) -> bytes:
    """`[H, W, 3]` unit vectors -> 8-bit RGB PNG with `(n + 1) / 2 * 255`."""
    return encode_png(quantize_normals(normals), level)


def decode_normals_png(data: bytes) -> np.ndarray:
    return (
        np.asarray(Image.open(io.BytesIO(data), formats=("PNG",)).convert("RGB"), dtype=np.float32) / 255.0 * 2.0 - 1.0
    )


def encode_npy(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(values, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def encode_npy_as(values: np.ndarray) -> bytes:
    """NPY in the array's own dtype (class maps are uint8 indices, not floats)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(values), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def colorize(values: np.ndarray, near_is_high: bool = False) -> np.ndarray:
    """`[H, W]` in [0, 1] -> Spectral 8-bit RGB with near in red: the 16-bit value indexes the table."""
    q = quantize_unit(1.0 - values if near_is_high else values)
    return spectral_lut()[q]


def encode_spectral_png(values: np.ndarray, level: int = DEFAULT_LEVEL) -> bytes:
    """`[H, W]` in [0, 1] as a Spectral-coloured 8-bit RGB PNG (0 = red)."""
    return encode_png(colorize(values), level)


def encode_color_png(pred: PredictionMap, level: int = DEFAULT_LEVEL) -> bytes:
    """A preview: Spectral with near in red for depth and disparity alike; normals as their RGB image."""
    if pred.form == "color":
        return encode_png(pred.array, level)
    if pred.kind == "normals":
        return encode_normals_png(pred.float_array(), level)
    return encode_png(colorize(pred.float_array(), pred.near_is_high), level)


def encode_map_png(pred: PredictionMap, level: int = DEFAULT_LEVEL) -> bytes:
    """The lossless-enough default: 16-bit gray for scalar maps, 8-bit RGB for normals."""
    if pred.form == "quantized":
        return encode_png(pred.array, level)
    if pred.kind == "normals":
        return encode_normals_png(pred.array, level)
    return encode_png16(pred.array, level)
