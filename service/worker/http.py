"""A worker process's small HTTP side: `/metrics` for Prometheus, `/healthz` and `/readyz` for probes
(startup, liveness, readiness in Kubernetes; HEALTHCHECK in Docker)."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import metrics
from service.worker.worker import Worker


def worker_app(worker: Worker) -> Starlette:
    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> JSONResponse:
        alive = worker.state not in ("failed", "stopped")
        return JSONResponse({"status": worker.state, "error": worker.error}, status_code=200 if alive else 503)

    async def readyz(_: Request) -> JSONResponse:
        body = {"ready": worker.ready, "state": worker.state, "models": sorted(worker.served)}
        return JSONResponse(body, status_code=200 if worker.ready else 503)

    return Starlette(routes=[Route("/metrics", metrics_endpoint), Route("/healthz", healthz), Route("/readyz", readyz)])


@contextlib.asynccontextmanager
async def serving(worker: Worker, host: str, port: int):
    """Serve the worker's HTTP side for the duration of the block."""
    server = uvicorn.Server(uvicorn.Config(worker_app(worker), host=host, port=port, log_level="warning"))
    server.install_signal_handlers = lambda: None  # the worker owns SIGTERM (graceful drain)
    task = asyncio.create_task(server.serve(), name="dense-worker-http")
    try:
        yield server
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
