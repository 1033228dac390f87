"""The float map formats: half-float OpenEXR and float32 TIFF. Their libraries (OpenEXR, tifffile) come with the
worker extra, so only the worker and the CLI encode them; the front-ends never import this module."""

from __future__ import annotations

import io

import numpy as np
import OpenEXR
import tifffile

from service.codec.maps import TiffCompression


def encode_exr(values: np.ndarray) -> bytes:
    """Half-float OpenEXR, ZIP-compressed (lossless on the halves): channel Y for a scalar map (what image
    viewers and OpenCV read as gray), R, G, B for normals."""
    half = np.ascontiguousarray(values, dtype=np.float16)
    channels = {"Y": half} if half.ndim == 2 else {"RGB": half}
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    buf = io.BytesIO()
    OpenEXR.File(header, channels).write(buf)
    return buf.getvalue()


def decode_exr(data: bytes) -> np.ndarray:
    channels = OpenEXR.File(io.BytesIO(data)).channels()
    if "Y" in channels:
        return np.asarray(channels["Y"].pixels)
    if "RGB" in channels:
        return np.asarray(channels["RGB"].pixels)
    return np.stack([np.asarray(channels[c].pixels) for c in ("R", "G", "B")], axis=-1)


def encode_tiff(values: np.ndarray, compression: TiffCompression = "deflate") -> bytes:
    """float32 TIFF with the floating-point predictor; deflate (readable everywhere) or zstd (faster)."""
    arr = np.ascontiguousarray(values, dtype=np.float32)
    kwargs: dict[str, object] = {}
    if compression != "none":
        kwargs = {
            "compression": "zlib" if compression == "deflate" else "zstd",
            "compressionargs": {"level": 1},
            "predictor": True,
        }
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="rgb" if arr.ndim == 3 else "minisblack", **kwargs)
    return buf.getvalue()


def decode_tiff(data: bytes) -> np.ndarray:
    return tifffile.imread(io.BytesIO(data))
