"""One process serves everything: the API, the in-process queue and the worker (the embedded default)."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI

from models.detect import CheckpointConfig, identify
from models.errors import SpecError
from models.loading import resolve_source
from models.spec import ModelSpec, resolve_spec
from service.api.app import create_app
from service.config import Settings
from service.queue.memory import MemoryBroker
from service.worker.worker import Worker

log = logging.getLogger(__name__)
TINY_MODELS = (("lotus-g", "depth"), ("lotus-g", "normals"))
TINY_BANNER = (
    "\n  *** No model configured: serving TINY RANDOM-WEIGHT checkpoints ({ids}) built in {path}.\n"
    "  *** They exercise the real API, but their maps are noise. Configure a real model with\n"
    "  *** --model (hub id, diffusers folder, spec .toml) or DENSE_MODELS.\n"
)


def tiny_specs(tiny_dir: Path) -> list[ModelSpec]:
    """Build (once) and describe the random-weight checkpoints served when nothing is configured."""
    from models.tiny import make_tiny

    specs = []
    for family, task in TINY_MODELS:
        path = tiny_dir / f"{family}-{task}"
        if not (path / "model_index.json").is_file():
            make_tiny(path, family, task)
        specs.append(
            ModelSpec(
                id=f"tiny-{family}-{task}", source=str(path.resolve()), family=family, task=task, processing_res=128
            )
        )
    return specs


def serving_specs(settings: Settings) -> tuple[list[ModelSpec], bool]:
    """The configured specs with the global device/dtype applied, or the tiny ones; True if tiny."""
    if not settings.models:
        return tiny_specs(settings.tiny_dir), True
    specs = [resolve_spec(arg, device=settings.device, dtype=settings.dtype) for arg in settings.models]
    ids = [s.id for s in specs]
    if len(set(ids)) != len(ids):
        raise SpecError(f"two served models share an id: {ids}; give each spec a distinct id")
    return specs, False


def preflight(specs: list[ModelSpec]) -> None:
    """Fail before the server starts on what can be checked cheaply: missing checkpoints, offline hub ids,
    a spec that contradicts its UNet."""
    for spec in specs:
        identify(spec, CheckpointConfig.read(resolve_source(spec)))


def build_embedded_app(settings: Settings, specs: list[ModelSpec]) -> FastAPI:
    broker = MemoryBroker(settings.queue_max_jobs)
    worker = Worker(broker, specs, settings)
    return create_app(settings, broker, worker, [s.id for s in specs])
