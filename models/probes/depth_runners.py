"""What runs a depth probe's pass, whatever executes its base model: an image batch in, one head's depth grid
(`[B, 1, PH / stride, PW / stride]`, the mean over the serving timesteps) out.

`TorchDepthRunner` taps the eager UNet (forward hooks, `depth.extract_depth_features`) and runs `DepthHeads`;
`OnnxDepthRunner` runs the probe's exported graph (`probe_depth.onnx`, `models/probes/export.py`:
the same taps and heads, each timestep's embedding a constant) in ONNX Runtime, fed by the base model's
exported encoder. `DepthProbe` shares the rest (upsampling, crop, resize, the map's form) between them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from models.predictors.base import SingleStepPredictor
from models.probes.depth import DepthHeads, extract_depth_features
from models.probes.features import TapConfig, unet_input_noise
from models.probes.heads import probe_session, run_bound


class DepthRunner(ABC):
    """One head's depth grid of an image batch on the base model's executor."""

    device: torch.device

    @abstractmethod
    def grid(self, images: torch.Tensor, head: str) -> torch.Tensor:
        """`images` `[B, 3, PH, PW]` float32 in [-1, 1] on `device` -> `[B, 1, PH / stride, PW / stride]`."""


class TorchDepthRunner(DepthRunner):
    """Hooks on the eager UNet: one encode, one tapped UNet call per serving timestep, the MLP."""

    def __init__(self, core: SingleStepPredictor, heads: DepthHeads, taps: TapConfig) -> None:
        self.core, self.taps = core, taps
        self.heads = heads.to(core.device).eval()
        self.device = core.device

    def grid(self, images: torch.Tensor, head: str) -> torch.Tensor:
        core = self.core
        latent = core.encode(images.to(core.dtype))
        noise = unet_input_noise(core, latent, self.taps.noise_seed)
        feats = extract_depth_features(core, latent, self.taps, noise)
        return self.heads.averaged(feats, self.taps.timesteps, head)


class OnnxDepthRunner(DepthRunner):
    """`probe_depth.onnx` (the depth grids alone: no VAE decoder) in ONNX Runtime, after the base's encoder
    session; Lotus-G's `noise` input is the probe's fixed-seed latent, as the hooks use."""

    def __init__(self, runtime: object, graph: Path, taps: TapConfig, threads: int | None = None) -> None:
        from models.export.graphs import ENCODER
        from models.probes.onnx_graph import pruned_graph

        self.runtime, self.taps, self.graph = runtime, taps, graph
        encoder = runtime.sessions[ENCODER]  # type: ignore[attr-defined]
        self.device: torch.device = runtime.device  # type: ignore[attr-defined]
        self.seeded = bool(runtime.generative)  # type: ignore[attr-defined]
        self.session = probe_session(pruned_graph(graph, "depth"), encoder, threads)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def grid(self, images: torch.Tensor, head: str) -> torch.Tensor:
        from models.predictors.base import seeded_noise

        b, _, ph, pw = images.shape
        inputs = {"latent": self.runtime.encode(images)}  # type: ignore[attr-defined]
        if self.seeded:
            noise = seeded_noise([self.taps.noise_seed], (ph // 8, pw // 8)).to(self.device)
            inputs["noise"] = noise.expand(b, -1, -1, -1)
        name = f"depth_{head}"
        if name not in self.outputs:
            raise ValueError(f"this depth probe's graph has no {head} head (outputs {self.outputs})")
        shape = (b, 1, ph // self.taps.stride, pw // self.taps.stride)
        return run_bound(self.session, self.device, inputs, {name: shape})[name]
