"""ONNX export of a probe: the base model's head graph with the feature taps and the MLPs as extra outputs.

`probe_head.onnx` takes what `head.onnx` takes (`latent`, and `noise` for Lotus-G) and returns `map` (the base
model's prediction, as `head.onnx` computes it), `features` (the concatenated taps at the feature grid) and
`logits` (every member's, `[M, B, C, h, w]`): one graph, one UNet pass, for depth and segmentation together.
The vote (argmax per member, counts) stays outside the graph: it is integer work that every runtime does the
same, and exact parity of the float outputs is what the export must guarantee.

A depth probe's graph (`DepthHeadGraph`, `depth_outputs`) has the same inputs and returns `map`, `features`
(its taps at its serving timesteps, `[B, T * C, h, w]`) and one depth grid per head (`depth_strong`, and
`depth_weak` when trained; `[B, 1, h, w]`, the mean over the serving timesteps, each timestep's embedding a
constant of the graph): the bilinear upsampling to the processing size, the crop and the resize stay outside.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from models.predictors.base import SingleStepPredictor
from models.probes.depth import DepthHeads, depth_taps
from models.probes.features import TapConfig, extract
from models.probes.mlp import PixelEnsemble

OUTPUTS = ("map", "features", "logits")
SPATIAL = {0: "batch", 2: "height", 3: "width"}
GRID = {0: "batch", 2: "grid_height", 3: "grid_width"}


class ProbeHeadGraph(torch.nn.Module):
    def __init__(self, core: SingleStepPredictor, taps: TapConfig, ensemble: PixelEnsemble) -> None:
        super().__init__()
        self.core, self.taps, self.ensemble = core, taps, ensemble

    def forward(
        self, latent: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, x0 = extract(self.core, latent, self.taps, noise)
        if x0 is None:
            x0 = self.core.predict_latent(latent, noise)
        depth = self.core.postprocess(self.core.decode(x0))
        return depth, feats, self.ensemble(feats)


class DepthHeadGraph(torch.nn.Module):
    """The base head, the depth taps at the serving timesteps and each head's averaged grid (DepthProbe's pass)."""

    def __init__(self, core: SingleStepPredictor, taps: TapConfig, heads: DepthHeads) -> None:
        super().__init__()
        self.core, self.taps, self.heads = core, taps, heads
        self.names = depth_outputs(heads)[2:]

    def forward(self, latent: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        feats, x0 = depth_taps(self.core, latent, self.taps, noise)
        if x0 is None:
            x0 = self.core.predict_latent(latent, noise)
        depth = self.core.postprocess(self.core.decode(x0))
        grids = [self.heads.averaged(feats, self.taps.timesteps, name.removeprefix("depth_")) for name in self.names]
        return (depth, feats, *grids)


def depth_outputs(heads: DepthHeads) -> tuple[str, ...]:
    return ("map", "features", "depth_strong", *(("depth_weak",) if heads.weak is not None else ()))


def export_probe_onnx(
    core: SingleStepPredictor, taps: TapConfig, ensemble: PixelEnsemble, out: Path, latent_hw: tuple[int, int]
) -> Path:
    """Trace on the CPU in fp32 with dynamic batch and size; `latent_hw` is the trace size (any multiple works)."""
    axes = {"map": SPATIAL, "features": GRID, "logits": {1: "batch", 3: "grid_height", 4: "grid_width"}}
    return trace(ProbeHeadGraph(core, taps, ensemble), core, out, latent_hw, axes)


def export_depth_onnx(
    core: SingleStepPredictor, taps: TapConfig, heads: DepthHeads, out: Path, latent_hw: tuple[int, int]
) -> Path:
    """`export_probe_onnx` for a depth probe: `taps` are its serving taps (`DepthProbe.taps`)."""
    axes = {"map": SPATIAL} | {name: GRID for name in depth_outputs(heads)[1:]}
    return trace(DepthHeadGraph(core, taps, heads), core, out, latent_hw, axes)


def trace(
    graph: torch.nn.Module,
    core: SingleStepPredictor,
    out: Path,
    latent_hw: tuple[int, int],
    output_axes: dict[str, dict[int, str]],
) -> Path:
    """Trace `graph` (inputs as the base head's) on the CPU in fp32 with dynamic batch and size."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    graph = graph.eval()
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn((2, 4, *latent_hw), generator=gen)
    args: tuple[torch.Tensor, ...] = (latent, torch.randn_like(latent)) if core.generative else (latent,)
    names = ["latent", "noise"] if core.generative else ["latent"]
    spatial = {0: "batch", 2: "latent_height", 3: "latent_width"}
    axes = {n: spatial for n in names} | output_axes
    out.parent.mkdir(parents=True, exist_ok=True)
    core.unet.set_attn_processor(AttnProcessor())  # the classic processor traces to plain MatMul/Softmax
    core.vae.set_attn_processor(AttnProcessor())
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                args,
                str(out),
                input_names=names,
                output_names=list(output_axes),
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
    finally:
        core.unet.set_attn_processor(AttnProcessor2_0())
        core.vae.set_attn_processor(AttnProcessor2_0())
    return out
