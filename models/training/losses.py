"""Training losses of the two recipes (see docs/model-semantics.md, "Training recipes"), in torch.

- E2E-FT depth: L1 between the ground truth and the prediction after a per-sample closed-form least-squares
  scale and shift fit on valid pixels. The fit runs in float32 (also under autocast) and stays in the graph,
  so gradients flow through the aligned prediction and through the fitted scale and shift. Upstream
  (diffusion-e2e-ft `training/train.py`, `util/loss.py`, `dataloaders/load.py`) scores METRIC depth clipped
  to its per-sample 2 % / 98 % quantiles (`clip_to_quantiles`) and takes one mean over all valid pixels of
  the batch (`reduction="pixel"`); the prediction is clamped to [-1, 1] by the caller before the fit.
- E2E-FT normals: mean angle (radians) between unit vectors, arccos of the cosine clamped away from +-1 so the
  gradient stays finite when prediction and target agree.
- Lotus: x0-prediction MSE in latent space on the annotation branch, plus the reconstruction branch (the
  detail preserver, target = the image latent).
- Targets: Marigold-style affine normalisation of depth or disparity to [-1, 1] between per-sample quantiles.

Maps are `[B, C, H, W]` with a bool `valid` of `[B, 1, H, W]`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

_FIT_EPS = 1e-12
ACOS_CLAMP = 1e-6


def fit_scale_shift(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (scale, shift) minimising the masked squared error of `scale * pred + shift` to `target`.

    Solved in closed form on mean-centred values (better conditioned than the raw normal equations in
    float32). Returns `[B]` scale, `[B]` shift and `[B]` valid-pixel counts.
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p, y = pred.float().flatten(1), target.float().flatten(1)
        m = valid.expand_as(pred).flatten(1).float()
        n = m.sum(dim=1)
        n_safe = n.clamp(min=1.0)
        p_mean = (m * p).sum(dim=1) / n_safe
        y_mean = (m * y).sum(dim=1) / n_safe
        pc, yc = p - p_mean[:, None], y - y_mean[:, None]
        var = (m * pc * pc).sum(dim=1)
        cov = (m * pc * yc).sum(dim=1)
        scale = cov / var.clamp(min=_FIT_EPS)
        shift = y_mean - scale * p_mean
    return scale, shift, n


def affine_invariant_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    detach_fit: bool = False,
    reduction: Literal["sample", "pixel"] = "sample",
) -> torch.Tensor:
    """E2E-FT depth loss: masked |scale * pred + shift - target| with a per-sample least-squares fit.

    `reduction="pixel"` (upstream E2E-FT) is one mean over all valid pixels of the batch, so a sample weighs by
    its valid pixels; `"sample"` averages each sample's mean. Samples with fewer than 2 valid pixels are left
    out; a batch with none gives a zero that keeps the graph. `detach_fit=True` treats the fitted scale and
    shift as constants.
    """
    if reduction not in ("sample", "pixel"):
        raise ValueError(f"reduction must be 'sample' or 'pixel', got {reduction!r}")
    scale, shift, n = fit_scale_shift(pred, target, valid)
    if detach_fit:
        scale, shift = scale.detach(), shift.detach()
    with torch.autocast(device_type=pred.device.type, enabled=False):
        aligned = scale.view(-1, *([1] * (pred.dim() - 1))) * pred.float() + shift.view(-1, *([1] * (pred.dim() - 1)))
        used = n >= 2
        if not bool(used.any()):
            return pred.float().sum() * 0.0
        m = valid.expand_as(pred).float() * used.view(-1, *([1] * (pred.dim() - 1))).float()
        abs_err = (m * (aligned - target.float()).abs()).flatten(1).sum(dim=1)
        if reduction == "pixel":
            return abs_err.sum() / n[used].sum()
        return (abs_err / n.clamp(min=1.0))[used].mean()


def clip_to_quantiles(
    depth: torch.Tensor, valid: torch.Tensor, low: float = 0.02, high: float = 0.98
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream E2E-FT's depth target: per sample, metric depth clamped to the `low` / `high` quantiles of its
    valid values (outliers removed, the scale kept in metres). Returns (target, valid); a sample whose two
    quantiles coincide gets an empty mask, as upstream; invalid pixels are 0."""
    out = torch.zeros_like(depth, dtype=torch.float32)
    ok = valid.expand_as(depth).clone()
    for b in range(depth.shape[0]):
        values = depth[b][ok[b]].float()
        if values.numel() == 0:
            continue
        q = torch.quantile(values, torch.tensor([low, high], dtype=torch.float32, device=values.device))
        if not bool(q[1] > q[0]):
            ok[b] = False
            continue
        out[b] = torch.where(ok[b], depth[b].float().clamp(q[0], q[1]), torch.zeros_like(out[b]))
    return out, ok


def normals_angular_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, clamp: float = ACOS_CLAMP
) -> torch.Tensor:
    """E2E-FT normals loss: mean over valid pixels of arccos(clamp(<n_pred, n_gt>)) in radians.

    Both fields are L2-normalised along the channel axis first (the decoder's output is not unit length).
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p = F.normalize(pred.float(), dim=1, eps=1e-6)
        t = F.normalize(target.float(), dim=1, eps=1e-6)
        cos = (p * t).sum(dim=1, keepdim=True).clamp(-1.0 + clamp, 1.0 - clamp)
        angle = torch.acos(cos)
        m = valid.float()
        count = m.sum()
        if float(count) == 0.0:
            return pred.float().sum() * 0.0
        return (angle * m).sum() / count


def latent_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x0-prediction MSE in latent space (float32 reduction)."""
    return F.mse_loss(pred.float(), target.float())


def lotus_loss(
    annotation_pred: torch.Tensor,
    annotation_target: torch.Tensor,
    reconstruction_pred: torch.Tensor | None = None,
    image_latent: torch.Tensor | None = None,
    reconstruction_weight: float = 1.0,
) -> torch.Tensor:
    """Lotus: MSE(annotation x0, target latent) + weight * MSE(reconstruction x0, image latent).

    The reconstruction branch is the same UNet run with the reconstruction switcher; pass both or neither.
    """
    loss = latent_mse(annotation_pred, annotation_target)
    if (reconstruction_pred is None) != (image_latent is None):
        raise ValueError("pass both reconstruction_pred and image_latent, or neither")
    if reconstruction_pred is not None and image_latent is not None:
        loss = loss + reconstruction_weight * latent_mse(reconstruction_pred, image_latent)
    return loss


def quantile_normalize(
    x: torch.Tensor, valid: torch.Tensor, low: float = 0.02, high: float = 0.98, eps: float = 1e-6
) -> torch.Tensor:
    """Per sample, map the `low` and `high` quantiles of valid values to -1 and 1 and clip; invalid -> 0."""
    out = torch.zeros_like(x, dtype=torch.float32)
    mask = valid.expand_as(x)
    for b in range(x.shape[0]):
        values = x[b][mask[b]].float()
        if values.numel() == 0:
            continue
        q = torch.quantile(values, torch.tensor([low, high], dtype=torch.float32, device=values.device))
        scaled = (x[b].float() - q[0]) / (q[1] - q[0]).clamp(min=eps) * 2.0 - 1.0
        out[b] = torch.where(mask[b], scaled.clamp(-1.0, 1.0), torch.zeros_like(scaled))
    return out


def depth_target(depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Affine-invariant depth target in [-1, 1] (Marigold / Lotus depth checkpoints)."""
    return quantile_normalize(depth, valid)


def disparity_target(depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Lotus disparity target: 1 / depth normalised between its 2% and 98% quantiles to [-1, 1], clipped."""
    disparity = torch.where(valid.expand_as(depth), 1.0 / depth.float().clamp(min=1e-8), torch.zeros_like(depth))
    return quantile_normalize(disparity, valid)
