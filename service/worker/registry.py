"""The models a worker serves: loaded from specs, warmed up, described for the front-ends."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from models.inference import BatchItem, DensePredictor
from models.loading import load_model
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
