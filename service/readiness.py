"""Readiness, decided once for both front-ends: queue reachable, every expected model served and warm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from service.frontend import waiting_models
from service.queue.base import Broker

#: A worker's life: the same words in `/readyz`, `/healthz` and the worker itself.
WorkerState = Literal["idle", "loading", "ready", "failed", "stopping", "stopped"]


class WorkerStatus(Protocol):
    """What readiness reads of an embedded worker (`service.worker.worker.Worker` has it): a protocol, so this
    module, which both front-ends import, never names the worker (which imports this module for `WorkerState`)."""

    @property
    def ready(self) -> bool: ...

    @property
    def state(self) -> WorkerState: ...

    @property
    def error(self) -> str | None: ...


class Liveness(BaseModel):
    """`/healthz`: the process answers (`ok` for front-ends; a worker says its state)."""

    status: Literal["ok"] | WorkerState = "ok"
    error: str | None = None


class Readiness(BaseModel):
    """`/readyz` of a front-end (200 when `ready`, 503 otherwise)."""

    ready: bool = Field(description="queue reachable and every expected model served (and warm)")
    queue: bool = Field(description="the queue answers")
    models: dict[str, bool] = Field(description="each expected model (or each served one): served right now")
    worker: WorkerState | None = Field(default=None, description="the embedded worker's state (`serve` only)")
    error: str | None = Field(default=None, description="why the embedded worker failed")


class WorkerReadiness(BaseModel):
    """`/readyz` of a worker process: its models loaded and warmed up."""

    ready: bool
    state: WorkerState
    models: list[str]


async def readiness(
    broker: Broker, worker: WorkerStatus | None, expected: Sequence[str], scale_from_zero: bool = False
) -> Readiness:
    """With `scale_from_zero`, a model whose workers are scaled down counts: its jobs wait for one."""
    queue_ok = await broker.reachable()
    served: set[str] = set()
    if queue_ok:
        try:
            served = {m.id for m in await broker.catalog()}
            if scale_from_zero:
                served |= {m.id for m in await waiting_models(broker, expected)}
        except Exception:  # the queue went away between the two calls
            queue_ok = False
    models = {model: model in served for model in expected} if expected else {m: True for m in served}
    ready = queue_ok and bool(models) and all(models.values())
    if worker is None:
        return Readiness(ready=ready, queue=queue_ok, models=models)
    return Readiness(
        ready=ready and worker.ready, queue=queue_ok, models=models, worker=worker.state, error=worker.error
    )
