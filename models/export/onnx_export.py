"""ONNX export of the encoder and head graphs: dynamic batch and spatial axes, fused attention, optional fp16.

The graphs are traced in fp32 on the CPU with the legacy TorchScript exporter: it exports a full SD UNet in
seconds, and the dynamo exporter specialises on the UNet's shape-dependent `upsample_size` branch. Attention is
traced through diffusers' classic processor (the same math as SDPA) because that is the pattern ONNX Runtime's
transformer optimizer fuses into its `Attention` / `MultiHeadAttention` kernels; TensorRT fuses it by itself.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch

from models.errors import BackendError
from models.export.graphs import ENCODER, GRAPHS, EncoderGraph, HeadGraph, input_names, output_name, trace_inputs
from models.export.manifest import ExportDtype, GraphFile
from models.predictors.base import SingleStepPredictor

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
#: Ops that stay fp32 in an fp16 graph: the VAE's GroupNorm (InstanceNormalization after export) overflows in
#: fp16 at high resolution, and the post-processing reductions need the precision.
FP32_OPS = [
    "InstanceNormalization",
    "GroupNormalization",
    "Resize",  # its scales input must stay fp32; nearest-neighbour upsampling is exact either way
    "ReduceMean",
    "ReduceL2",
    "ReduceSum",
    "Pow",
    "Sqrt",
]
#: Protobuf cannot hold more than 2 GB; bigger graphs keep their weights in one side file.
EXTERNAL_DATA_BYTES = 1 << 30
Optimization = Literal["onnxruntime", "none"]


def graph_files(generative: bool, out_channels: int) -> dict[str, GraphFile]:
    """The files and symbolic shapes of the two graphs, as the manifest records them."""
    latent = ["batch", 4, "latent_height", "latent_width"]
    return {
        ENCODER: GraphFile(
            file="encoder.onnx",
            inputs={"image": ["batch", 3, "height", "width"]},
            outputs={"latent": latent},
        ),
        "head": GraphFile(
            file="head.onnx",
            inputs={name: latent for name in input_names("head", generative)},
            outputs={"map": ["batch", out_channels, "height", "width"]},
        ),
    }


def export_onnx(
    core: SingleStepPredictor,
    out_dir: Path,
    dtype: ExportDtype = "fp32",
    opset: int = DEFAULT_OPSET,
    optimization: Optimization = "onnxruntime",
) -> dict[str, GraphFile]:
    """Write `encoder.onnx` and `head.onnx` into `out_dir`; the core must be fp32 (it is traced on the CPU)."""
    import onnx

    if core.dtype != torch.float32:
        raise BackendError("export traces the fp32 predictor; load it with dtype fp32 (fp16 is applied to the graph)")
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    out_dir.mkdir(parents=True, exist_ok=True)
    files = graph_files(core.generative, core.out_channels)
    modules = {ENCODER: EncoderGraph(core), "head": HeadGraph(core)}
    core.unet.set_attn_processor(AttnProcessor())
    core.vae.set_attn_processor(AttnProcessor())
    try:
        with tempfile.TemporaryDirectory(prefix="dense-export-") as tmp:
            for graph in GRAPHS:
                names = input_names(graph, core.generative)
                out = output_name(graph)
                raw = Path(tmp) / f"{graph}.onnx"
                with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
                    torch.onnx.export(
                        modules[graph],
                        trace_inputs(graph, core.generative, core.device),
                        str(raw),
                        input_names=names,
                        output_names=[out],
                        dynamic_axes={n: {0: "batch", 2: "height", 3: "width"} for n in [*names, out]},
                        opset_version=opset,
                        dynamo=False,
                        do_constant_folding=True,
                    )
                model = _optimize(raw, optimization) if optimization == "onnxruntime" else onnx.load(str(raw))
                if dtype == "fp16":
                    model = to_fp16(model)
                _rename_dims(model, graph)
                save(model, out_dir / files[graph].file)
    finally:
        core.unet.set_attn_processor(AttnProcessor2_0())
        core.vae.set_attn_processor(AttnProcessor2_0())
    return files


def fuse_attention(path: Path):
    """The ONNX model at `path` through the same optimizer as the exported heads (other graphs over a UNet,
    such as a probe's, run as fast as the base head)."""
    return _optimize(path, "onnxruntime")


def _optimize(path: Path, optimization: Optimization):
    """ONNX Runtime's transformer optimizer: fuse attention (unpacked Q/K/V, so the CPU kernels run it too)."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("unet")
    # GroupNorm / NHWC conv / BiasSplitGelu are CUDA-only contrib ops; keep the graph portable across EPs.
    options.enable_group_norm = False
    options.enable_skip_group_norm = False
    options.enable_nhwc_conv = False
    options.enable_bias_splitgelu = False
    options.enable_packed_qkv = False
    options.enable_packed_kv = False
    logging.getLogger("onnxruntime.transformers").setLevel(logging.WARNING)
    optimized = optimize_model(
        str(path), model_type="unet", opt_level=0, optimization_options=options, use_gpu=True, only_onnxruntime=False
    )
    log.info("fused: %s", {k: v for k, v in optimized.get_fused_operator_statistics().items() if v})
    model = optimized.model
    domains = {op.domain for op in model.opset_import}
    if "com.microsoft" not in domains and any(n.domain == "com.microsoft" for n in model.graph.node):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # so onnx.checker accepts it
    return model


def to_fp16(model, force_light_shape_inference: bool = False):
    """fp16 weights and activations, fp32 inputs/outputs and FP32_OPS (casts are inserted around them)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    light = force_light_shape_inference or model.ByteSize() > EXTERNAL_DATA_BYTES
    if light:
        # onnx shape inference serialises the model, which protobuf refuses above 2 GB (an SD-sized fp32 head):
        # infer on the graph with the weight bytes set aside (only their shapes matter), then put them back.
        stash = [(t, t.raw_data) for t in model.graph.initializer]
        for tensor, _ in stash:
            tensor.ClearField("raw_data")
        inferred = onnx.shape_inference.infer_shapes(model)
        for tensor, raw in stash:
            tensor.raw_data = raw
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred.graph.value_info)
    return convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS, disable_shape_infer=light)


def _rename_dims(model, graph: str) -> None:
    """Name the dynamic axes as the manifest does (the exporter names them per tensor)."""
    names = {0: "batch", 2: "latent_height", 3: "latent_width"}
    pixel = {0: "batch", 2: "height", 3: "width"}
    for value in [*model.graph.input, *model.graph.output]:
        is_latent = value.name in ("latent", "noise")
        dims = value.type.tensor_type.shape.dim
        for axis, label in (names if is_latent else pixel).items():
            if dims[axis].dim_param:
                dims[axis].dim_param = label


def save(model, path: Path) -> None:
    import onnx

    data = path.with_name(path.name + ".data")
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save_model(model, str(path))
