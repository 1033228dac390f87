"""Native TensorRT engines on a CUDA stream shared with torch; one execution context per optimisation profile,
inputs and outputs bound to torch CUDA tensors (the caching allocator keeps those buffers between batches).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.export.graphs import HEAD
from models.export.manifest import Manifest
from models.export.profiles import pick_profile
from models.export.tensorrt_build import ensure_engines, import_tensorrt
from models.runtime.base import BackendError, GraphRuntime

log = logging.getLogger(__name__)


class TensorRTRuntime(GraphRuntime):
    name = "tensorrt"

    def __init__(self, folder: Path, manifest: Manifest, device: str = "auto") -> None:
        trt = import_tensorrt()
        if not torch.cuda.is_available() or device == "cpu":
            raise BackendError("backend 'tensorrt' runs on a CUDA GPU only; use onnxruntime or torch on the CPU")
        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        if self.device.index is None:
            self.device = torch.device("cuda", 0)
        self.manifest = manifest
        self.output_kind = manifest.output_kind
        self.generative = manifest.generative
        self.dtype = torch.float16 if manifest.dtype == "fp16" else torch.float32
        self.max_hw = max((p.max_hw for p in manifest.profiles), key=lambda hw: hw[0] * hw[1])
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
            self.engines = {}
            self.contexts: dict[str, list] = {}
            for graph, path in ensure_engines(folder, manifest, self.device.index).items():
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise BackendError(f"cannot load TensorRT engine {path}; delete it to rebuild")
                self.engines[graph] = engine
                contexts = []
                for index in range(engine.num_optimization_profiles):
                    context = engine.create_execution_context()
                    context.set_optimization_profile_async(index, self.stream.cuda_stream)
                    contexts.append(context)
                self.contexts[graph] = contexts
            self.stream.synchronize()
        log.info("tensorrt %s on %s: %d profiles", manifest.model_id, self.device, len(manifest.profiles))

    def _run(
        self, graph: str, inputs: dict[str, torch.Tensor], out_name: str, out_shape: tuple[int, ...]
    ) -> torch.Tensor:
        batch = out_shape[0]
        hw = (out_shape[2], out_shape[3]) if graph == HEAD else tuple(inputs["image"].shape[2:])
        context = self.contexts[graph][pick_profile(self.manifest.profiles, batch, hw)]
        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            keep = []
            with torch.cuda.stream(self.stream):
                for name, tensor in inputs.items():
                    t = tensor.to(self.device, torch.float32).contiguous()
                    keep.append(t)
                    context.set_input_shape(name, tuple(t.shape))
                    context.set_tensor_address(name, t.data_ptr())
                out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
                context.set_tensor_address(out_name, out.data_ptr())
                if not context.execute_async_v3(self.stream.cuda_stream):
                    raise BackendError(f"TensorRT execution of {graph} failed")
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            for t in [*keep, out]:  # tell the allocator these buffers were used on our stream
                t.record_stream(self.stream)
        return out

    def close(self) -> None:
        self.contexts.clear()
        self.engines.clear()
