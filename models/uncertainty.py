"""Multi-seed (Lotus-G) ensembling: align members, reduce them, and measure their spread.

Depth/disparity members are aligned to the first one by a least-squares scale and shift (they are
affine-invariant), then reduced by mean (uncertainty = standard deviation) or median (uncertainty =
median absolute deviation). Normals are reduced to a unit mean (or component-wise median) direction, and
the uncertainty is the mean (or median) angle of the members to it, in degrees.
"""

from __future__ import annotations

from typing import Literal

import torch

from models.predictors.processing import normalize_vectors

Reduction = Literal["mean", "median"]


def align_scale_shift(members: torch.Tensor) -> torch.Tensor:
    """`[K, H, W]` -> each member mapped onto member 0 by the closed-form least-squares `s * m + t`."""
    flat = members.reshape(members.shape[0], -1).double()
    ref = flat[0]
    mean_m = flat.mean(dim=1, keepdim=True)
    var_m = ((flat - mean_m) ** 2).mean(dim=1, keepdim=True)
    cov = ((flat - mean_m) * (ref - ref.mean())).mean(dim=1, keepdim=True)
    scale = torch.where(var_m > 1e-12, cov / var_m.clamp(min=1e-12), torch.ones_like(var_m))
    shift = ref.mean() - scale * mean_m
    return (flat * scale + shift).reshape(members.shape).to(members.dtype)


def reduce_scalar(members: torch.Tensor, reduction: Reduction) -> tuple[torch.Tensor, torch.Tensor]:
    """`[K, H, W]` in [0, 1] -> (prediction `[H, W]` clipped to [0, 1], uncertainty `[H, W]`)."""
    aligned = align_scale_shift(members)
    if reduction == "mean":
        pred = aligned.mean(dim=0)
        spread = aligned.std(dim=0, unbiased=False)
    else:
        pred = aligned.median(dim=0).values
        spread = (aligned - pred).abs().median(dim=0).values
    return pred.clamp(0.0, 1.0), spread


def reduce_normals(members: torch.Tensor, reduction: Reduction) -> tuple[torch.Tensor, torch.Tensor]:
    """`[K, 3, H, W]` unit vectors -> (direction `[3, H, W]`, angular deviation in degrees `[H, W]`)."""
    centre = members.mean(dim=0) if reduction == "mean" else members.median(dim=0).values
    centre = normalize_vectors(centre, dim=0)
    cos = (members * centre.unsqueeze(0)).sum(dim=1).clamp(-1.0, 1.0)
    angles = torch.rad2deg(torch.arccos(cos))
    spread = angles.mean(dim=0) if reduction == "mean" else angles.median(dim=0).values
    return centre, spread
