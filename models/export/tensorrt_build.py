"""TensorRT engines from the exported ONNX: one optimisation profile per resolution bucket, fp16 with the
normalisation layers pinned to fp32, cached on disk under a key of GPU architecture, TensorRT version, model
hash, graph and profiles, so a restart loads instead of rebuilding (minutes for an SD-sized model).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from models.errors import BackendError
from models.export.graphs import input_names
from models.export.manifest import Manifest, dumps
from models.export.profiles import graph_shapes

log = logging.getLogger(__name__)
WORKSPACE_BYTES = 8 << 30


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(
            "TensorRT is not installed: `pip install tensorrt` (needs an NVIDIA GPU and driver), "
            "or serve the ONNX export with backend onnxruntime"
        ) from exc
    return trt


def gpu_arch(device_index: int = 0) -> str:
    import torch

    if not torch.cuda.is_available():
        raise BackendError("TensorRT engines need a CUDA GPU; none is visible here")
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm{major}{minor}"


def engine_key(manifest: Manifest, graph: str, device_index: int = 0) -> str:
    trt = import_tensorrt()
    identity = {
        "arch": gpu_arch(device_index),
        "trt": trt.__version__,
        "model": manifest.model_hash,
        "graph": graph,
        "dtype": manifest.dtype,
        "profiles": [p.model_dump() for p in manifest.profiles],
    }
    digest = hashlib.sha256(dumps(identity).encode()).hexdigest()[:16]
    return f"{identity['arch']}-trt{trt.__version__}-{digest}"


def build_engine(onnx_path: Path, manifest: Manifest, graph: str, out: Path) -> Path:
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if manifest.dtype == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):  # GroupNorm of the VAE overflows in fp16 at high resolution
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
    names = input_names(graph, manifest.generative)
    for profile in manifest.profiles:
        shapes = graph_shapes(graph, profile)
        opt = builder.create_optimization_profile()
        for name in names:
            opt.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(opt)
    log.info(
        "building TensorRT engine for %s/%s (%d profiles); this takes a while",
        manifest.model_id,
        graph,
        len(manifest.profiles),
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine for {onnx_path}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(out)  # atomic: a worker starting beside us never reads half an engine
    return out


def ensure_engines(folder: Path, manifest: Manifest, device_index: int = 0) -> dict[str, Path]:
    """The engine of each graph for this GPU and TensorRT, built once and then loaded from the cache."""
    engines = {}
    for graph, files in manifest.graphs.items():
        key = engine_key(manifest, graph, device_index)
        path = folder / "engines" / f"{graph}-{key}.plan"
        if not path.is_file():
            build_engine(folder / files.file, manifest, graph, path)
        engines[graph] = path
    return engines
