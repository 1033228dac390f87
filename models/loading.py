"""Load a served model from a spec: find the checkpoint (local folder or hub), check it, build its predictor."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.build import build_core, empty_prompt_embedding, load_unet_vae
from models.detect import CheckpointConfig, ModelIdentity, has_random_weights, identify
from models.errors import ModelLoadError
from models.export.exporter import export_model
from models.export.manifest import Manifest, checkpoint_hash, is_export
from models.inference import DensePredictor
from models.runtime import Runtime, TorchRuntime
from models.source import resolve_source
from models.spec import ModelSpec

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{name}' requested but CUDA is not available on this machine")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 on the CPU (CPU half precision is slow and inexact)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "fp32": torch.float32}[name]


DEFAULT_ENGINE_CACHE = Path(".cache/engines")


def load_model(
    spec: ModelSpec, device: str | None = None, dtype: str | None = None, backend: str | None = None
) -> DensePredictor:
    """A servable model on the backend the spec (or the caller) asks for.

    A checkpoint served on an exported backend is exported into the engine cache first (once per checkpoint
    hash, format and dtype); an export folder is served as is, without its checkpoint. `random_weights` says
    whether the checkpoint (an export's: its source's) is marked untrained (models.tiny.make_tiny).
    """
    path = resolve_source(spec)
    predictor = _load_from(spec, path, backend or spec.backend, device or spec.device, dtype)
    folders = [path]
    if is_export(path):
        folders.append(Path(Manifest.read(path).source))
    predictor.random_weights = any(has_random_weights(folder) for folder in folders)
    return predictor


def _load_from(spec: ModelSpec, path: Path, chosen: str, device: str, dtype: str | None) -> DensePredictor:
    if is_export(path):
        return _load_export(spec, path, Manifest.read(path), chosen, device)
    cfg = CheckpointConfig.read(path)
    ident = identify(spec, cfg)
    if chosen == "simulated":
        from models.runtime.simulated_runtime import SimulatedRuntime

        simulated = SimulatedRuntime(ident.output_kind, ident.family == "lotus-g", spec.simulated_batch_ms)
        return DensePredictor(simulated, spec.id, ident.family, ident.processing_res, spec.seed)
    if ident.family == "marigold":
        if chosen not in ("auto", "torch"):
            raise ModelLoadError(
                f"model '{spec.id}': the marigold family runs on the torch backend only (its step loop batches "
                f"jobs at different steps, which the exported single-step graphs cannot); got backend {chosen}"
            )
        return _load_marigold(spec, path, cfg, ident, device, dtype)
    if chosen in ("auto", "torch"):
        dev = pick_device(device)
        dt = pick_dtype(dtype or spec.dtype, dev)
        try:
            core = build_core(path, cfg, ident, dev, dt)
        except Exception as exc:  # corrupt weights raise library-specific types; name the model either way
            raise ModelLoadError(f"model '{spec.id}': cannot load {path}: {type(exc).__name__}: {exc}") from exc
        log.info("loaded %s (%s, %s -> %s) on %s %s", spec.id, ident.family, ident.task, ident.output_kind, dev, dt)
        runtime = TorchRuntime(core, compile=spec.compile)
        return DensePredictor(runtime, spec.id, ident.family, ident.processing_res, spec.seed, spec.minmax_normalize)
    if chosen == "triton":
        raise ModelLoadError(
            f"model '{spec.id}': backend triton serves a Triton repository; run `dense-serve export --format triton`, "
            "load it into a Triton server, and set source to the repository folder and triton_url to the server"
        )
    folder = cached_export(spec, path, chosen, _export_dtype(dtype or spec.dtype, device))
    return _load_export(spec, folder, Manifest.read(folder), chosen, device)


def _load_marigold(
    spec: ModelSpec, path: Path, cfg: CheckpointConfig, ident: ModelIdentity, device: str, dtype: str | None
) -> DensePredictor:
    from models.multistep import MultiStepPredictor
    from models.predictors.marigold import MarigoldCore

    dev = pick_device(device)
    dt = pick_dtype(dtype or spec.dtype, dev)
    try:
        unet, vae = load_unet_vae(path, dt)
        core = MarigoldCore(
            unet,
            vae,
            empty_prompt_embedding(path).to(dt),
            ident.output_kind,
            cfg.scheduler,
            use_full_z_range=bool(cfg.model_index.get("use_full_z_range", True)),
        )
    except Exception as exc:  # corrupt weights raise library-specific types; name the model either way
        raise ModelLoadError(f"model '{spec.id}': cannot load {path}: {type(exc).__name__}: {exc}") from exc
    core = core.to(dev).eval()
    log.info(
        "loaded %s (marigold %s, %s, %d steps by default) on %s %s",
        spec.id,
        ident.task,
        core.scheduler_name,
        ident.default_steps,
        dev,
        dt,
    )
    return MultiStepPredictor(
        core,
        spec.id,
        ident.processing_res,
        ident.default_steps,
        default_seed=spec.seed,
        auto_max_steps=spec.auto_max_steps,
        scale_invariant=bool(cfg.model_index.get("scale_invariant", True)),
        shift_invariant=bool(cfg.model_index.get("shift_invariant", True)),
    )


def _export_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "fp16" if device != "cpu" and torch.cuda.is_available() else "fp32"


def cached_export(spec: ModelSpec, path: Path, backend: str, dtype: str) -> Path:
    """The export of a checkpoint for a backend, from the engine cache or made now (atomically, so workers
    starting together never see half an export)."""
    fmt = "tensorrt" if backend == "tensorrt" else "onnx"
    cache = Path(spec.engine_cache or DEFAULT_ENGINE_CACHE)
    model_hash = checkpoint_hash(path)
    folder = cache / f"{spec.id}-{model_hash[:16]}" / f"{fmt}-{dtype}"
    if is_export(folder):
        manifest = Manifest.read(folder)
        wanted = spec.export_resolutions or manifest.resolutions
        if manifest.verification and manifest.verification.passed is not False and manifest.resolutions == wanted:
            return folder
    log.info("exporting %s to %s %s in %s (first start with this checkpoint)", spec.id, fmt, dtype, folder)
    export_model(
        spec,
        fmt,  # type: ignore[arg-type]
        folder,
        dtype=dtype,  # type: ignore[arg-type]
        max_batch=max(spec.max_batch_size or 8, 8),
        resolutions=spec.export_resolutions,
        device=spec.device,
        model_hash=model_hash,
    )
    return folder


def _load_export(spec: ModelSpec, folder: Path, manifest: Manifest, backend: str, device: str) -> DensePredictor:
    if backend == "auto":
        backend = {"tensorrt": "tensorrt", "triton": "triton"}.get(manifest.format, "onnxruntime")
    runtime: Runtime
    if backend == "torch":
        raise ModelLoadError(
            f"model '{spec.id}': {folder} is an export ({manifest.format}); torch serves the diffusers checkpoint "
            f"({manifest.source}); pick backend onnxruntime, tensorrt or triton for an export"
        )
    if backend == "triton":
        from models.runtime.triton_runtime import TritonRuntime

        if not spec.triton_url:
            raise ModelLoadError(f"model '{spec.id}': backend triton needs triton_url (the server's gRPC host:port)")
        runtime = TritonRuntime(spec.triton_url, manifest)
    elif backend == "tensorrt":
        from models.runtime.tensorrt_runtime import TensorRTRuntime

        runtime = TensorRTRuntime(folder, manifest, device)
    else:
        from models.runtime.onnxruntime_runtime import OnnxRuntime

        runtime = OnnxRuntime(folder, manifest, device)
    log.info("loaded %s from export %s on %s %s", spec.id, folder, backend, runtime.device)
    return DensePredictor(
        runtime,
        spec.id,
        manifest.family,
        spec.processing_res if spec.processing_res is not None else manifest.processing_res,
        spec.seed,
        spec.minmax_normalize or manifest.minmax_normalize,
    )
