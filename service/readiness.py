"""Readiness, decided once for both front-ends: queue reachable, every expected model served and warm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from service.frontend import waiting_models
from service.queue.base import Broker

if TYPE_CHECKING:
    from service.worker.worker import Worker


async def readiness(
    broker: Broker, worker: Worker | None, expected: Sequence[str], scale_from_zero: bool = False
) -> dict[str, object]:
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
    body: dict[str, object] = {"ready": ready, "queue": queue_ok, "models": models}
    if worker is not None:
        body["worker"] = worker.state
        body["ready"] = ready and worker.ready
        if worker.error:
            body["error"] = worker.error
    return body
