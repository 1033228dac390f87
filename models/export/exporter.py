"""`dense-serve export`: trace, convert, verify against the PyTorch predictor, and record it all in a manifest.

Also used by the loader, which exports a checkpoint into the engine cache the first time a model is served
with an exported backend.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from models.build import build_core
from models.detect import CheckpointConfig, ModelIdentity, identify
from models.errors import ModelError
from models.export.manifest import (
    ExportDtype,
    ExportFormat,
    Manifest,
    checkpoint_hash,
    is_export,
    library_versions,
)
from models.export.onnx_export import DEFAULT_OPSET, export_onnx
from models.export.profiles import bucket_profiles
from models.export.verify import verify
from models.predictors.base import SingleStepPredictor
from models.source import resolve_source
from models.spec import ModelSpec

log = logging.getLogger(__name__)


class ExportError(ModelError):
    """An export could not be produced, or is further from the PyTorch predictor than its tolerance."""


def _reference(spec: ModelSpec) -> tuple[Path, ModelIdentity, SingleStepPredictor]:
    path = resolve_source(spec)
    if is_export(path):
        raise ExportError(f"'{spec.source}' is already an export; export from the diffusers checkpoint")
    cfg = CheckpointConfig.read(path)
    ident = identify(spec, cfg)
    return path, ident, build_core(path, cfg, ident, torch.device("cpu"), torch.float32)


def open_runtime(folder: Path, manifest: Manifest, device: str = "auto"):
    """The runtime an export is verified with: its own backend (ONNX Runtime for onnx and triton folders)."""
    if manifest.format == "tensorrt":
        from models.runtime.tensorrt_runtime import TensorRTRuntime

        return TensorRTRuntime(folder, manifest, device)
    from models.runtime.onnxruntime_runtime import OnnxRuntime

    return OnnxRuntime(folder, manifest, device)


def export_model(
    spec: ModelSpec,
    fmt: ExportFormat,
    out: Path,
    dtype: ExportDtype = "fp32",
    max_batch: int = 16,
    resolutions: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    device: str = "auto",
    triton_instance_kind: str = "gpu",
    model_hash: str | None = None,
) -> Manifest:
    """Write an export of `spec` to `out` (created or replaced); raise ExportError if it misses its tolerance.

    `model_hash` is the checkpoint's `checkpoint_hash` when the caller already has it (hashing reads every
    weight file: seconds for an SD-sized model).
    """
    path, ident, core = _reference(spec)
    resolutions = list(resolutions or [ident.processing_res or 768])
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp:
        stage = Path(tmp) / "export"
        onnx_dir = stage if fmt != "triton" else Path(tmp) / "onnx"
        files = export_onnx(core, onnx_dir, dtype, opset, "none" if fmt == "tensorrt" else "onnxruntime")
        manifest = Manifest(
            format=fmt,
            model_id=spec.id,
            model_hash=model_hash or checkpoint_hash(path),
            source=str(spec.source),
            family=ident.family,
            task=ident.task,
            output_kind=ident.output_kind,
            generative=core.generative,
            processing_res=ident.processing_res,
            default_seed=spec.seed,
            minmax_normalize=spec.minmax_normalize,
            dtype=dtype,
            opset=opset,
            max_batch=max_batch,
            resolutions=resolutions,
            profiles=bucket_profiles(resolutions, max_batch),
            graphs=files,
            versions=library_versions(),
        )
        onnx_manifest = manifest.model_copy(update={"format": "onnx"}) if fmt == "triton" else manifest
        runtime = open_runtime(onnx_dir, onnx_manifest, device)
        try:
            provider = getattr(runtime, "provider", runtime.name)
            manifest.verification = verify(core, runtime, dtype, provider)
        finally:
            runtime.close()
        if fmt == "tensorrt":
            from models.export.tensorrt_build import engine_key

            for graph, file in manifest.graphs.items():
                key = engine_key(manifest, graph)
                file.engines[key] = f"engines/{graph}-{key}.plan"
        stage.mkdir(parents=True, exist_ok=True)
        if fmt == "triton":
            from models.export.triton_repo import write_repository

            write_repository(onnx_dir, manifest, stage, instance_kind=triton_instance_kind)  # type: ignore[arg-type]
        manifest.write(stage)
        v = manifest.verification
        if not v.passed:
            raise ExportError(
                f"export of '{spec.id}' ({fmt} {dtype}) differs from the PyTorch predictor by {v.max_abs_error:.3g}, "
                f"above the tolerance {v.tolerance:g}; nothing was written to {out}"
            )
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    log.info("exported %s as %s %s to %s (max abs error %.3g)", spec.id, fmt, dtype, out, v.max_abs_error)
    return manifest
