"""A worker process's probes: alive unless its models failed to load; ready once they are loaded and warm."""

from __future__ import annotations

from starlette.applications import Starlette

from service.health import probe_app
from service.readiness import Liveness, WorkerReadiness
from service.worker.worker import Worker


def worker_app(worker: Worker) -> Starlette:
    async def healthz() -> tuple[bool, Liveness]:
        return worker.state not in ("failed", "stopped"), Liveness(status=worker.state, error=worker.error)

    async def readyz() -> tuple[bool, WorkerReadiness]:
        return worker.ready, WorkerReadiness(ready=worker.ready, state=worker.state, models=sorted(worker.served))

    return probe_app(healthz, readyz)
