"""The one interface a probe runs through, whatever executes the base model: an image batch in, every MLP
member's logits at the feature grid out, and (when asked) the base model's own maps from the same UNet pass.

Two implementations: `TorchProbeHead` taps the eager UNet with forward hooks; `OnnxProbeHead` runs
`probe_head.onnx` (`models/probes/export.py`: the same taps and MLPs as graph outputs) in ONNX Runtime beside
the base model's exported encoder. The vote, the crop and the resize stay in `Probe` and are shared.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.predictors.base import SingleStepPredictor
from models.probes.features import TapConfig, extract, unet_input_noise
from models.probes.mlp import PixelEnsemble


@dataclass(frozen=True)
class HeadOutput:
    """`logits` `[M, B, C, h, w]` float32 (every member's, at the feature grid); `maps` `[B, C, PH, PW]`
    float32 (the base model's raw maps at the padded size, as `DensePredictor.predict_raw` gives) or None."""

    logits: torch.Tensor
    maps: torch.Tensor | None


class ProbeHead(ABC):
    """Runs a probe's features and MLPs on its base model's executor."""

    device: torch.device
    #: True when the UNet input holds the probe's fixed-seed noise (Lotus-G): the depth map reports that seed.
    seeded: bool = False
    #: False when the feature pass cannot give the base model's map (Marigold: its map is a multi-step run).
    shares_depth: bool = True

    @abstractmethod
    def run(self, images: torch.Tensor, with_depth: bool, stages: dict[str, float]) -> HeadOutput:
        """`images` `[B, 3, PH, PW]` float32 in [-1, 1] on `device`; adds seconds per stage to `stages`."""


def _add(stages: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    stages[name] = stages.get(name, 0.0) + now - since
    return now


class TorchProbeHead(ProbeHead):
    """Forward hooks on the eager UNet (single-step families): the t = 999 pass is shared with the depth."""

    def __init__(
        self, core: SingleStepPredictor, taps: TapConfig, ensemble: PixelEnsemble, shares_depth: bool = True
    ) -> None:
        self.core, self.taps, self.shares_depth = core, taps, shares_depth
        self.ensemble = ensemble.to(core.device).eval()
        self.device = core.device
        self.seeded = core.generative

    def run(self, images: torch.Tensor, with_depth: bool, stages: dict[str, float]) -> HeadOutput:
        core = self.core
        start = time.perf_counter()
        latent = core.encode(images.to(core.dtype))
        noise = unet_input_noise(core, latent, self.taps.noise_seed)
        feats, x0 = extract(core, latent, self.taps, noise)
        maps = None
        if with_depth:
            if x0 is None:  # 999 is not among the probe's timesteps: the depth needs its own UNet call
                x0 = core.predict_latent(latent, noise)
            maps = core.postprocess(core.decode(x0)).float()
        mid = _add(stages, "encode_unet", start)
        logits = self.ensemble(feats)
        _add(stages, "probe", mid)
        return HeadOutput(logits, maps)


class OnnxProbeHead(ProbeHead):
    """`probe_head.onnx` in ONNX Runtime, fed by the base model's exported encoder (its ONNX Runtime session).

    The graph's inputs are the base head's (`latent`, and `noise` for Lotus-G: the probe's fixed seed); its
    outputs `map`, `features`, `logits`. A batch with depth runs it for `map` and `logits`; a segment-only batch
    runs its logits-only twin (`probe_logits.onnx`: no VAE decoder). The providers are the base session's minus
    TensorRT (no shape profiles for these graphs: CUDA or CPU).
    """

    def __init__(
        self, runtime: object, graph: Path, taps: TapConfig, members: int, classes: int, threads: int | None = None
    ) -> None:
        from models.export.graphs import ENCODER
        from models.probes.onnx_graph import logits_graph

        self.runtime = runtime
        self.encoder = runtime.sessions[ENCODER]  # type: ignore[attr-defined]
        self.device: torch.device = runtime.device  # type: ignore[attr-defined]
        self.seeded = bool(runtime.generative)  # type: ignore[attr-defined]
        self.out_channels: int = runtime.out_channels  # type: ignore[attr-defined]
        self.taps, self.members, self.classes = taps, members, classes
        self.session = probe_session(graph, self.encoder, threads)
        self.logits_session = probe_session(logits_graph(graph), self.encoder, threads)
        self.graph = graph

    def run(self, images: torch.Tensor, with_depth: bool, stages: dict[str, float]) -> HeadOutput:
        from models.predictors.base import seeded_noise

        start = time.perf_counter()
        b, _, ph, pw = images.shape
        latent = self.runtime.encode(images)  # type: ignore[attr-defined]
        inputs = {"latent": latent}
        if self.seeded:
            noise = seeded_noise([self.taps.noise_seed], (ph // 8, pw // 8)).to(self.device)
            inputs["noise"] = noise.expand(b, -1, -1, -1)
        mid = _add(stages, "encode", start)
        gh, gw = ph // self.taps.stride, pw // self.taps.stride
        wanted = {"logits": (self.members, b, self.classes, gh, gw)}
        if with_depth:
            wanted["map"] = (b, self.out_channels, ph, pw)
        session = self.session if with_depth else self.logits_session
        out = run_bound(session, self.device, inputs, wanted)
        _add(stages, "probe", mid)
        return HeadOutput(out["logits"], out.get("map"))


def probe_session(graph: Path, encoder: object, threads: int | None = None) -> object:
    """An ONNX Runtime session for a probe graph on the base encoder session's providers minus TensorRT (no
    shape profiles for these graphs: CUDA or CPU); idle threads do not spin (they would steal torch's cores)."""
    import onnxruntime as ort

    from models.runtime.onnxruntime_runtime import session_options

    options = session_options(threads)
    base_providers = encoder.get_providers()  # type: ignore[attr-defined]
    providers = [p for p in base_providers if p != "TensorrtExecutionProvider"] or ["CPUExecutionProvider"]
    return ort.InferenceSession(str(graph), options, providers=providers)


def run_bound(
    session: object, device: torch.device, inputs: dict[str, torch.Tensor], outputs: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """One ONNX Runtime run with IO binding on torch tensors of `device` (float32 at the boundary): nothing
    crosses to the host on a GPU, and outputs not named are not bound."""
    binding = session.io_binding()  # type: ignore[attr-defined]
    kind, index = device.type, device.index or 0
    keep = []  # the bound inputs must outlive the run
    for name, tensor in inputs.items():
        t = tensor.to(device, torch.float32).contiguous()
        keep.append(t)
        binding.bind_input(name, kind, index, np.float32, tuple(t.shape), t.data_ptr())
    result = {}
    for name, shape in outputs.items():
        result[name] = torch.empty(shape, dtype=torch.float32, device=device)
        binding.bind_output(name, kind, index, np.float32, shape, result[name].data_ptr())
    session.run_with_iobinding(binding)  # type: ignore[attr-defined]
    return result
