"""The FastAPI application: routers, problem handlers, edge middleware, and the broker/worker lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI

from service.api import problems
from service.api.auth import check_api_key
from service.api.middleware import BodyLimitMiddleware, MetricsMiddleware, RequestIdMiddleware, add_compression
from service.api.routes_docs import docs_router
from service.api.routes_meta import health_router, models_router
from service.api.routes_page import page_router
from service.api.routes_predict import predict_router
from service.config import Settings
from service.frontend import declare_models
from service.jobs import ModelInfo
from service.keys import ApiKeys, checks_keys
from service.queue.base import Broker
from service.request import Limits

if TYPE_CHECKING:  # the embedded worker is optional and lives on the torch side
    from service.grpc.server import GrpcFrontend
    from service.worker.worker import Worker

DESCRIPTION = """Depth, normals and their uncertainty from single-step diffusion predictors (Lotus, E2E-FT).

Send an image as a multipart `image` file, a raw image body, or JSON with base64 `image`. Results come back
as a 16-bit PNG by default, or NPY / JSON / a colour preview by `Accept` or `format`. Errors are RFC 9457
`application/problem+json`."""


def create_app(
    settings: Settings,
    broker: Broker,
    worker: Worker | None = None,
    expected_models: Sequence[str] = (),
    grpc: GrpcFrontend | None = None,
    declared: Sequence[ModelInfo] = (),
) -> FastAPI:
    """`worker` runs in this process (embedded mode); `expected_models` are the ids readiness waits for;
    `grpc` is a gRPC front-end served beside REST on the same queue; `declared` are the configured models
    (from their specs) whose jobs are accepted before any worker announced them (scale from zero)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broker.start()
        declaring = asyncio.create_task(declare_models(broker, list(declared)), name="dense-declare")
        if worker is not None:
            await worker.start()
        if grpc is not None:
            await grpc.start(broker, worker, expected_models)
        try:
            yield
        finally:
            declaring.cancel()
            if grpc is not None:
                await grpc.stop()
            if worker is not None:
                await worker.stop()
            await broker.close()

    app = FastAPI(  # /docs and /redoc come from routes_docs: their assets served here, not from a CDN
        title="dense-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.settings = settings
    app.state.broker = broker
    app.state.worker = worker
    app.state.expected_models = list(expected_models)
    app.state.grpc = grpc
    app.state.limits = Limits.of(settings)
    problems.install(app)
    app.state.api_keys = ApiKeys.of(settings)
    auth = [Depends(check_api_key)] if checks_keys(settings, app.state.api_keys) else []
    app.include_router(predict_router(app.state.limits), dependencies=auth)
    app.include_router(models_router, dependencies=auth)
    app.include_router(health_router, dependencies=[] if settings.auth_exempt_health else auth)
    app.include_router(docs_router(app))  # open, like FastAPI's own /docs and /openapi.json
    if settings.web_page:  # static files that ask for a key themselves: open like /docs unless configured not to
        app.include_router(page_router(), dependencies=[] if settings.auth_exempt_web_page else auth)
    app.add_middleware(BodyLimitMiddleware, max_image_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestIdMiddleware)
    if settings.http_compression:
        add_compression(app)
    if settings.metrics_enabled:
        app.add_middleware(MetricsMiddleware)  # outermost: measures everything, 413s and 500s included

    return app
