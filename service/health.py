"""The small HTTP side of processes without the REST API (workers, the standalone gRPC front-end):
`/metrics` for Prometheus and `/healthz`, `/readyz` for probes (Kubernetes, Docker HEALTHCHECK)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import metrics

#: A probe answers (ok, body): 200 when ok, 503 otherwise.
Probe = Callable[[], Awaitable[tuple[bool, BaseModel]]]


def metrics_response() -> Response:
    """This process's metrics in the Prometheus text format (the API's `/metrics` and the probes' one)."""
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


def probe_app(healthz: Probe, readyz: Probe) -> Starlette:
    async def metrics_endpoint(_: Request) -> Response:
        return metrics_response()

    def answer(probe: Probe) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def endpoint(_: Request) -> JSONResponse:
            ok, body = await probe()
            return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=200 if ok else 503)

        return endpoint

    return Starlette(
        routes=[
            Route("/metrics", metrics_endpoint),
            Route("/healthz", answer(healthz)),
            Route("/readyz", answer(readyz)),
        ]
    )


@contextlib.asynccontextmanager
async def serving(app: Starlette, host: str, port: int) -> AsyncIterator[uvicorn.Server]:
    """Serve `app` for the duration of the block; the process keeps its own signal handling."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(), name="dense-probes-http")
    try:
        yield server
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
