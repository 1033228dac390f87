"""ONNX Runtime: TensorRT EP -> CUDA EP -> CPU EP by what is installed, zero-copy IO binding on torch tensors.

Inputs and outputs are bound straight to torch tensors on the runtime's device (fp32 at the graph boundary, fp16
inside an fp16 export), so on a GPU nothing crosses to the host until `DensePredictor` has cropped and resized.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import torch

from models.export.graphs import ENCODER, HEAD, input_names
from models.export.manifest import Manifest
from models.export.profiles import graph_shapes
from models.runtime.base import BackendError, GraphRuntime, RuntimeInfo

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def trt_profile_options(manifest: Manifest, graph: str) -> dict[str, str]:
    """The export's shape profiles in the TensorRT EP's syntax, so it builds its engines once for the buckets
    instead of again for every new input shape."""
    names = input_names(graph, manifest.generative)
    out: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for profile in manifest.profiles:
        shapes = graph_shapes(graph, profile)
        for key in out:
            out[key] += [f"{name}:{'x'.join(map(str, shapes[key]))}" for name in names]
    return {f"trt_profile_{key}_shapes": ",".join(v) for key, v in out.items()}


def session_options(threads: int | None = None) -> object:
    """The options of every session this project opens (base graphs and probe graphs): full graph
    optimisation, quiet logs, and idle threads that do not spin: ORT's spin by default, stealing the cores torch
    needs for pre- and post-processing between graph runs (measured: batched CPU throughput halves at 128 px)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def pick_providers(
    device: str, available: list[str], trt_cache: Path | None, manifest: Manifest, graph: str = HEAD
) -> list:
    """The provider list for a device request: 'cpu', 'cuda[:N]' or 'auto' (the GPU when one is usable)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    wants_gpu = device.startswith("cuda")
    if not any(p in available for p in GPU_PROVIDERS):
        if wants_gpu:
            raise BackendError(
                f"device '{device}' requested but this onnxruntime has no GPU provider (available: {available}); "
                "install onnxruntime-gpu"
            )
        return ["CPUExecutionProvider"]
    index = int(device.split(":")[1]) if ":" in device else 0
    stream = {}
    if torch.cuda.is_available():  # one stream with torch, so binding torch tensors needs no extra sync
        stream = {"user_compute_stream": str(torch.cuda.current_stream(index).cuda_stream)}
    providers: list = []
    if "TensorrtExecutionProvider" in available and os.environ.get("DENSE_ORT_TENSORRT", "1") != "0":
        trt = {
            "device_id": index,
            "trt_fp16_enable": manifest.dtype == "fp16",
            **trt_profile_options(manifest, graph),
            **stream,
        }
        if trt_cache is not None:
            trt_cache.mkdir(parents=True, exist_ok=True)
            trt |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache)}
        providers.append(("TensorrtExecutionProvider", trt))
    if "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {"device_id": index, **stream}))
    return [*providers, "CPUExecutionProvider"]


class OnnxRuntime(GraphRuntime):
    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: Manifest, device: str = "auto", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("backend 'onnxruntime' needs the onnxruntime package (or onnxruntime-gpu)") from exc
        self.manifest = manifest
        self.output_kind = manifest.output_kind
        self.generative = manifest.generative
        self.dtype = torch.float16 if manifest.dtype == "fp16" else torch.float32
        options = session_options(threads)
        available = ort.get_available_providers()
        self.sessions = {}
        for graph in (ENCODER, HEAD):
            providers = pick_providers(device, available, folder / "ort-trt-cache", manifest, graph)
            path = folder / manifest.graphs[graph].file
            if not path.is_file():
                raise BackendError(f"export {folder} is missing {path.name}; export the model again")
            self.sessions[graph] = ort.InferenceSession(str(path), options, providers=providers)
        self.provider = self.sessions[HEAD].get_providers()[0]
        on_gpu = self.provider in GPU_PROVIDERS
        index = int(device.split(":")[1]) if ":" in device else 0
        self.device = torch.device("cuda", index) if on_gpu else torch.device("cpu")
        log.info("onnxruntime %s on %s (%s)", manifest.model_id, self.provider, manifest.dtype)

    def _run(
        self, graph: str, inputs: dict[str, torch.Tensor], out_name: str, out_shape: tuple[int, ...]
    ) -> torch.Tensor:
        session = self.sessions[graph]
        binding = session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        keep = []  # the bound tensors must outlive the run
        for name, tensor in inputs.items():
            t = tensor.to(self.device, torch.float32).contiguous()
            keep.append(t)
            binding.bind_input(name, kind, index, np.float32, tuple(t.shape), t.data_ptr())
        out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        binding.bind_output(out_name, kind, index, np.float32, out_shape, out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    def describe(self) -> RuntimeInfo:
        return dataclasses.replace(super().describe(), provider=self.provider)

    def close(self) -> None:
        self.sessions.clear()
