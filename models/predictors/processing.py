"""Shared pre- and post-processing: resize to the processing size, pad to the VAE stride, and back.

Equal to diffusers' Marigold image processor, except that an extreme aspect ratio keeps at least one
pixel on the short edge instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LATENT_STRIDE = 8


@dataclass(frozen=True)
class Geometry:
    """Sizes one image passes through, kept to undo padding and resizing after decoding."""

    input_hw: tuple[int, int]
    processing_hw: tuple[int, int]
    padded_hw: tuple[int, int]

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.padded_hw[0] // LATENT_STRIDE, self.padded_hw[1] // LATENT_STRIDE


def plan(height: int, width: int, processing_res: int) -> Geometry:
    """Long edge to `processing_res` (0 keeps the native size), then pad up to a multiple of 8."""
    if height < 1 or width < 1:
        raise ValueError(f"image has no pixels: {width} x {height}")
    if processing_res < 0 or processing_res % LATENT_STRIDE:
        raise ValueError(f"processing_res must be 0 or a positive multiple of {LATENT_STRIDE}, got {processing_res}")
    if processing_res == 0:
        ph, pw = height, width
    else:
        long = max(height, width)
        ph = max(1, height * processing_res // long)
        pw = max(1, width * processing_res // long)
    return Geometry(
        input_hw=(height, width),
        processing_hw=(ph, pw),
        padded_hw=(-(-ph // LATENT_STRIDE) * LATENT_STRIDE, -(-pw // LATENT_STRIDE) * LATENT_STRIDE),
    )


def preprocess(image: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """`[3, H, W]` in [0, 1] -> `[3, PH, PW]` in [-1, 1], resized with antialiasing and replicate-padded.

    `H, W` is usually `geometry.input_hw`; a JPEG decoded at a reduced scale is smaller, and resizes from there.
    """
    x = image.unsqueeze(0).float()
    if tuple(x.shape[-2:]) != geometry.processing_hw:
        x = F.interpolate(x, geometry.processing_hw, mode="bilinear", antialias=True)
    ph, pw = geometry.processing_hw
    pad_h, pad_w = geometry.padded_hw[0] - ph, geometry.padded_hw[1] - pw
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return (x * 2.0 - 1.0).squeeze(0)


def unpad(pred: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """`[C, PPH, PPW]` -> `[C, PH, PW]`: drop the padded rows and columns."""
    ph, pw = geometry.processing_hw
    return pred[:, :ph, :pw]


def resize_back(pred: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Bilinear to the input size (no antialiasing, like diffusers' `match_input_resolution`)."""
    if tuple(pred.shape[-2:]) == geometry.input_hw:
        return pred
    return F.interpolate(pred.unsqueeze(0), geometry.input_hw, mode="bilinear", antialias=False).squeeze(0)


def normalize_vectors(x: torch.Tensor, dim: int, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp(min=eps)
