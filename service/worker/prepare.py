"""Image bytes -> pixels and geometry for one predictor, decoded no larger than the model needs.

Shared by the worker's lanes and `dense-serve predict`. The header gives the image's size; when the model
will see it much smaller (its processing size), a JPEG is decoded at a reduced DCT scale that keeps both
sides at least `DRAFT_MARGIN` times the processing size, and the map is still resized back to the full size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.inference import DensePredictor
from models.predictors.processing import Geometry
from service import codec

#: A JPEG is decoded at a reduced scale only while both sides stay this many times the processing size.
DRAFT_MARGIN = 2


def decode_for(
    model: DensePredictor,
    image: bytes | Path,
    processing_res: int | None,
    max_pixels: int = codec.DEFAULT_MAX_PIXELS,
    jpeg_draft: bool = True,
) -> tuple[np.ndarray, Geometry]:
    """Raises `codec.ImageDecodeError` for a bad image, ValueError for a processing size the model refuses."""
    min_size = draft_size(model, image, processing_res, max_pixels) if jpeg_draft else None
    decoded = codec.decode_pixels(image, max_pixels, min_size)
    return decoded.pixels, model.plan_size(decoded.size[0], decoded.size[1], processing_res)


def draft_size(
    model: DensePredictor, image: bytes | Path, processing_res: int | None, max_pixels: int
) -> tuple[int, int] | None:
    """The smallest size a JPEG may be decoded at (None: full size, and for every other format)."""
    header = codec.read_header(image, max_pixels)
    if header.format != "JPEG":
        return None
    ph, pw = model.plan_size(header.height, header.width, processing_res).processing_hw
    if (ph, pw) == (header.height, header.width):
        return None
    return ph * DRAFT_MARGIN, pw * DRAFT_MARGIN
