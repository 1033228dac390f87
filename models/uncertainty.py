"""Multi-seed ensembling (Lotus-G, and Marigold's `seeds` method): align members, reduce them, and measure
their spread; and the step-change uncertainty of a multi-step trajectory (`step_change`).

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


def step_change(track: torch.Tensor) -> torch.Tensor:
    """How much the decoded x0 prediction still changes over the last steps of one trajectory.

    `track` holds the decoded x0 maps of the last k + 1 steps, oldest first: `[k + 1, H, W]` depth in [0, 1] or
    `[k + 1, 3, H, W]` unit normals. Depth: every map is affine-aligned (least squares) to the last one, then
    the mean absolute change between consecutive maps, in the final map's units. Normals: the mean angle
    between consecutive directions, in degrees. Zero where the steps agree.
    """
    if track.shape[0] < 2:
        raise ValueError("step change needs the x0 predictions of at least two steps")
    if track.dim() == 4:
        # atan2(|a x b|, a . b): exact 0 for equal vectors, where arccos of a rounded dot product is not
        a, b = track[1:], track[:-1]
        sin = torch.linalg.vector_norm(torch.linalg.cross(a, b, dim=1), dim=1)
        return torch.rad2deg(torch.atan2(sin, (a * b).sum(dim=1))).mean(dim=0)
    aligned = align_scale_shift(track.flip(0)).flip(0)
    return (aligned[1:] - aligned[:-1]).abs().mean(dim=0)
