"""A Triton model repository a stock Triton server loads: encoder and head on the onnxruntime backend with
dynamic batching, and an ensemble `encoder -> head` that clients call as one model.

`config.pbtxt` files are written from Triton's own protobuf `ModelConfig` (tritonclient), so they parse by
construction; the tests parse them back.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from models.errors import BackendError
from models.export.graphs import ENCODER, HEAD, input_names
from models.export.manifest import Manifest

InstanceKind = Literal["gpu", "cpu"]


def model_names(model_id: str) -> dict[str, str]:
    """Triton model names: the ensemble carries the served id, the parts get suffixes."""
    return {"ensemble": model_id, ENCODER: f"{model_id}_encoder", HEAD: f"{model_id}_head"}


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise BackendError("Triton repositories need the tritonclient package (pip install tritonclient)") from exc
    return model_config_pb2


def _tensor(pb, name: str, dims: list[int]):
    return {"name": name, "data_type": pb.TYPE_FP32, "dims": dims}


def part_config(
    manifest: Manifest,
    graph: str,
    instance_kind: InstanceKind,
    instances: int,
    max_queue_delay_us: int,
    tensorrt_accelerator: bool,
):
    pb = _pb()
    names = model_names(manifest.model_id)
    channels = 3 if manifest.output_kind == "normals" else 1
    if graph == ENCODER:
        inputs, outputs = [_tensor(pb, "image", [3, -1, -1])], [_tensor(pb, "latent", [4, -1, -1])]
    else:
        inputs = [_tensor(pb, n, [4, -1, -1]) for n in input_names(HEAD, manifest.generative)]
        outputs = [_tensor(pb, "map", [channels, -1, -1])]
    config = pb.ModelConfig(
        name=names[graph],
        backend="onnxruntime",
        max_batch_size=manifest.max_batch,
        input=[pb.ModelInput(**t) for t in inputs],
        output=[pb.ModelOutput(**t) for t in outputs],
        instance_group=[
            pb.ModelInstanceGroup(
                kind=pb.ModelInstanceGroup.KIND_GPU if instance_kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU,
                count=instances,
            )
        ],
        dynamic_batching=pb.ModelDynamicBatching(
            preferred_batch_size=sorted({b for b in (4, 8, 16, manifest.max_batch) if b <= manifest.max_batch}),
            max_queue_delay_microseconds=max_queue_delay_us,
        ),
    )
    if tensorrt_accelerator and instance_kind == "gpu":
        accel = config.optimization.execution_accelerators.gpu_execution_accelerator.add()
        accel.name = "tensorrt"
        accel.parameters["precision_mode"] = "FP16" if manifest.dtype == "fp16" else "FP32"
        accel.parameters["max_workspace_size_bytes"] = str(8 << 30)
    return config


def ensemble_config(manifest: Manifest):
    """No dynamic batching here: the composing models batch across requests themselves."""
    pb = _pb()
    names = model_names(manifest.model_id)
    channels = 3 if manifest.output_kind == "normals" else 1
    head_inputs = input_names(HEAD, manifest.generative)
    inputs = [_tensor(pb, "image", [3, -1, -1])] + [_tensor(pb, "noise", [4, -1, -1])] * manifest.generative
    step_encoder = pb.ModelEnsembling.Step(
        model_name=names[ENCODER], model_version=-1, input_map={"image": "image"}, output_map={"latent": "latent"}
    )
    step_head = pb.ModelEnsembling.Step(
        model_name=names[HEAD], model_version=-1, input_map={n: n for n in head_inputs}, output_map={"map": "map"}
    )
    return pb.ModelConfig(
        name=names["ensemble"],
        platform="ensemble",
        max_batch_size=manifest.max_batch,
        input=[pb.ModelInput(**t) for t in inputs],
        output=[pb.ModelOutput(**_tensor(pb, "map", [channels, -1, -1]))],
        ensemble_scheduling=pb.ModelEnsembling(step=[step_encoder, step_head]),
    )


def write_repository(
    onnx_dir: Path,
    manifest: Manifest,
    out: Path,
    instance_kind: InstanceKind = "gpu",
    instances: int = 1,
    max_queue_delay_us: int = 2000,
    tensorrt_accelerator: bool = True,
) -> list[Path]:
    """Lay out `out/<id>_encoder`, `out/<id>_head` (version 1, model.onnx) and the ensemble `out/<id>`."""
    from google.protobuf import text_format

    names = model_names(manifest.model_id)
    written = []
    for graph in (ENCODER, HEAD):
        folder = out / names[graph]
        version = folder / "1"
        version.mkdir(parents=True, exist_ok=True)
        src = onnx_dir / manifest.graphs[graph].file
        shutil.copy2(src, version / "model.onnx")
        if (data := src.with_name(src.name + ".data")).exists():  # external weights keep their recorded name
            shutil.copy2(data, version / data.name)
        config = part_config(manifest, graph, instance_kind, instances, max_queue_delay_us, tensorrt_accelerator)
        (folder / "config.pbtxt").write_text(text_format.MessageToString(config))
        written.append(folder / "config.pbtxt")
    ensemble = out / names["ensemble"]
    (ensemble / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version folder, even an empty one
    (ensemble / "config.pbtxt").write_text(text_format.MessageToString(ensemble_config(manifest)))
    written.append(ensemble / "config.pbtxt")
    return written


def read_config(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), _pb().ModelConfig())
