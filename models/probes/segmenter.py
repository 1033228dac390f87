"""A probe attached to its served base model: image batch -> class map, optionally with the base model's own
map from the SAME UNet pass (the features of t = 999 are tapped while the UNet predicts depth).

Runs on the base model's device, after the same pre-processing as a prediction; the majority-vote scores are
cropped and resized back like a map, and only the final uint8 class map crosses to the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import ModelLoadError
from models.export.manifest import checkpoint_hash
from models.inference import BatchItem, DensePredictor, _to_tensor
from models.outputs import PredictionMap
from models.predictors.base import SingleStepPredictor
from models.predictors.processing import unpad
from models.probes.artifact import ProbeManifest, check_base, load_probe
from models.probes.features import check_blocks, extract, unet_input_noise
from models.probes.mlp import PixelEnsemble, vote


@dataclass(frozen=True)
class Segmentation:
    """One image's class map: `labels` uint8 `[H, W]`, indices into `classes`."""

    labels: np.ndarray
    classes: list[str]
    model_id: str
    processing_size: tuple[int, int]

    def pixel_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels.ravel(), minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts, strict=False)}


def torch_core(base: DensePredictor) -> SingleStepPredictor:
    """The eager predictor behind a served model: probes tap its UNet, which only the torch backend has."""
    core = getattr(base.runtime, "core", None)
    if not isinstance(core, SingleStepPredictor):
        raise ModelLoadError(
            f"model '{base.model_id}' runs on {base.runtime.name}: probes tap the UNet's decoder, which only the "
            "torch backend exposes; serve the base model with backend torch (the probe's ONNX graph is made by "
            "`dense-serve probe export`)"
        )
    return core


class Probe:
    """A trained probe on a loaded base model; `segment` runs the shared pass."""

    def __init__(self, manifest: ProbeManifest, ensemble: PixelEnsemble, base: DensePredictor) -> None:
        self.manifest = manifest
        self.base = base
        self.core = torch_core(base)
        check_blocks(self.core.unet, manifest.blocks)
        self.ensemble = ensemble.to(self.core.device).eval()
        self.taps = manifest.taps

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @classmethod
    def attach(cls, folder: Path, base: DensePredictor, base_path: Path | None) -> Probe:
        """Load a probe onto `base`, refusing a base checkpoint other than the one it was trained on."""
        manifest, ensemble = load_probe(folder)
        if base_path is None:
            raise ModelLoadError(f"probe '{manifest.id}': model '{base.model_id}' has no checkpoint folder to check")
        check_base(manifest, base.model_id, checkpoint_hash(base_path))
        return cls(manifest, ensemble, base)

    @torch.inference_mode()
    def segment(
        self, items: Sequence[BatchItem], with_depth: bool = False, stages: dict[str, float] | None = None
    ) -> tuple[list[Segmentation], list[PredictionMap] | None]:
        """One batch (one padded shape): class maps, and with `with_depth` the base model's maps from the same
        UNet pass (Lotus-G: with the probe's fixed noise seed, which the map's `seed` reports)."""
        shapes = {it.geometry.padded_hw for it in items}
        if len(shapes) != 1:
            raise ValueError(f"a batch must share one processing shape, got {sorted(shapes)}")
        stages = {} if stages is None else stages
        core, device = self.core, self.core.device
        start = time.perf_counter()
        x = torch.stack([_to_tensor(it, device) for it in items]).to(core.dtype)
        latent = core.encode(x)
        noise = unet_input_noise(core, latent, self.taps.noise_seed)
        feats, x0 = extract(core, latent, self.taps, noise)
        mid = time.perf_counter()
        depth: list[PredictionMap] | None = None
        if with_depth:
            if x0 is None:  # 999 is not among the probe's timesteps: the depth needs its own UNet call
                x0 = core.predict_latent(latent, noise)
            maps = core.postprocess(core.decode(x0)).float()
            seed = self.taps.noise_seed if core.generative else None
            depth = [self.base.finish(replace(it, seed=seed), m) for it, m in zip(items, maps, strict=True)]
        scores = self.ensemble.scores(feats, items[0].geometry.padded_hw)
        out = [self._finish(it, s) for it, s in zip(items, scores, strict=True)]
        stages["probe"] = stages.get("probe", 0.0) + time.perf_counter() - mid
        stages["encode_unet"] = stages.get("encode_unet", 0.0) + mid - start
        return out, depth

    def _finish(self, item: BatchItem, scores: torch.Tensor) -> Segmentation:
        scores = unpad(scores, item.geometry)
        if item.match_input_resolution and tuple(scores.shape[-2:]) != item.geometry.input_hw:
            scores = F.interpolate(scores.unsqueeze(0), item.geometry.input_hw, mode="bilinear").squeeze(0)
        labels = vote(scores).to(torch.uint8).cpu().numpy()
        return Segmentation(labels, self.classes, self.id, item.geometry.processing_hw)
