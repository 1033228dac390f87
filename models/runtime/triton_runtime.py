"""Triton Inference Server over gRPC (tritonclient), serving a repository written by `dense-serve export
--format triton`. Triton batches across our workers too; our batcher still groups by shape first.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from models.export.graphs import ENCODER, HEAD
from models.export.manifest import Manifest
from models.export.triton_repo import model_names
from models.runtime.base import BackendError, Runtime


class TritonRuntime(Runtime):
    name = "triton"

    def __init__(self, url: str, manifest: Manifest, timeout_s: float = 60.0) -> None:
        try:
            import tritonclient.grpc as grpcclient
        except ImportError as exc:
            raise BackendError("backend 'triton' needs tritonclient (pip install 'tritonclient[grpc]')") from exc
        self._grpc = grpcclient
        self.manifest = manifest
        self.output_kind = manifest.output_kind
        self.generative = manifest.generative
        self.dtype = torch.float16 if manifest.dtype == "fp16" else torch.float32
        self.device = torch.device("cpu")  # tensors come back over the network
        self.names = model_names(manifest.model_id)
        self.timeout_s = timeout_s
        self.client = grpcclient.InferenceServerClient(url)
        try:
            ready = all(self.client.is_model_ready(n) for n in self.names.values())
        except Exception as exc:  # tritonclient wraps every transport failure in its own exception type
            raise BackendError(f"Triton server at {url} is not reachable: {exc}") from exc
        if not ready:
            raise BackendError(
                f"Triton server at {url} has not loaded {sorted(self.names.values())}; "
                "point its --model-repository at the folder `dense-serve export --format triton` wrote"
            )

    def _infer(self, model: str, inputs: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        grpc = self._grpc
        tensors = []
        for name, value in inputs.items():
            array = np.ascontiguousarray(value.detach().float().cpu().numpy())
            tensor = grpc.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        try:
            result = self.client.infer(
                model, tensors, outputs=[grpc.InferRequestedOutput(output)], client_timeout=self.timeout_s
            )
        except Exception as exc:
            raise BackendError(f"Triton inference on {model} failed: {exc}") from exc
        return torch.from_numpy(result.as_numpy(output).copy())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._infer(self.names[ENCODER], {"image": images}, "latent")

    def head(self, latents: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self._infer(self.names[HEAD], self.head_inputs(latents, noise), "map")

    def run(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One round trip through the ensemble instead of two."""
        b, _, h, w = images.shape
        inputs = self.head_inputs(torch.empty(b, 4, h // 8, w // 8), noise)
        inputs.pop("latent")
        return self._infer(self.names["ensemble"], {"image": images, **inputs}, "map")

    def run_timed(self, images: torch.Tensor, noise: torch.Tensor | None, stages: dict[str, float]) -> torch.Tensor:
        """The ensemble is one round trip, so it is one stage (encode is inside it)."""
        start = time.perf_counter()
        maps = self.run(images, noise)
        stages["unet_decode"] = stages.get("unet_decode", 0.0) + time.perf_counter() - start
        return maps

    def close(self) -> None:
        self.client.close()
