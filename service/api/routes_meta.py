"""`GET /v1/models`, `/healthz` (alive) and `/readyz` (models loaded and warmed up, queue reachable)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.schemas import ModelOut, ModelsOut

models_router = APIRouter(prefix="/v1", tags=["models"])
health_router = APIRouter(tags=["health"])


@models_router.get("/models", response_model=ModelsOut, summary="Models served right now")
async def list_models(request: Request) -> ModelsOut:
    catalog = await request.app.state.broker.catalog()
    return ModelsOut(models=[ModelOut(**m.model_dump()) for m in catalog])


@health_router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health_router.get("/readyz", summary="Readiness: every model loaded and warmed up, queue reachable")
async def readyz(request: Request) -> JSONResponse:
    broker = request.app.state.broker
    worker = request.app.state.worker
    queue_ok = await broker.reachable()
    served = {m.id for m in await broker.catalog()} if queue_ok else set()
    expected: list[str] = request.app.state.expected_models
    models = {model: model in served for model in expected} if expected else {m: True for m in served}
    ready = queue_ok and bool(models) and all(models.values())
    body: dict[str, object] = {"ready": ready, "queue": queue_ok, "models": models}
    if worker is not None:
        body["worker"] = worker.state
        ready = ready and worker.ready
        body["ready"] = ready
        if worker.error:
            body["error"] = worker.error
    return JSONResponse(body, status_code=200 if ready else 503)
