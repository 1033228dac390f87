"""The evaluation protocol of affine-invariant depth and surface normals (numpy, float64 throughout).

Depth, per image:
1. valid = the dataset's mask AND ground truth inside the dataset's depth range;
2. least-squares scale and shift of the prediction onto the ground truth on valid pixels, solved in float64:
   in depth space for depth models, or in disparity space (onto 1 / gt) for disparity models, whose
   aligned disparity is then clipped to [1 / max, 1 / min] and inverted;
3. the aligned depth is clipped to the depth range;
4. AbsRel = mean(|d - d*| / d*) and delta1 = share of pixels with max(d / d*, d* / d) < 1.25.
Dataset scores are the mean of the per-image scores.

Normals: the angle between prediction and ground truth (both normalised) at every valid pixel; the mean,
median and the percentage of pixels under 11.25, 22.5 and 30 degrees are taken over all valid pixels of the
dataset pooled together (the usual convention for normals benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

DepthSpace = Literal["depth", "disparity"]
DELTA1_THRESHOLD = 1.25
NORMAL_THRESHOLDS_DEG = (11.25, 22.5, 30.0)


@dataclass(frozen=True)
class DepthMetrics:
    abs_rel: float
    delta1: float
    count: int  # images averaged (1 for a single image)


@dataclass(frozen=True)
class NormalMetrics:
    mean: float  # degrees
    median: float  # degrees
    within_11_25: float  # percent of pixels
    within_22_5: float
    within_30: float
    count: int  # pixels


def fit_scale_shift(pred: np.ndarray, target: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """(s, t) minimising sum over valid pixels of (s * pred + t - target)^2, solved in float64."""
    p = np.asarray(pred, dtype=np.float64)[valid]
    y = np.asarray(target, dtype=np.float64)[valid]
    if p.size < 2:
        raise ValueError(f"scale/shift alignment needs at least 2 valid pixels, got {p.size}")
    a = np.stack([p, np.ones_like(p)], axis=1)
    (scale, shift), *_ = np.linalg.lstsq(a, y, rcond=None)
    return float(scale), float(shift)


def align_depth(
    pred: np.ndarray,
    gt_depth: np.ndarray,
    valid: np.ndarray,
    space: DepthSpace,
    depth_range: tuple[float, float],
) -> np.ndarray:
    """An affine-invariant prediction -> metric depth (float64), aligned on `valid` and clipped to the range."""
    lo, hi = depth_range
    if not 0.0 < lo < hi:
        raise ValueError(f"depth_range must satisfy 0 < min < max, got {depth_range}")
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt_depth, dtype=np.float64)
    if space == "depth":
        scale, shift = fit_scale_shift(pred, gt, valid)
        depth = scale * pred + shift
    elif space == "disparity":
        gt_disp = np.zeros_like(gt)
        np.divide(1.0, gt, out=gt_disp, where=valid)
        scale, shift = fit_scale_shift(pred, gt_disp, valid)
        depth = 1.0 / np.clip(scale * pred + shift, 1.0 / hi, 1.0 / lo)
    else:
        raise ValueError(f"space must be 'depth' or 'disparity', got {space!r}")
    return np.clip(depth, lo, hi)


def eval_mask(gt_depth: np.ndarray, valid: np.ndarray | None, depth_range: tuple[float, float]) -> np.ndarray:
    """Pixels that count: the dataset's mask and ground truth inside the range (bounds included)."""
    gt = np.asarray(gt_depth, dtype=np.float64)
    mask = np.isfinite(gt) & (gt >= depth_range[0]) & (gt <= depth_range[1]) & (gt > 0)
    return mask if valid is None else mask & np.asarray(valid, dtype=bool)


def depth_errors(depth: np.ndarray, gt_depth: np.ndarray, valid: np.ndarray) -> DepthMetrics:
    """AbsRel and delta1 of metric depth against ground truth on `valid` pixels of one image."""
    d = np.asarray(depth, dtype=np.float64)[valid]
    g = np.asarray(gt_depth, dtype=np.float64)[valid]
    if g.size == 0:
        raise ValueError("no valid pixels to evaluate")
    if np.any(d <= 0) or np.any(g <= 0):
        raise ValueError("depth_errors needs positive depths on valid pixels; align and clip first")
    abs_rel = float(np.mean(np.abs(d - g) / g))
    delta1 = float(np.mean(np.maximum(d / g, g / d) < DELTA1_THRESHOLD))
    return DepthMetrics(abs_rel=abs_rel, delta1=delta1, count=1)


def evaluate_depth(
    pred: np.ndarray,
    gt_depth: np.ndarray,
    valid: np.ndarray | None,
    space: DepthSpace,
    depth_range: tuple[float, float],
) -> DepthMetrics:
    """The whole protocol for one image: mask, align, clip, score."""
    mask = eval_mask(gt_depth, valid, depth_range)
    aligned = align_depth(pred, gt_depth, mask, space, depth_range)
    return depth_errors(aligned, gt_depth, mask)


class DepthEvaluator:
    """Accumulates per-image depth scores; `result` is their mean (each image weighs the same)."""

    def __init__(self, space: DepthSpace, depth_range: tuple[float, float]) -> None:
        self.space: DepthSpace = space
        self.depth_range = depth_range
        self.scores: list[DepthMetrics] = []

    def add(self, pred: np.ndarray, gt_depth: np.ndarray, valid: np.ndarray | None = None) -> DepthMetrics:
        score = evaluate_depth(pred, gt_depth, valid, self.space, self.depth_range)
        self.scores.append(score)
        return score

    def result(self) -> DepthMetrics:
        if not self.scores:
            raise ValueError("no images evaluated")
        return DepthMetrics(
            abs_rel=float(np.mean([s.abs_rel for s in self.scores])),
            delta1=float(np.mean([s.delta1 for s in self.scores])),
            count=len(self.scores),
        )


def angular_errors_deg(pred: np.ndarray, gt: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Angle in degrees between `[..., 3]` vectors, each normalised first (cosine clamped to [-1, 1])."""
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    p = p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), eps)
    g = g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), eps)
    cos = np.clip(np.sum(p * g, axis=-1), -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def summarize_angles(errors_deg: np.ndarray) -> NormalMetrics:
    e = np.asarray(errors_deg, dtype=np.float64).ravel()
    if e.size == 0:
        raise ValueError("no valid pixels to evaluate")
    within = [float(np.mean(e < t) * 100.0) for t in NORMAL_THRESHOLDS_DEG]
    return NormalMetrics(
        mean=float(e.mean()),
        median=float(np.median(e)),
        within_11_25=within[0],
        within_22_5=within[1],
        within_30=within[2],
        count=int(e.size),
    )


def evaluate_normals(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> NormalMetrics:
    """Scores of one image's `[H, W, 3]` normals on `valid` pixels (all pixels when None)."""
    errors = angular_errors_deg(pred, gt)
    return summarize_angles(errors if valid is None else errors[np.asarray(valid, dtype=bool)])


class NormalsEvaluator:
    """Pools per-pixel angular errors over images; `result` scores the pooled set."""

    def __init__(self) -> None:
        self.errors: list[np.ndarray] = []

    def add(self, pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> NormalMetrics:
        errors = angular_errors_deg(pred, gt)
        errors = errors.ravel() if valid is None else errors[np.asarray(valid, dtype=bool)]
        self.errors.append(errors)
        return summarize_angles(errors)

    def result(self) -> NormalMetrics:
        if not self.errors:
            raise ValueError("no images evaluated")
        return summarize_angles(np.concatenate(self.errors))
