"""Image-independent baselines, scored with the same protocol as a model, so a table says what looking at the
image is worth.

On synthetic rooms a map that ignores the image already scores well (a vertical ramp: AbsRel about 0.46 at
32 px), so a model's row means little alone. Three predictions that never see the image:

- `constant`: one value everywhere (depth and disparity: the alignment turns it into the mean depth; normals:
  facing the camera, (0, 0, 1));
- `vertical ramp`: far at the top, near at the bottom (a floor below the horizon), linear in the model's own
  space (depth or disparity); normals turn from a ceiling's (0, -1, 0) at the top through (0, 0, 1) to a
  floor's (0, 1, 0) at the bottom;
- `mean map`: the per-pixel mean of target maps, resized to each image: depth or disparity normalised per image
  between its 2 % and 98 % quantiles (the training targets' normalisation), normals as unit vectors averaged and
  renormalised. From the training set when one is given; otherwise leave-one-out over the evaluated set (each
  image gets the mean of the others), which is as close to a training-set mean as the data allows.

Rows carry `baseline=True` and are scored by `models.training.metrics` exactly as model rows are.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from models.outputs import OutputKind
from models.training import folder_format
from models.training.config import TrainConfig, load_config
from models.training.datasets import Sample, build_dataset, write_synthetic
from models.training.evaluate import EvalResult, to_markdown, write_results
from models.training.metrics import DepthEvaluator, NormalsEvaluator

BASELINES = ("mean map", "vertical ramp", "constant")
_QUANTILES = (0.02, 0.98)


def _resize(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """`[h, w]` or `[h, w, C]` float map -> `hw`, bilinear (the maps are smooth averages)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = t[None, None] if t.dim() == 2 else t.permute(2, 0, 1)[None]
    out = F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0]
    return (out[0] if x.ndim == 2 else out.permute(1, 2, 0)).numpy()


def _nearest(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    rows = (np.arange(hw[0]) * x.shape[0] // hw[0]).astype(np.int64)
    cols = (np.arange(hw[1]) * x.shape[1] // hw[1]).astype(np.int64)
    return x[rows][:, cols]


def normalized_target(kind: OutputKind, depth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Depth (or 1 / depth for disparity models) mapped to [0, 1] between its 2 / 98 % quantiles, clipped."""
    x = np.asarray(depth, dtype=np.float64)
    if kind == "disparity":
        x = np.divide(1.0, x, out=np.zeros_like(x), where=valid)
    values = x[valid]
    if values.size == 0:
        return np.zeros_like(x)
    lo, hi = np.quantile(values, _QUANTILES)
    return np.clip((x - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


class MeanMap:
    """Running per-pixel sums of normalised targets on a fixed grid (the first map's size)."""

    def __init__(self, kind: OutputKind) -> None:
        self.kind: OutputKind = kind
        self.sums: np.ndarray | None = None
        self.counts: np.ndarray | None = None
        self.images = 0

    def contribution(self, target: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sum, count) of one sample on the grid; `target` is depth `[H, W]` or normals `[H, W, 3]`."""
        if self.kind == "normals":
            values = np.where(valid[..., None], np.asarray(target, dtype=np.float64), 0.0)
        else:
            values = np.where(valid, normalized_target(self.kind, target, valid), 0.0)
        if self.sums is None:
            return values, valid.astype(np.float64)
        hw = self.sums.shape[:2]
        return _nearest(values, hw), _nearest(valid.astype(np.float64), hw)

    def add(self, target: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, c = self.contribution(target, valid)
        if self.sums is None or self.counts is None:
            self.sums, self.counts = s.copy(), c.copy()
        else:
            self.sums += s
            self.counts += c
        self.images += 1
        return s, c

    def map(self, hw: tuple[int, int], exclude: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """The mean map at `hw` (without one sample's `exclude` contribution: leave-one-out)."""
        if self.sums is None or self.counts is None:
            raise ValueError("the mean map has no samples")
        sums, counts = self.sums, self.counts
        if exclude is not None:
            sums, counts = sums - exclude[0], counts - exclude[1]
        if self.kind == "normals":
            total = sums.sum(axis=(0, 1))
            fallback = total / max(float(np.linalg.norm(total)), 1e-12) if np.linalg.norm(total) > 0 else (0, 0, 1)
            mean = np.where(counts[..., None] > 0, sums, np.asarray(fallback, dtype=np.float64))
            mean = _resize(mean, hw).astype(np.float64)
            return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
        overall = float(sums.sum() / max(counts.sum(), 1.0))
        mean = np.where(counts > 0, sums / np.maximum(counts, 1.0), overall)
        return _resize(mean, hw).astype(np.float64)


def ramp(kind: OutputKind, hw: tuple[int, int]) -> np.ndarray:
    """The vertical ramp in the model's output space (see the module docstring)."""
    h, w = hw
    t = (np.arange(h, dtype=np.float64) + 0.5) / h  # 0 at the top, 1 at the bottom
    if kind == "normals":
        y = 2.0 * t - 1.0
        n = np.stack([np.zeros_like(y), y, np.sqrt(np.clip(1.0 - y * y, 0.0, 1.0))], axis=-1)
        return np.broadcast_to(n[:, None, :], (h, w, 3)).copy()
    near_is_high = kind == "disparity"
    column = t if near_is_high else 1.0 - t
    return np.broadcast_to(column[:, None], (h, w)).copy()


def constant(kind: OutputKind, hw: tuple[int, int]) -> np.ndarray:
    if kind == "normals":
        return np.broadcast_to(np.array([0.0, 0.0, 1.0]), (*hw, 3)).copy()
    return np.full(hw, 0.5)


def mean_map_from(kind: OutputKind, samples: Iterable[tuple[np.ndarray, np.ndarray]]) -> MeanMap:
    """A mean map over (target, valid) pairs: depth `[H, W]` or normals `[H, W, 3]` with their masks."""
    mean = MeanMap(kind)
    for target, valid in samples:
        if valid.any():
            mean.add(target, valid)
    if mean.images == 0:
        raise ValueError("no training sample has valid targets for the mean-map baseline")
    return mean


def mean_map_of_folder(kind: OutputKind, root: str | Path, limit: int | None = None) -> MeanMap:
    """The mean map of a folder-format dataset (e.g. the training set)."""
    root = Path(root)
    names = folder_format.list_names(root)[:limit]

    def pairs() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for name in names:
            s = folder_format.read_sample(root, name)
            if kind == "normals":
                if s.normals is not None and s.normals_valid is not None:
                    yield s.normals, s.normals_valid
            else:
                yield s.depth, s.valid

    return mean_map_from(kind, pairs())


def evaluate_baselines(
    root: str | Path,
    kind: OutputKind,
    *,
    limit: int | None = None,
    mean_map: MeanMap | None = None,
    label_suffix: str = "",
) -> list[EvalResult]:
    """Score the three baselines on the folder dataset `root` for a model whose output is `kind`.

    Without `mean_map` the mean-map baseline is leave-one-out over `root` itself (labelled so).
    """
    root = Path(root)
    info = folder_format.read_info(root)
    names = folder_format.list_names(root)[:limit]
    if not names:
        raise ValueError(f"{root}: no samples to evaluate")
    samples = [folder_format.read_sample(root, n) for n in names]
    normals = kind == "normals"
    for name, s in zip(names, samples, strict=True):
        if normals and (s.normals is None or s.normals_valid is None):
            raise ValueError(f"{root}: sample {name!r} has no normals; cannot score normals baselines")

    def target(s: folder_format.RawSample) -> tuple[np.ndarray, np.ndarray]:
        if normals:
            assert s.normals is not None and s.normals_valid is not None
            return s.normals, s.normals_valid
        return s.depth, s.valid

    loo = mean_map is None
    own = mean_map_from(kind, (target(s) for s in samples)) if loo else None
    space = "disparity" if kind == "disparity" else "depth"
    makers = {
        "mean map": None,
        "vertical ramp": lambda hw: ramp(kind, hw),
        "constant": lambda hw: constant(kind, hw),
    }
    results = []
    for name, maker in makers.items():
        evaluator: DepthEvaluator | NormalsEvaluator = (
            NormalsEvaluator() if normals else DepthEvaluator(space, info.depth_range)
        )
        for s in samples:
            hw = s.depth.shape[:2]
            if maker is not None:
                pred = maker(hw)
            elif own is not None:
                t, v = target(s)
                pred = own.map(hw, exclude=own.contribution(t, v) if v.any() else None)
            else:
                assert mean_map is not None
                pred = mean_map.map(hw)
            t, v = target(s)
            evaluator.add(pred, t, v)
        source = "" if maker is not None else " (leave-one-out)" if loo else " (training set)"
        label = f"baseline: {name}{source}{label_suffix}"
        res = evaluator.result()
        results.append(
            EvalResult(
                label=label,
                dataset=info.name if info.name else root.name,
                output_kind=kind,
                images=len(names),
                processing_res=0,
                depth=None if normals else res,  # type: ignore[arg-type]
                normals=res if normals else None,  # type: ignore[arg-type]
                baseline=True,
            )
        )
    return results


def baseline_rows(cfg: TrainConfig, sets: Sequence[Path], dataset: Dataset[Sample] | None = None) -> list[EvalResult]:
    """The image-independent baselines on each validation set, the mean map from the run's training data: the
    rows a run writes to eval.md at step 0 (also callable without training, e.g. for an existing run)."""
    kind = cfg.model.output_kind
    mean = training_mean_map(dataset if dataset is not None else build_dataset(cfg.data, cfg.run.seed), kind)
    return [row for root in sets for row in evaluate_baselines(root, kind, limit=cfg.validation.limit, mean_map=mean)]


def training_mean_map(dataset: Dataset[Sample], kind: OutputKind, limit: int = 512) -> MeanMap:
    """The training set's mean target map (the `mean map` baseline), from at most `limit` evenly spaced samples
    as the loop sees them (augmented, epoch 0)."""
    size = len(dataset)  # type: ignore[arg-type]
    n = min(size, limit)

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(n):
            s = dataset[i * size // n]
            if kind == "normals":
                if bool(s["has_normals"]):
                    yield s["normals"].permute(1, 2, 0).numpy(), s["normals_valid"][0].numpy()
            else:
                yield s["depth"][0].numpy(), s["valid"][0].numpy()

    return mean_map_from(kind, pairs())


def best(rows: Sequence[EvalResult], dataset: str | None = None) -> EvalResult:
    """The strongest baseline row (lowest AbsRel or mean angle), optionally on one dataset."""
    pool = [r for r in rows if r.baseline and (dataset is None or r.dataset == dataset)]
    if not pool:
        raise ValueError("no baseline rows")
    return min(pool, key=lambda r: r.depth.abs_rel if r.depth is not None else r.normals.mean)  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    """`python -m models.training.baselines CONFIG.yaml [--out FILE]`: the baseline rows a fine-tune run with
    this config writes at step 0 (mean map from its training data, scored on its validation sets), without
    training. Held-out synthetic scenes are written to a temporary folder."""
    p = argparse.ArgumentParser(prog="python -m models.training.baselines", description=main.__doc__)
    p.add_argument("config", type=Path, help="fine-tune run config (.yaml)")
    p.add_argument("--out", type=Path, action="append", metavar="FILE", help="write the rows: .md or .json")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        sets = list(cfg.validation.data)
        if cfg.validation.synthetic is not None:
            sets.append(write_synthetic(Path(tmp) / "validation-synthetic", cfg.validation.synthetic))
        if not sets:
            print("error: the config has no validation sets", file=sys.stderr)
            return 2
        rows = baseline_rows(cfg, sets)
    print(to_markdown(rows), end="")
    for path in args.out or []:
        write_results(rows, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
