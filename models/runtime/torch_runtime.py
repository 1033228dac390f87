"""Eager PyTorch: the reference every exported backend is checked against (fp16 + SDPA on CUDA)."""

from __future__ import annotations

import torch

from models.predictors.base import SingleStepPredictor
from models.runtime.base import Runtime


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, core: SingleStepPredictor, compile: bool = False, compile_backend: str = "inductor") -> None:
        self.core = core.eval()
        self.device = core.device
        self.dtype = core.dtype
        self.output_kind = core.output_kind
        self.generative = core.generative
        self._encode = self.core.encode
        self._head = self.core.head
        if compile:
            # Dynamic shapes: resolution buckets and batch sizes vary; one graph per shape would recompile forever.
            # `compile_backend` other than inductor is for checks that must stay cheap (the GPU check's CPU smoke).
            self._encode = torch.compile(self.core.encode, dynamic=True, backend=compile_backend)
            self._head = torch.compile(self.core.head, dynamic=True, backend=compile_backend)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images.to(self.device, self.dtype))

    @torch.inference_mode()
    def head(self, latents: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        latents = latents.to(self.device, self.dtype)
        if noise is not None:
            noise = noise.to(self.device, self.dtype)
        return self._head(latents, noise).float()
