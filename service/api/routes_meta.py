"""`GET /v1/models`, `/healthz` (alive), `/readyz` (models loaded and warmed up, queue reachable) and
`/metrics` (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.schemas import ModelsOut
from service.health import metrics_response
from service.readiness import Liveness, Readiness, readiness

models_router = APIRouter(prefix="/v1", tags=["models"])
health_router = APIRouter(tags=["health"])


@models_router.get("/models", response_model=ModelsOut, summary="Models served right now")
async def list_models(request: Request) -> ModelsOut:
    catalog = await request.app.state.broker.catalog()
    return ModelsOut(models=catalog)


@health_router.get("/healthz", summary="Liveness: the process answers", response_model_exclude_none=True)
async def healthz() -> Liveness:
    return Liveness()


@health_router.get(
    "/readyz",
    summary="Readiness: every model loaded and warmed up, queue reachable",
    response_model_exclude_none=True,
    responses={503: {"model": Readiness, "description": "not ready (yet): the body says what is missing"}},
)
async def readyz(request: Request, response: Response) -> Readiness:
    state = request.app.state
    body = await readiness(state.broker, state.worker, state.expected_models, state.settings.scale_from_zero)
    response.status_code = 200 if body.ready else 503
    return body


@health_router.get("/metrics", summary="Prometheus metrics of this process", response_class=Response)
async def prometheus_metrics() -> Response:
    return metrics_response()
