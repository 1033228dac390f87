"""`GET /v1/models`, `/healthz` (alive), `/readyz` (models loaded and warmed up, queue reachable) and
`/metrics` (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.api.schemas import ModelsOut
from service.probes import metrics_response
from service.readiness import readiness

models_router = APIRouter(prefix="/v1", tags=["models"])
health_router = APIRouter(tags=["health"])


@models_router.get("/models", response_model=ModelsOut, summary="Models served right now")
async def list_models(request: Request) -> ModelsOut:
    catalog = await request.app.state.broker.catalog()
    return ModelsOut(models=catalog)


@health_router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health_router.get("/readyz", summary="Readiness: every model loaded and warmed up, queue reachable")
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    body = await readiness(state.broker, state.worker, state.expected_models, state.settings.scale_from_zero)
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@health_router.get("/metrics", summary="Prometheus metrics of this process", response_class=Response)
async def prometheus_metrics() -> Response:
    return metrics_response()
