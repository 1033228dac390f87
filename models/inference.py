"""Serving-side execution: group images by processing shape, run batched forwards, undo padding/resizing.

The forward passes go through a `Runtime` (eager torch, ONNX Runtime, TensorRT, Triton); everything else
here is identical for all of them, and runs on the runtime's device.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.outputs import FAMILY_NORMALS_AXES, Family, MapForm, NormalsAxes, OutputKind, PredictionMap, Task, task_of
from models.predictors.forms import to_form
from models.predictors.processing import Geometry, normalize_vectors, plan, preprocess, resize_back, unpad
from models.runtime.base import Runtime
from models.uncertainty import Reduction, reduce_normals, reduce_scalar


@dataclass(frozen=True)
class BatchItem:
    """One image ready for a forward pass: its pixels, its geometry, and per-request options.

    `image` is `[h, w, 3]` uint8 or float32 in [0, 1]; it may be smaller than `geometry.input_hw` (a JPEG
    decoded at a reduced DCT scale), never smaller than the processing size. `form` is what the map becomes
    on the device before it is copied to the CPU.
    """

    image: np.ndarray
    geometry: Geometry
    seed: int | None = None
    match_input_resolution: bool = True
    form: MapForm = "float32"
    steps: int | None = None  # multi-step families: denoising steps (None = the model's default)
    ensemble_size: int = 1  # multi-step families: members ensembled as diffusers does
    step_uncertainty: bool = False  # multi-step families: the step-change uncertainty of the run, with the map


@dataclass(frozen=True)
class UncertaintyResult:
    prediction: PredictionMap
    uncertainty: np.ndarray
    members: np.ndarray | None
    seeds: list[int]
    reduction: Reduction
    method: str = "seeds"  # seeds (ours), diffusers (Marigold ensembling), steps (step change)


class DensePredictor:
    """A loaded model: its runtime plus the metadata and options it is served with."""

    #: Untrained weights (set by models.loading from the checkpoint's marker): its maps are noise.
    random_weights: bool = False

    def __init__(
        self,
        runtime: Runtime,
        model_id: str,
        family: Family,
        processing_res: int,
        default_seed: int = 0,
        minmax_normalize: bool = False,
    ) -> None:
        self.runtime = runtime
        self.model_id = model_id
        self.family = family
        self.processing_res = processing_res
        self.default_seed = default_seed
        self.minmax_normalize = minmax_normalize

    @property
    def output_kind(self) -> OutputKind:
        return self.runtime.output_kind

    @property
    def task(self) -> Task:
        return task_of(self.runtime.output_kind)

    @property
    def generative(self) -> bool:
        return self.runtime.generative

    @property
    def multi_step(self) -> bool:
        """Whether `steps` changes what this model computes (single-step families always take 1)."""
        return False

    @property
    def normals_axes(self) -> NormalsAxes:
        """The camera-frame axes its normals come in: its family's checkpoints' own (models.outputs)."""
        return FAMILY_NORMALS_AXES[self.family]

    @property
    def default_steps(self) -> int:
        return 1

    def plan(self, image: np.ndarray, processing_res: int | None = None) -> Geometry:
        """Sizes for one image; a ValueError when the runtime cannot run them (an engine built for less)."""
        return self.plan_size(image.shape[0], image.shape[1], processing_res)

    def plan_size(self, height: int, width: int, processing_res: int | None = None) -> Geometry:
        """`plan` from the image's size alone (the header), before its pixels are decoded."""
        geometry = plan(height, width, self.processing_res if processing_res is None else processing_res)
        limit = self.runtime.max_hw
        if limit is not None and any(v > m for v, m in zip(geometry.padded_hw, limit, strict=True)):
            raise ValueError(
                f"processing size {geometry.padded_hw[1]}x{geometry.padded_hw[0]} exceeds what this model's "
                f"{self.runtime.name} engines were built for ({limit[1]}x{limit[0]}); use a smaller processing_res"
            )
        return geometry

    def resolve_seed(self, seed: int | None) -> int | None:
        """The seed a request runs with: None for deterministic families, the default when not given."""
        if not self.generative:
            return None
        return self.default_seed if seed is None else seed

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
        form: MapForm = "float32",
        steps: int | None = None,
        ensemble_size: int = 1,
    ) -> list[PredictionMap]:
        """Predict one map per `[H, W, 3]` image (uint8, or float32 in [0, 1]), in input order.

        Images that share a processing shape run together, `batch_size` at a time, in one forward pass.
        `steps` and `ensemble_size` are for multi-step families (single-step ones refuse anything but 1).
        """
        if seeds is None or isinstance(seeds, int):
            seed_list = [seeds] * len(images)
        elif len(seeds) != len(images):
            raise ValueError(f"got {len(seeds)} seeds for {len(images)} images")
        else:
            seed_list = list(seeds)
        items = [
            BatchItem(
                img,
                self.plan(img, processing_res),
                self.resolve_seed(s),
                match_input_resolution,
                form,
                steps,
                ensemble_size,
            )
            for img, s in zip(images, seed_list, strict=True)
        ]
        return self.predict_items(items, batch_size=batch_size, on_batch=on_batch)

    def predict_items(
        self, items: Sequence[BatchItem], *, batch_size: int = 8, on_batch: Callable[[int], None] | None = None
    ) -> list[PredictionMap]:
        """`predict` for items already planned (their pixels may be smaller than their input size)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        results: dict[int, PredictionMap] = {}
        for batch in _batches(list(enumerate(items)), batch_size):
            maps = self.predict_batch([item for _, item in batch])
            results.update({i: m for (i, _), m in zip(batch, maps, strict=True)})
            if on_batch:
                on_batch(len(batch))
        return [results[i] for i in range(len(items))]

    @torch.inference_mode()
    def predict_batch(self, items: Sequence[BatchItem], stages: dict[str, float] | None = None) -> list[PredictionMap]:
        """ONE forward pass of encoder, UNet and decoder over items that share a padded shape.

        Pre- and post-processing run on the runtime's device: the pixels go over as they were decoded
        (uint8), and each map comes back in its item's `form`. `stages`, when given, receives the seconds
        spent in preprocess, encode, unet_decode and postprocess (the copy back to the CPU included).
        """
        stages = {} if stages is None else stages
        maps = self.predict_raw(items, stages)
        start = time.perf_counter()
        out = [self.finish(it, pred) for it, pred in zip(items, maps, strict=True)]
        stages["postprocess"] = stages.get("postprocess", 0.0) + time.perf_counter() - start
        return out

    @torch.inference_mode()
    def predict_raw(self, items: Sequence[BatchItem], stages: dict[str, float] | None = None) -> torch.Tensor:
        """The forward pass alone: `[B, C, PH, PW]` maps at the padded processing size, on the device.
        `finish` turns each into its answer."""
        shapes = {it.geometry.padded_hw for it in items}
        if len(shapes) != 1:
            raise ValueError(f"a batch must share one processing shape, got {sorted(shapes)}")
        if any(it.steps not in (None, 1) or it.ensemble_size != 1 for it in items):
            raise ValueError(f"model '{self.model_id}' ({self.family}) is single-step: steps and ensemble_size are 1")
        rt = self.runtime
        stages = {} if stages is None else stages
        start = time.perf_counter()
        x = torch.stack([_to_tensor(it, rt.device) for it in items])
        seeds = [self.default_seed if it.seed is None else it.seed for it in items]
        noise = rt.make_noise(seeds, items[0].geometry.latent_hw)
        rt.synchronize()
        stages["preprocess"] = stages.get("preprocess", 0.0) + time.perf_counter() - start
        return rt.run_timed(x, noise, stages)

    @torch.inference_mode()
    def finish(self, item: BatchItem, pred: torch.Tensor) -> PredictionMap:
        """One raw map -> its answer: crop the padding, resize back, per-family post-processing, the item's
        form; only that final form is copied to the CPU."""
        final = to_form(self._finish_tensor(item, pred), self.output_kind, item.form).cpu()
        return PredictionMap(
            array=final.numpy(),
            kind=self.output_kind,
            model_id=self.model_id,
            processing_size=item.geometry.processing_hw,
            seed=item.seed,
            form=item.form,
            normals_axes=self.normals_axes,
        )

    @torch.inference_mode()
    def predict_uncertainty(
        self,
        item: BatchItem,
        seeds: Sequence[int],
        reduction: Reduction = "mean",
        return_members: bool = False,
        method: str = "seeds",
    ) -> UncertaintyResult:
        """Lotus-G multi-seed ensemble as ONE batch: encode once, repeat the latent per seed."""
        if method != "seeds":
            raise ValueError(f"model '{self.model_id}' ({self.family}) has only the seeds uncertainty method")
        if not self.generative:
            raise ValueError(f"model '{self.model_id}' ({self.family}) is deterministic: seeds do not vary it")
        if len(seeds) < 2:
            raise ValueError("uncertainty needs at least two seeds")
        rt = self.runtime
        latent = rt.encode(_to_tensor(item, rt.device).unsqueeze(0))
        noise = rt.make_noise(seeds, item.geometry.latent_hw)
        maps = rt.head(latent.expand(len(seeds), -1, -1, -1).contiguous(), noise)
        members = torch.stack([self._finish_tensor(item, m) for m in maps]).cpu()
        if self.output_kind == "normals":
            centre, spread = reduce_normals(members, reduction)
            pred_array = centre.permute(1, 2, 0)
            member_array = members.permute(0, 2, 3, 1)
        else:
            pred_array, spread = reduce_scalar(members[:, 0], reduction)
            member_array = members[:, 0]
        prediction = PredictionMap(
            array=_numpy(pred_array),
            kind=self.output_kind,
            model_id=self.model_id,
            processing_size=item.geometry.processing_hw,
            seed=None,
            extra={"seeds": list(seeds), "reduction": reduction},
            normals_axes=self.normals_axes,
        )
        return UncertaintyResult(
            prediction=prediction,
            uncertainty=_numpy(spread),
            members=_numpy(member_array) if return_members else None,
            seeds=list(seeds),
            reduction=reduction,
        )

    def _finish_tensor(self, item: BatchItem, pred: torch.Tensor) -> torch.Tensor:
        pred = unpad(pred, item.geometry)
        if item.match_input_resolution:
            pred = resize_back(pred, item.geometry)
        if self.output_kind == "normals":
            return normalize_vectors(pred, dim=0)
        if self.minmax_normalize:
            lo, hi = pred.min(), pred.max()
            pred = (pred - lo) / (hi - lo).clamp(min=1e-6)
        return pred


def _to_tensor(item: BatchItem, device: torch.device) -> torch.Tensor:
    """Pixels to the device as they are, then `[3, PH, PW]` in [-1, 1] there (uint8 scaled by 1 / 255)."""
    with warnings.catch_warnings():  # decoded images may be read-only views; torch only reads them
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(item.image)
    pixels = pixels.to(device).permute(2, 0, 1)
    image = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    return preprocess(image, item.geometry)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def _batches(items: list[tuple[int, BatchItem]], batch_size: int) -> Iterator[list[tuple[int, BatchItem]]]:
    """Group by padded shape (first-seen order), then chunk each group."""
    groups: dict[tuple[int, int], list[tuple[int, BatchItem]]] = {}
    for entry in items:
        groups.setdefault(entry[1].geometry.padded_hw, []).append(entry)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]
