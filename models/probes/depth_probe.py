"""A depth probe attached to its served base model: image batch -> affine-invariant depth maps.

The pass is the base model's: one VAE encode, one tapped UNet call per serving timestep (t = 999 alone is the
depth pass itself), then the MLP on the feature grid; the maps are upsampled (bilinear) to the processing size,
cropped and resized back like the base model's maps, and leave the device in the request's form, so every
depth encoder (png, npy, json, exr, tiff, color) answers them as it answers a depth map.

A probe with a weak head is served twice: under its id (the manifest's `serve_head`, strong by default) and
under `<id>.<other head>` (e.g. `rooms-depth.weak`), so a request picks the head by model id alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from models.errors import ModelLoadError
from models.inference import BatchItem, DensePredictor, _batches, _to_tensor
from models.outputs import OutputKind, PredictionMap
from models.predictors.base import SingleStepPredictor
from models.predictors.forms import to_form
from models.predictors.processing import resize_back, unpad
from models.probes.artifact import WEIGHTS, ProbeManifest, check_base
from models.probes.declaration import ProbeDeclaration
from models.probes.depth import DepthHeads, check_taps, tap_blocks, tap_channels
from models.probes.depth_runners import DepthRunner, OnnxDepthRunner, TorchDepthRunner
from models.probes.features import TapConfig
from models.probes.segmenter import base_hash, reference_checkpoint, refuse_graph_only, torch_core


def heads_for(manifest: ProbeManifest, channels: Sequence[int]) -> DepthHeads:
    return DepthHeads(channels, manifest.blocks, manifest.weak_blocks, tuple(manifest.hidden), manifest.time_dims)  # type: ignore[arg-type]


def save_depth_probe(folder: Path, manifest: ProbeManifest, heads: DepthHeads) -> None:
    from safetensors.torch import save_file

    manifest.write(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"probe": manifest.id, "base_hash": manifest.base_hash})


def load_depth_probe(folder: Path, channels: Sequence[int]) -> tuple[ProbeManifest, DepthHeads]:
    """The manifest and both heads; `channels` are the base UNet's tap widths (`depth.tap_channels`)."""
    from safetensors.torch import load_file

    manifest = ProbeManifest.read(folder)
    if manifest.task != "depth":
        raise ModelLoadError(f"{folder}: a {manifest.task} probe, not a depth probe")
    try:
        heads = heads_for(manifest, channels)
        heads.load_state_dict(load_file(str(folder / WEIGHTS)))
    except (OSError, RuntimeError, IndexError) as exc:
        raise ModelLoadError(f"{folder / WEIGHTS}: weights do not match the manifest or the base UNet: {exc}") from exc
    return manifest, heads.eval()


def onnx_runner(
    folder: Path, manifest: ProbeManifest, base: DensePredictor, base_path: Path | None, cache: Path | None
) -> OnnxDepthRunner:
    """The probe's graph for an ONNX Runtime base: the folder's own when its key matches, else the engine
    cache's, traced there from the base checkpoint on first use."""
    from models.loading import DEFAULT_ENGINE_CACHE
    from models.probes.onnx_graph import cached, write_depth_graph

    taps = serving_taps(manifest)

    def write(core: SingleStepPredictor, out: Path, key: str) -> Path:
        _, heads = load_depth_probe(folder, tap_channels(core.unet))
        return write_depth_graph(core, taps, heads, out, key)

    checkpoint = reference_checkpoint(base, base_path)
    graph = cached(folder, manifest.id, cache or DEFAULT_ENGINE_CACHE, checkpoint, "depth", write)
    return OnnxDepthRunner(base.runtime, graph, taps)


def head_ids(manifest: ProbeManifest) -> dict[str, str]:
    """Model id -> head: the id serves `serve_head`; the other head (when trained) is `<id>.<head>` (one rule
    with the front-ends' declaration, `ProbeDeclaration.served_ids`)."""
    declared = ProbeDeclaration.model_validate(manifest.model_dump()).served_ids()
    return {model_id: head for model_id, head in declared.items() if head is not None}


def serving_taps(manifest: ProbeManifest) -> TapConfig:
    """What the served pass taps: both heads' blocks at the serving timesteps."""
    steps = tuple(manifest.serve_timesteps or manifest.timesteps)
    return TapConfig(tap_blocks(manifest.blocks, manifest.weak_blocks), steps, manifest.stride, manifest.noise_seed)


class DepthProbe:
    """A trained depth probe on a loaded base model, serving one head; `depth` runs the shared pass through its
    `DepthRunner` (hooks on the eager UNet, or the probe's ONNX graph on an ONNX Runtime base)."""

    task = "depth"

    def __init__(
        self,
        manifest: ProbeManifest,
        heads: DepthHeads | None,
        base: DensePredictor,
        head: str = "",
        model_id: str = "",
        runner: DepthRunner | None = None,
    ) -> None:
        self.manifest = manifest
        self.base = base
        self.head = head or manifest.serve_head
        if self.head == "weak" and not manifest.weak_blocks:
            raise ValueError("this depth probe was trained without a weak head")
        self.model_id = model_id or manifest.id
        self.taps = serving_taps(manifest)
        if runner is None:
            if heads is None:
                raise ValueError("a depth probe on the torch backend needs its heads")
            core = torch_core(base)
            check_taps(core.unet, heads.taps)
            runner = TorchDepthRunner(core, heads, self.taps)
        self.runner = runner
        #: The eager core and heads on the torch backend (`probe export` traces them); None on ONNX Runtime.
        self.core = runner.core if isinstance(runner, TorchDepthRunner) else None
        self.heads = runner.heads if isinstance(runner, TorchDepthRunner) else None

    @property
    def id(self) -> str:
        return self.model_id

    @property
    def kind(self) -> OutputKind:
        """Affine-invariant depth (near is low) or disparity (near is high), normalised to [0, 1] per image."""
        return "disparity" if self.manifest.output_kind == "disparity" else "depth"

    @classmethod
    def attach(
        cls, folder: Path, base: DensePredictor, base_path: Path | None, cache: Path | None = None
    ) -> list[DepthProbe]:
        """Every served head of the probe in `folder` on `base` (hash-checked), one per model id, sharing one
        runner. `cache`: where an ONNX Runtime base's probe graph is exported when the folder has none that
        matches (`models/probes/onnx_graph.py`)."""
        manifest = ProbeManifest.read(folder)
        if manifest.task != "depth":
            raise ModelLoadError(f"{folder}: a {manifest.task} probe, not a depth probe")
        check_base(manifest, base.model_id, base_hash(base, base_path))
        ids = head_ids(manifest)
        if base.runtime.name == "onnxruntime":
            runner = onnx_runner(folder, manifest, base, base_path, cache)
            return [cls(manifest, None, base, head, model_id, runner) for model_id, head in ids.items()]
        refuse_graph_only(manifest, base)
        core = torch_core(base)
        manifest, heads = load_depth_probe(folder, tap_channels(core.unet))
        check_taps(core.unet, heads.taps)
        shared = TorchDepthRunner(core, heads, serving_taps(manifest))
        return [cls(manifest, heads, base, head, model_id, shared) for model_id, head in ids.items()]

    @torch.inference_mode()
    def raw(self, items: Sequence[BatchItem], head: str | None = None) -> torch.Tensor:
        """`[B, 1, PH, PW]` normalised depth at the padded processing size: the mean over the serving timesteps."""
        shapes = {it.geometry.padded_hw for it in items}
        if len(shapes) != 1:
            raise ValueError(f"a batch must share one processing shape, got {sorted(shapes)}")
        x = torch.stack([_to_tensor(it, self.runner.device) for it in items])
        grid = self.runner.grid(x, head or self.head)
        return F.interpolate(grid, size=items[0].geometry.padded_hw, mode="bilinear", align_corners=False)

    def depth(
        self, items: Sequence[BatchItem], stages: dict[str, float] | None = None, head: str | None = None
    ) -> list[PredictionMap]:
        """One batch (one padded shape) -> one depth map per item, in each item's form (`head`: another head
        than the one this id serves, for the evaluation)."""
        stages = {} if stages is None else stages
        start = time.perf_counter()
        maps = self.raw(items, head)
        out = [self._finish(it, m, head or self.head) for it, m in zip(items, maps, strict=True)]
        stages["probe"] = stages.get("probe", 0.0) + time.perf_counter() - start
        return out

    def predict_items(
        self, items: Sequence[BatchItem], *, batch_size: int = 8, on_batch: Callable[[int], None] | None = None
    ) -> list[PredictionMap]:
        """`DensePredictor.predict_items` for the probe: items of any sizes, batched per padded shape."""
        results: dict[int, PredictionMap] = {}
        for batch in _batches(list(enumerate(items)), batch_size):
            maps = self.depth([item for _, item in batch])
            results.update({i: m for (i, _), m in zip(batch, maps, strict=True)})
            if on_batch:
                on_batch(len(batch))
        return [results[i] for i in range(len(items))]

    @torch.inference_mode()
    def _finish(self, item: BatchItem, pred: torch.Tensor, head: str) -> PredictionMap:
        pred = unpad(pred, item.geometry)
        if item.match_input_resolution:
            pred = resize_back(pred, item.geometry)
        kind = self.kind
        final = to_form(pred.float().clamp(0.0, 1.0), kind, item.form).cpu()
        return PredictionMap(
            array=final.numpy(),
            kind=kind,
            model_id=self.id,
            processing_size=item.geometry.processing_hw,
            form=item.form,
            extra={"base_model": self.base.model_id, "probe_head": head},
        )
