"""What may be sent as an image, turned into bytes the server decodes.

Encoded files (PNG, JPEG, WebP, ...) go as they are. Pixels (a numpy array or a PIL image) go as binary
PPM/PGM: a 15-byte header on the raw rows, so the client spends no time compressing and the server decodes
them with a copy; on a slow link, send an encoded file instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, Union

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image

ImageInput: TypeAlias = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "Image", np.ndarray]


def image_bytes(image: ImageInput) -> bytes:
    """A path, encoded bytes, a PIL image or a uint8 `[H, W, 3]` (or `[H, W]` gray) array -> request body."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        return netpbm(image)
    if _is_pil(image):
        return netpbm(_pil_pixels(image))
    raise TypeError(
        f"image must be a path, encoded bytes, a PIL image or a uint8 [H, W, 3] numpy array, not {type(image).__name__}"
    )


def pixels_of(image: Any) -> np.ndarray | None:
    """The uint8 `[H, W, 3]` pixels of an array or PIL image (None for encoded data): what gRPC sends raw."""
    if isinstance(image, np.ndarray):
        arr = _checked(image)
        return arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)
    if _is_pil(image):
        arr = _pil_pixels(image)
        return arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)
    return None


def netpbm(arr: np.ndarray) -> bytes:
    """uint8 `[H, W, 3]` -> binary PPM (P6); `[H, W]` or `[H, W, 1]` -> PGM (P5)."""
    arr = _checked(arr)
    magic = b"P6" if arr.ndim == 3 else b"P5"
    header = b"%s\n%d %d\n255\n" % (magic, arr.shape[1], arr.shape[0])
    return header + np.ascontiguousarray(arr).tobytes()


def _checked(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"an image array must be [H, W, 3] RGB or [H, W] gray, got shape {list(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ValueError(
            f"an image array must be uint8 (0-255), got {arr.dtype}; "
            "for floats in [0, 1] send (arr * 255).round().astype(np.uint8)"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"an image array has no pixels (shape {list(arr.shape)})")
    return arr


def _is_pil(image: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(image, Image.Image)


def _pil_pixels(image: Image) -> np.ndarray:
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return np.asarray(image)
