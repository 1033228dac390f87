"""A stand-in device for benchmarks of the serving path: each batch sleeps a fixed time instead of computing.

The serving path around the model (decode, batching, pre/post-processing, encoding, transport) is what this
measures, on a CPU machine, as if a GPU did the model's work: the sleep releases the GIL and uses no CPU, so
a pipelined worker should reach `batch / sleep` images per second whenever its CPU work per batch takes less.
The map is cheap and image-derived (the latent's channel mean, a coarse gray picture), so answers encode like
real smooth maps. Selected with `backend = "simulated"` and `simulated_batch_ms` in the model spec.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from models.outputs import OutputKind
from models.runtime.base import Runtime


class SimulatedRuntime(Runtime):
    name = "simulated"

    def __init__(self, output_kind: OutputKind, generative: bool, batch_ms: float) -> None:
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.output_kind = output_kind
        self.generative = generative
        self.batch_ms = batch_ms

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        small = F.avg_pool2d(images.float(), 8)
        return torch.cat([small, small.mean(1, keepdim=True)], dim=1)

    def head(self, latents: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        time.sleep(self.batch_ms / 1000.0)
        gray = latents[:, 3:4]
        if self.output_kind == "normals":
            maps = torch.cat([latents[:, 0:1] * 0.3, latents[:, 1:2] * 0.3, torch.ones_like(gray)], dim=1)
            maps = maps / torch.linalg.vector_norm(maps, dim=1, keepdim=True)
        else:
            maps = (gray + 1.0) / 2.0
        return F.interpolate(maps, scale_factor=8, mode="bilinear").clamp(-1.0, 1.0)
