"""The models a worker serves: loaded from specs, warmed up, described for the front-ends."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.errors import ModelLoadError
from models.inference import BatchItem, DensePredictor
from models.loading import DEFAULT_ENGINE_CACHE, load_model, resolve_source
from models.probes.artifact import ProbeManifest
from models.probes.declaration import ProbeDeclaration
from models.probes.depth_probe import DepthProbe
from models.probes.segmenter import Probe
from models.spec import ModelSpec
from service.jobs import ModelInfo

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    spec: ModelSpec
    predictor: DensePredictor
    info: ModelInfo
    load_s: float
    warmup_s: float = 0.0
    probes: dict[str, Probe | DepthProbe] = field(default_factory=dict)  # by model id (a depth probe: per head)


def describe(spec: ModelSpec, predictor: DensePredictor, max_batch: int, max_delay_ms: float) -> ModelInfo:
    runtime = predictor.runtime.describe()
    return ModelInfo(
        id=predictor.model_id,
        family=predictor.family,
        task=predictor.task,
        output_kind=predictor.output_kind,
        generative=predictor.generative,
        processing_res=predictor.processing_res,
        backend=runtime.backend,
        device=runtime.device,
        dtype=runtime.dtype,
        max_batch_size=spec.max_batch_size or max_batch,
        max_queue_delay_ms=spec.max_queue_delay_ms if spec.max_queue_delay_ms is not None else max_delay_ms,
        multi_step=predictor.multi_step,
        default_steps=predictor.default_steps,
        normals_convention=predictor.normals_axes.words if predictor.output_kind == "normals" else None,
        random_weights=predictor.random_weights,
    )


def load_served(spec: ModelSpec, max_batch: int, max_delay_ms: float, warmup: bool) -> ServedModel:
    """Blocking: load one model and optionally run one batch so the first request pays no start-up cost."""
    start = time.perf_counter()
    predictor = load_model(spec)
    served = ServedModel(
        spec, predictor, describe(spec, predictor, max_batch, max_delay_ms), load_s=time.perf_counter() - start
    )
    if warmup:
        start = time.perf_counter()
        image = np.full((64, 64, 3), 0.5, dtype=np.float32)
        predictor.predict_batch([BatchItem(image, predictor.plan(image), predictor.resolve_seed(None))])
        served.warmup_s = time.perf_counter() - start
    log.info("model %s ready: load %.2fs, warm-up %.2fs", spec.id, served.load_s, served.warmup_s)
    return served


def attach_probes(served: dict[str, ServedModel], folders: list[str]) -> list[ModelInfo]:
    """Blocking: load each probe onto the served model it was trained on (hash-checked); their catalog entries."""
    infos = []
    for folder in folders:
        manifest = ProbeManifest.read(Path(folder))
        base = served.get(manifest.base_model)
        if base is None:
            raise ModelLoadError(
                f"probe '{manifest.id}' ({folder}) runs on model '{manifest.base_model}', which is not served here; "
                f"serve it too (served: {', '.join(served) or 'none'})"
            )
        entries = base.info.probe_entries(ProbeDeclaration.model_validate(manifest.model_dump()))
        for entry in entries:
            if entry.id in served or any(entry.id in s.probes for s in served.values()):
                raise ModelLoadError(f"probe '{entry.id}' ({folder}): another model or probe has that id")
        cache = Path(base.spec.engine_cache or DEFAULT_ENGINE_CACHE)  # an ONNX Runtime base's probe graphs
        source = resolve_source(base.spec)
        probes: list[Probe | DepthProbe] = (
            list(DepthProbe.attach(Path(folder), base.predictor, source, cache))
            if manifest.task == "depth"
            else [Probe.attach(Path(folder), base.predictor, source, cache)]
        )
        for probe, entry in zip(probes, entries, strict=True):
            assert probe.id == entry.id  # both follow ProbeDeclaration.served_ids
            base.probes[probe.id] = probe
            infos.append(entry)
            log.info("%s probe %s attached to %s", manifest.task, probe.id, base.info.id)
    return infos
