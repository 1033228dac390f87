"""Execution backends behind one interface: the predictor math runs in torch, ONNX Runtime, TensorRT or Triton."""

from models.runtime.base import BACKENDS, Backend, BackendError, Runtime
from models.runtime.torch_runtime import TorchRuntime

__all__ = ["BACKENDS", "Backend", "BackendError", "Runtime", "TorchRuntime"]
