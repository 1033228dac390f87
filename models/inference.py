"""Reference execution: group images by processing shape, run batched forwards, undo padding/resizing.

This is the eager PyTorch path the CLI uses and every other runtime is checked against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.outputs import Family, OutputKind, PredictionMap, Task, task_of
from models.predictors.base import SingleStepPredictor
from models.predictors.processing import Geometry, normalize_vectors, plan, preprocess, resize_back, unpad


@dataclass(frozen=True)
class PredictOptions:
    processing_res: int
    match_input_resolution: bool = True
    minmax_normalize: bool = False


@dataclass(frozen=True)
class _Item:
    index: int
    image: np.ndarray
    geometry: Geometry
    seed: int | None


class DensePredictor:
    """A loaded model: the predictor core plus the metadata and options it is served with."""

    def __init__(
        self,
        core: SingleStepPredictor,
        model_id: str,
        family: Family,
        processing_res: int,
        default_seed: int = 0,
        minmax_normalize: bool = False,
    ) -> None:
        self.core = core.eval()
        self.model_id = model_id
        self.family = family
        self.processing_res = processing_res
        self.default_seed = default_seed
        self.minmax_normalize = minmax_normalize

    @property
    def output_kind(self) -> OutputKind:
        return self.core.output_kind

    @property
    def task(self) -> Task:
        return task_of(self.core.output_kind)

    @property
    def generative(self) -> bool:
        return self.core.generative

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[np.ndarray],
        *,
        processing_res: int | None = None,
        seeds: Sequence[int] | int | None = None,
        match_input_resolution: bool = True,
        batch_size: int = 8,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[PredictionMap]:
        """Predict one map per `[H, W, 3]` float32 image in [0, 1], in input order.

        Images that share a processing shape run together, `batch_size` at a time, in one forward pass.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        res = self.processing_res if processing_res is None else processing_res
        seed_list = self._seeds(seeds, len(images))
        items = [_Item(i, img, plan(img.shape[0], img.shape[1], res), seed_list[i]) for i, img in enumerate(images)]
        results: list[PredictionMap | None] = [None] * len(items)
        for batch in _batches(items, batch_size):
            maps = self._forward(batch)
            for item, pred in zip(batch, maps, strict=True):
                results[item.index] = self._finish(item, pred, match_input_resolution)
            if on_batch:
                on_batch(len(batch))
        return [r for r in results if r is not None]

    def _seeds(self, seeds: Sequence[int] | int | None, n: int) -> list[int | None]:
        if not self.generative:
            return [None] * n
        if seeds is None:
            return [self.default_seed] * n
        if isinstance(seeds, int):
            return [seeds] * n
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} images")
        return list(seeds)

    def _forward(self, batch: list[_Item]) -> torch.Tensor:
        core = self.core
        x = torch.stack([preprocess(torch.from_numpy(it.image).permute(2, 0, 1), it.geometry) for it in batch])
        noise = core.make_noise([it.seed for it in batch], batch[0].geometry.latent_hw)
        return core(x.to(core.device, core.dtype), noise).float().cpu()

    def _finish(self, item: _Item, pred: torch.Tensor, match_input_resolution: bool) -> PredictionMap:
        pred = unpad(pred, item.geometry)
        if match_input_resolution:
            pred = resize_back(pred, item.geometry)
        if self.output_kind == "normals":
            pred = normalize_vectors(pred, dim=0)
            array = pred.permute(1, 2, 0)
        else:
            if self.minmax_normalize:
                lo, hi = pred.min(), pred.max()
                pred = (pred - lo) / (hi - lo).clamp(min=1e-6)
            array = pred[0]
        return PredictionMap(
            array=np.ascontiguousarray(array.numpy(), dtype=np.float32),
            kind=self.output_kind,
            model_id=self.model_id,
            processing_size=item.geometry.processing_hw,
            seed=item.seed,
        )


def _batches(items: list[_Item], batch_size: int) -> Iterator[list[_Item]]:
    """Group by padded shape (first-seen order), then chunk each group."""
    groups: dict[tuple[int, int], list[_Item]] = {}
    for it in items:
        groups.setdefault(it.geometry.padded_hw, []).append(it)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]
