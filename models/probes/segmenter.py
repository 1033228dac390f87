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
from typing import TYPE_CHECKING

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
from models.probes.features import check_blocks
from models.probes.heads import OnnxProbeHead, ProbeHead, TorchProbeHead
from models.probes.mlp import PixelEnsemble, vote, vote_scores

if TYPE_CHECKING:
    from models.spec import ModelSpec


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
    """The eager predictor behind a served model: probes tap its UNet, which only the torch backend has.
    A Marigold base gives its UNet behind the single-step interface (`models/probes/marigold_features.py`)."""
    core = getattr(base.runtime, "core", None)
    from models.predictors.marigold import MarigoldCore

    if isinstance(core, MarigoldCore):
        from models.probes.marigold_features import MarigoldFeatureCore

        return MarigoldFeatureCore(core)
    if not isinstance(core, SingleStepPredictor):
        raise ModelLoadError(
            f"model '{base.model_id}' runs on {base.runtime.name}: probes tap the UNet's decoder, which only the "
            "torch backend exposes; serve the base model with backend torch (the probe's ONNX graph is made by "
            "`dense-serve probe export`)"
        )
    return core


def base_hash(base: DensePredictor, base_path: Path | None) -> str:
    """The base checkpoint's sha256: an export records the hash of the checkpoint it was made from."""
    exported = getattr(base.runtime, "manifest", None)
    if exported is not None:
        return str(exported.model_hash)
    if base_path is None:
        raise ModelLoadError(f"model '{base.model_id}' has no checkpoint folder to check a probe against")
    return checkpoint_hash(base_path)


def head_for(
    folder: Path,
    manifest: ProbeManifest,
    ensemble: PixelEnsemble,
    base: DensePredictor,
    base_path: Path | None,
    cache: Path,
) -> ProbeHead:
    """The probe's executor for the base model's backend: hooks on the eager UNet, or the probe's ONNX graph in
    ONNX Runtime (`models/probes/onnx_graph.py` says where the graph comes from); other backends refuse."""
    name = base.runtime.name
    if name == "onnxruntime":
        from models.probes.onnx_graph import cached_graph

        graph = cached_graph(folder, manifest.id, cache, manifest.taps, ensemble, reference_checkpoint(base, base_path))
        return OnnxProbeHead(base.runtime, graph, manifest.taps, manifest.members, len(manifest.classes))
    refuse_graph_only(manifest, base)
    core = torch_core(base)
    check_blocks(core.unet, manifest.blocks)
    return TorchProbeHead(core, manifest.taps, ensemble, shares_depth=not base.multi_step)


def refuse_graph_only(manifest: ProbeManifest, base: DensePredictor) -> None:
    name = base.runtime.name
    if name in ("tensorrt", "triton"):
        raise ModelLoadError(
            f"probe '{manifest.id}': model '{base.model_id}' runs on {name}, which serves only the base model's "
            "graphs; serve the base with backend torch or onnxruntime to attach probes"
        )


def reference_checkpoint(base: DensePredictor, base_path: Path | None) -> ModelSpec | None:
    """The checkpoint an ONNX Runtime base was exported from (a probe graph is traced from it), None when gone."""
    from models.export.manifest import is_export
    from models.spec import ModelSpec

    checkpoint = base_path if base_path is not None and not is_export(base_path) else None
    source = Path(base.runtime.manifest.source)  # type: ignore[attr-defined]
    if checkpoint is None and (source / "model_index.json").is_file():
        checkpoint = source  # an export folder whose checkpoint is still at hand
    if checkpoint is None:
        return None
    return ModelSpec(id=base.model_id, source=str(checkpoint), family=base.family, output_kind=base.output_kind)


class Probe:
    """A trained probe on a loaded base model; `segment` runs the shared pass through its `ProbeHead`."""

    def __init__(
        self, manifest: ProbeManifest, ensemble: PixelEnsemble, base: DensePredictor, head: ProbeHead | None = None
    ) -> None:
        self.manifest = manifest
        self.base = base
        self.taps = manifest.taps
        if head is None:
            core = torch_core(base)
            check_blocks(core.unet, manifest.blocks)
            head = TorchProbeHead(core, self.taps, ensemble, shares_depth=not base.multi_step)
        self.head = head
        #: The eager core and MLPs on the torch backend (export and bench trace them); None on ONNX Runtime.
        self.core = head.core if isinstance(head, TorchProbeHead) else None
        self.ensemble = head.ensemble if isinstance(head, TorchProbeHead) else ensemble

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @classmethod
    def attach(cls, folder: Path, base: DensePredictor, base_path: Path | None, cache: Path | None = None) -> Probe:
        """Load a probe onto `base`, refusing a base checkpoint other than the one it was trained on. `cache`:
        where an ONNX Runtime base's probe graph is exported when the folder has none that matches."""
        manifest, ensemble = load_probe(folder)
        check_base(manifest, base.model_id, base_hash(base, base_path))
        from models.loading import DEFAULT_ENGINE_CACHE

        head = head_for(folder, manifest, ensemble, base, base_path, cache or DEFAULT_ENGINE_CACHE)
        return cls(manifest, ensemble, base, head)

    @torch.inference_mode()
    def segment(
        self, items: Sequence[BatchItem], with_depth: bool = False, stages: dict[str, float] | None = None
    ) -> tuple[list[Segmentation], list[PredictionMap] | None]:
        """One batch (one padded shape): class maps, and with `with_depth` the base model's maps from the same
        UNet pass (Lotus-G: with the probe's fixed noise seed, which the map's `seed` reports); on a multi-step
        base (Marigold) the maps of its own run instead (the items' seed, steps and ensemble size)."""
        shapes = {it.geometry.padded_hw for it in items}
        if len(shapes) != 1:
            raise ValueError(f"a batch must share one processing shape, got {sorted(shapes)}")
        stages = {} if stages is None else stages
        x = torch.stack([_to_tensor(it, self.head.device) for it in items])
        out = self.head.run(x, with_depth and self.head.shares_depth, stages)
        depth: list[PredictionMap] | None = None
        if with_depth and not self.head.shares_depth:  # a multi-step base: its own run, as /v1/depth computes it
            depth = self.base.predict_batch(items, stages)
        start = time.perf_counter()
        if out.maps is not None:
            seed = self.taps.noise_seed if self.head.seeded else None
            depth = [self.base.finish(replace(it, seed=seed), m) for it, m in zip(items, out.maps, strict=True)]
        scores = vote_scores(out.logits, items[0].geometry.padded_hw)
        segments = [self._finish(it, s) for it, s in zip(items, scores, strict=True)]
        stages["probe"] = stages.get("probe", 0.0) + time.perf_counter() - start
        return segments, depth

    def _finish(self, item: BatchItem, scores: torch.Tensor) -> Segmentation:
        scores = unpad(scores, item.geometry)
        if item.match_input_resolution and tuple(scores.shape[-2:]) != item.geometry.input_hw:
            scores = F.interpolate(scores.unsqueeze(0), item.geometry.input_hw, mode="bilinear").squeeze(0)
        labels = vote(scores).to(torch.uint8).cpu().numpy()
        return Segmentation(labels, self.classes, self.id, item.geometry.processing_hw)
