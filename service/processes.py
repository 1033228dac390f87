"""Wiring of the four process shapes: all-in-one (`serve`), REST only (`api`), gRPC only (`grpc`) and worker
only (`worker`), on the in-process queue (embedded default) or Redis Streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from pydantic import ValidationError

from models.detect import CheckpointConfig, identify
from models.errors import SpecError
from models.probes.declaration import ProbeDeclaration
from models.source import resolve_source
from models.spec import ModelSpec, resolve_spec
from service.api.app import create_app
from service.config import Settings
from service.defaults import DefaultModel, build_tiny, default_models, describe
from service.frontend import declare_models, declared_info, declared_probe_infos
from service.jobs import ModelInfo
from service.queue.base import Broker
from service.queue.memory import MemoryBroker
from service.queue.redis.connection import ConnectionOptions
from service.readiness import Liveness, Readiness, readiness

if TYPE_CHECKING:
    from service.grpc.server import GrpcFrontend
    from service.worker.worker import Worker

log = logging.getLogger(__name__)


def default_banner(defaults: list[DefaultModel], tiny_dir: Path) -> str:
    """What a server started without models says about them, right after where it listens: which are
    trained and which are random weights (their maps are noise)."""
    random = [m.spec.id for m in defaults if not m.trained]
    lines = ["No model configured: serving the shipped defaults (dense-serve models lists them):"]
    lines += [f"  {row}" for row in describe(defaults).splitlines()]
    if random:
        lines.append(f"  {', '.join(random)}: TINY RANDOM-WEIGHT checkpoints built in {tiny_dir}")
    lines.append("Serve a real model with --model (shipped id, hub id, diffusers folder, spec .toml) or DENSE_MODELS.")
    return "\n".join(lines)


def default_specs(tiny_dir: Path) -> tuple[list[ModelSpec], list[DefaultModel]]:
    """What is served when nothing is configured (service/defaults.py), random-weight checkpoints built once."""
    defaults = default_models(tiny_dir)
    return [build_tiny(m) for m in defaults], defaults


def served_spec(spec: ModelSpec, settings: Settings) -> ModelSpec:
    """What a served model runs with, by one precedence (the README's configuration section): a setting that
    overrides every model (`device`, `dtype`, `backend`: unset unless given) wins over the spec; the spec's own
    value wins over the server's default (`engine_cache`, `max_batch_size`, `max_queue_delay_ms`), which fills
    only what the spec leaves unset."""
    overrides = {"device": settings.device, "dtype": settings.dtype, "backend": settings.backend}
    defaults = {
        "engine_cache": str(settings.engine_cache),
        "max_batch_size": settings.max_batch_size,
        "max_queue_delay_ms": settings.max_queue_delay_ms,
    }
    update = {k: v for k, v in defaults.items() if getattr(spec, k) is None}
    update |= {k: v for k, v in overrides.items() if v is not None}
    try:
        return ModelSpec(**{**spec.model_dump(), **update})
    except ValidationError as exc:
        raise SpecError(f"invalid setting for model '{spec.id}': {exc}") from exc


def serving_specs(settings: Settings) -> tuple[list[ModelSpec], list[DefaultModel]]:
    """The specs to serve, each merged with the settings (`served_spec`), or the default ones; the defaults' list
    (empty when models are configured) says which are trained and which random."""
    if not settings.models:
        specs, defaults = default_specs(settings.tiny_dir)
        return [served_spec(s, settings) for s in specs], defaults
    specs = [served_spec(resolve_spec(arg), settings) for arg in settings.models]
    ids = [s.id for s in specs]
    if len(set(ids)) != len(ids):
        raise SpecError(f"two served models share an id: {ids}; give each spec a distinct id")
    return specs, []


def preflight_probes(folders: list[str], specs: list[ModelSpec]) -> None:
    """Every probe readable and its base model among the served ones (the hash is checked at load)."""
    from models.probes.artifact import ProbeManifest

    ids = [s.id for s in specs]
    for folder in folders:
        manifest = ProbeManifest.read(Path(folder))
        if manifest.base_model not in ids:
            raise SpecError(
                f"probe '{manifest.id}' ({folder}) runs on model '{manifest.base_model}', which is not served "
                f"(served: {', '.join(ids)}); add --model for it"
            )


def preflight(specs: list[ModelSpec]) -> None:
    """Fail before the server starts on what can be checked cheaply: missing checkpoints, offline hub ids,
    a spec that contradicts its UNet."""
    for spec in specs:
        identify(spec, CheckpointConfig.read(resolve_source(spec)))


def preflight_queue(settings: Settings) -> None:
    """Fail before serving on a Redis that cannot be used as configured (a wrong or missing password, a server
    too old): a RedisSetupError with a message to act on. A Redis that is down is no reason not to start."""
    if settings.queue != "redis":
        return
    from service.errors import Unavailable
    from service.queue.redis import check_server

    async def check() -> None:
        options = redis_options(settings)
        client = options.client()
        try:
            await check_server(client, options.where, options.has_password)
        except Unavailable as exc:
            log.warning("%s; starting anyway", exc.detail)
        finally:
            await client.aclose()

    asyncio.run(check())


def redis_options(settings: Settings) -> ConnectionOptions:
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    return ConnectionOptions(settings.redis_url, password, settings.redis_tls_ca_file)


def make_broker(settings: Settings) -> Broker:
    if settings.queue == "redis":
        from service.queue.redis import RedisBroker

        return RedisBroker(
            settings.redis_url,
            settings.redis_prefix,
            password=settings.redis_password.get_secret_value() if settings.redis_password else None,
            tls_ca_file=settings.redis_tls_ca_file,
            max_depth=settings.queue_max_jobs,
            stream_maxlen=settings.stream_maxlen,
            result_ttl_s=settings.result_ttl_s,
            answer_grace_s=settings.answer_grace_s,
            answer_store_bytes=settings.answer_store_bytes,
            min_idle_ms=settings.min_idle_ms,
            max_deliveries=settings.max_deliveries,
            heartbeat_s=settings.heartbeat_s,
            consumer=settings.worker_name,
        )
    return MemoryBroker(
        settings.queue_max_jobs, settings.result_ttl_s, settings.answer_grace_s, settings.answer_store_bytes
    )


def new_worker(broker: Broker, specs: list[ModelSpec], settings: Settings) -> Worker:
    """Imported here, not above: the worker brings torch, and the `api` and `grpc` processes must not."""
    from service.worker.worker import Worker

    return Worker(broker, specs, settings)


def build_app(
    settings: Settings, specs: list[ModelSpec], with_worker: bool = True, grpc: GrpcFrontend | None = None
) -> FastAPI:
    """The API; with `with_worker` the worker runs in the same process (`serve`), else only the API (`api`).
    `specs` are the models readiness waits for. gRPC runs beside REST when `grpc_enabled`: `grpc` when given
    (the CLI binds its port before saying where it listens), else one made here."""
    from service.grpc.server import GrpcFrontend

    broker = make_broker(settings)
    worker = new_worker(broker, specs, settings) if with_worker else None
    if grpc is None and settings.grpc_enabled:
        grpc = GrpcFrontend(settings)
    expected = [s.id for s in specs]
    declared: list[ModelInfo] = []
    if not with_worker:
        declared = declared_infos(specs, settings)
        expected += frontend_probe_ids(settings, specs)
    return create_app(settings, broker, worker, expected, grpc, declared)


def frontend_specs(models: list[str]) -> list[ModelSpec]:
    """What `api` and `grpc --model` name: a spec file, a shipped id or what `worker --model` takes (the front-
    end reads no checkpoint: a folder or hub id gives only the id), or a plain model id."""
    from models.spec import HUB_ID, ModelSpec, resolve_spec

    specs = []
    for arg in models:
        try:
            specs.append(resolve_spec(arg))
        except SpecError:
            if "/" in arg and not HUB_ID.match(arg):
                raise
            try:
                specs.append(ModelSpec(id=arg, source=arg))
            except ValueError as exc:
                raise SpecError(
                    f"--model {arg!r}: give a model id (letters, digits, '.', '_', '-'), a spec .toml file, a "
                    "diffusers folder or a hub id"
                ) from exc
    return specs


def frontend_probes(folders: list[str], specs: list[ModelSpec]) -> list[ProbeDeclaration]:
    """What `api`/`grpc --probe DIR` declare: each folder's `probe.toml` read without torch (the hash is the
    worker's check); a base model that this front-end's `--model` list leaves out is refused, as `serve` does."""
    ids = [s.id for s in specs]
    probes = []
    for folder in folders:
        probe = ProbeDeclaration.read(Path(folder))
        if ids and probe.base_model not in ids:
            raise SpecError(
                f"probe '{probe.id}' ({folder}) runs on model '{probe.base_model}', which this front-end does not "
                f"name (--model: {', '.join(ids)}); add --model {probe.base_model}"
            )
        probes.append(probe)
    return probes


def frontend_probe_ids(settings: Settings, specs: list[ModelSpec]) -> list[str]:
    """Probe ids readiness waits for beside the models: only when the front-end names its models (with no
    list, it is ready once any worker serves, and takes jobs for any known model and probe)."""
    return [i for p in frontend_probes(settings.probes, specs) for i in p.served_ids()] if specs else []


def declared_infos(specs: list[ModelSpec], settings: Settings) -> list[ModelInfo]:
    """The configured models and probes a front-end declares to the broker (scale from zero)."""
    limits = (settings.max_batch_size, settings.max_queue_delay_ms)
    models = {s.id: declared_info(s, *limits) for s in specs}
    probes = [
        info
        for p in frontend_probes(settings.probes, specs)
        for info in declared_probe_infos(p, models.get(p.base_model), *limits)
    ]
    return [*models.values(), *probes]


async def run_grpc(settings: Settings, specs: list[ModelSpec], announce: Callable[[str], None] | None = None) -> int:
    """`dense-serve grpc`: the gRPC front-end alone, on the Redis queue, until SIGTERM/SIGINT. Its port is
    bound first (PortTaken if held), then `announce` is told the bound address."""
    from service.grpc.server import GrpcFrontend

    frontend = GrpcFrontend(settings)
    frontend.bind()
    if announce is not None:
        announce(frontend.bound_address)
    broker = make_broker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await broker.start()
    expected = [s.id for s in specs] + frontend_probe_ids(settings, specs)
    declaring = asyncio.create_task(declare_models(broker, declared_infos(specs, settings)))
    await frontend.start(broker, None, expected)
    async with contextlib.AsyncExitStack() as stack:
        if settings.metrics_port is not None:
            from service.health import probe_app, serving

            async def healthz() -> tuple[bool, Liveness]:
                return True, Liveness()

            async def readyz() -> tuple[bool, Readiness]:
                body = await readiness(broker, None, expected, settings.scale_from_zero)
                return body.ready, body

            await stack.enter_async_context(serving(probe_app(healthz, readyz), settings.host, settings.metrics_port))
        try:
            await stop.wait()
        finally:
            declaring.cancel()
            await frontend.stop()
            await broker.close()
    return 0


async def run_worker(settings: Settings, specs: list[ModelSpec]) -> int:
    """A worker process: serve `specs` from the queue until SIGTERM/SIGINT, then drain and exit."""
    broker = make_broker(settings)
    worker = new_worker(broker, specs, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await broker.start()
    await worker.start()
    async with contextlib.AsyncExitStack() as stack:
        if settings.metrics_port is not None:
            from service.health import serving
            from service.worker.http import worker_app

            await stack.enter_async_context(serving(worker_app(worker), settings.host, settings.metrics_port))
            log.info("worker metrics and probes on http://%s:%d/metrics", settings.host, settings.metrics_port)
        try:
            while not stop.is_set() and worker.state not in ("failed", "stopped"):
                await asyncio.wait([asyncio.create_task(stop.wait())], timeout=0.5)
        finally:
            log.info("worker %s: draining", settings.worker_name or "")
            await worker.stop()
            await broker.close()
    if worker.error:
        log.error("worker failed: %s", worker.error)
        return 1
    return 0
