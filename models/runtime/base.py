"""The one interface every backend implements: image batch -> latent -> map, tensors on the runtime's device.

A predictor is split in two graphs so that the multi-seed path can encode once and run the rest per seed:
`encode` (VAE encoder, posterior mean, scaled) and `head` (UNet at t = 999 with the empty prompt and task
switcher baked in, VAE decoder, per-family post-processing). Crop and resize stay in `DensePredictor` and run
on the runtime's device, so a GPU runtime post-processes on the GPU.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from models.errors import BackendError as BackendError  # re-exported: the runtimes raise it
from models.export.graphs import ENCODER, HEAD
from models.outputs import OutputKind
from models.predictors.base import seeded_noise

Backend = Literal["torch", "onnxruntime", "tensorrt", "triton", "simulated"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)


@dataclass(frozen=True)
class RuntimeInfo:
    """What a runtime says of itself: shown in `/v1/models`, metrics labels and benchmarks."""

    backend: Backend
    device: str
    dtype: str
    provider: str | None = None  # ONNX Runtime's execution provider


class Runtime(ABC):
    """Batch-first execution of one exported (or eager) predictor.

    `encode` takes `[B, 3, H, W]` float32 in [-1, 1] (H, W multiples of 8) on any device and returns the
    scaled latent `[B, 4, H/8, W/8]` on `self.device`; `head` takes that latent (and for generative families
    seeded noise of the same shape) and returns float32 maps `[B, C, H, W]` on `self.device`.
    """

    name: Backend
    #: Largest padded (height, width) the runtime can run (TensorRT: its largest profile); None = any.
    max_hw: tuple[int, int] | None = None
    device: torch.device
    #: The compute precision of the graphs (inputs and outputs are always float32).
    dtype: torch.dtype
    output_kind: OutputKind
    generative: bool

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def head(self, latents: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor: ...

    def run(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encode(images), noise)

    def run_timed(self, images: torch.Tensor, noise: torch.Tensor | None, stages: dict[str, float]) -> torch.Tensor:
        """`run`, adding the seconds of each graph to `stages` (for the compute-time metrics).

        On a GPU the device is synchronised after each graph so the split is true; the maps are copied to
        the host right after anyway, so this costs nothing measurable.
        """
        start = time.perf_counter()
        latent = self.encode(images)
        self.synchronize()
        mid = time.perf_counter()
        maps = self.head(latent, noise)
        self.synchronize()
        stages["encode"] = stages.get("encode", 0.0) + mid - start
        stages["unet_decode"] = stages.get("unet_decode", 0.0) + time.perf_counter() - mid
        return maps

    def synchronize(self) -> None:
        """Wait for the device (a no-op on the CPU): stage timings must not absorb queued kernels."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def out_channels(self) -> int:
        return 3 if self.output_kind == "normals" else 1

    def make_noise(self, seeds: Sequence[int], latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """Seeded noise for generative families, drawn on the CPU so every backend and device gets the same numbers."""
        if not self.generative:
            return None
        return seeded_noise(seeds, latent_hw).to(self.device)

    def head_inputs(self, latents: torch.Tensor, noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The head graph's named inputs: the latent, and for Lotus-G its noise (same shape)."""
        if not self.generative:
            return {"latent": latents}
        if noise is None or noise.shape != latents.shape:
            raise ValueError("Lotus-G needs one noise latent per image, shaped like the image latent")
        return {"latent": latents, "noise": noise}

    def close(self) -> None:  # noqa: B027 - optional hook, most backends have something to free
        """Free sessions, engines and connections; the default has nothing to free."""

    def describe(self) -> RuntimeInfo:
        return RuntimeInfo(self.name, str(self.device), str(self.dtype).removeprefix("torch."))


class GraphRuntime(Runtime):
    """A backend that runs the two exported graphs by name, writing into output tensors it allocates."""

    @abstractmethod
    def _run(
        self, graph: str, inputs: dict[str, torch.Tensor], out_name: str, out_shape: tuple[int, ...]
    ) -> torch.Tensor: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        return self._run(ENCODER, {"image": images}, "latent", (b, 4, h // 8, w // 8))

    def head(self, latents: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        b, _, lh, lw = latents.shape
        return self._run(HEAD, self.head_inputs(latents, noise), "map", (b, self.out_channels, lh * 8, lw * 8))
