"""The Broker interface. Front-ends submit jobs and await replies; workers consume, reply and publish
what they serve. Nothing outside `service/queue/` knows which implementation runs."""

from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from service.errors import ServiceError
from service.jobs import Job, ModelInfo, Reply


@dataclass
class Delivery:
    """A job handed to a worker. `attempt` counts deliveries (a crashed worker's job comes back)."""

    job: Job
    attempt: int = 1
    received_at: float = field(default_factory=time.time)

    def abandoned(self) -> bool:
        """True when nobody waits for the answer any more (client gone); the worker skips it."""
        return False


class DrainRate:
    """Jobs finished per second over a sliding window: the basis of `Retry-After` under backpressure."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._done: deque[float] = deque()

    def record(self, n: int = 1, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._done.extend([now] * n)
        self._trim(now)

    def per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        if len(self._done) < 2:
            return 0.0
        span = max(now - self._done[0], 1e-3)
        return len(self._done) / span

    def retry_after(self, backlog: int, floor_s: int = 1, cap_s: int = 60, now: float | None = None) -> int:
        rate = self.per_second(now)
        if rate <= 0:
            return floor_s
        return int(min(cap_s, max(floor_s, math.ceil(backlog / rate))))

    def _trim(self, now: float) -> None:
        while self._done and now - self._done[0] > self.window_s:
            self._done.popleft()


@dataclass(frozen=True)
class QueueStats:
    depth: int
    pending: int | None = None
    lag: int | None = None


def fingerprint(job: Job) -> str:
    """What makes two submissions the same request, for Idempotency-Key checks."""
    digest = hashlib.sha256(job.image)
    digest.update(f"{job.kind}|{job.model}|{job.task}|{job.params.model_dump_json()}".encode())
    return digest.hexdigest()


def answer_bytes(reply: Reply) -> int:
    """What keeping a reply for a retry costs: its outputs (the bulk) and a fixed allowance for the rest."""
    return sum(len(v) for v in reply.outputs.values()) + 1024


class Broker(ABC):
    """Submit/await on the front-end side; consume/reply/publish on the worker side."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect or allocate; called once before use."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; pending submitters get an `Unavailable` error."""

    # ---- front-end side
    @abstractmethod
    async def submit(self, job: Job, idempotency_key: str | None = None) -> Reply:
        """Enqueue and wait for the reply until `job.deadline`.

        With an `idempotency_key` seen before, return that job's kept reply, or wait for it while it is in
        flight, instead of computing again. A reply is kept `answer_grace_s` once delivered to a waiting client,
        `result_ttl_s` when its client left first, and not at all past the `answer_store_bytes` budget (a
        retry then computes again). Raises QueueFull (with
        `retry_after`), DeadlineExceeded, Unavailable, or InvalidParameter (key reused for another request).
        """

    @abstractmethod
    async def catalog(self) -> list[ModelInfo]:
        """Models some worker serves and has warmed up."""

    @abstractmethod
    async def reachable(self) -> bool:
        """Whether the queue itself answers (readiness)."""

    # ---- worker side
    @abstractmethod
    async def publish_models(self, infos: list[ModelInfo]) -> None:
        """Announce loaded and warmed-up models."""

    @abstractmethod
    async def withdraw_models(self, ids: list[str]) -> None:
        """Stop announcing models (worker shutting down)."""

    @abstractmethod
    async def consume(self, model: str, max_items: int, timeout_s: float) -> list[Delivery]:
        """Up to `max_items` jobs for one model; waits at most `timeout_s` for the first one."""

    @abstractmethod
    async def reply(self, delivery: Delivery, reply: Reply) -> None:
        """Deliver the reply and acknowledge the job (in that order)."""

    async def reject(self, delivery: Delivery, error: ServiceError) -> None:
        """The model failed on this job here. Brokers that can retry elsewhere do; the default answers."""
        await self.reply(delivery, Reply(id=delivery.job.id, status="error", error=error.info()))

    async def refresh_abandoned(self, deliveries: list[Delivery]) -> None:  # noqa: B027 - optional hook
        """Learn which of these jobs their clients gave up on since delivery (brokers across processes)."""

    async def computing(self, deliveries: list[Delivery]) -> None:  # noqa: B027 - optional hook
        """A batch of these starts computing: brokers that reclaim idle work know they are not hung."""

    async def declare_models(self, infos: list[ModelInfo]) -> None:  # noqa: B027 - optional hook
        """Models a front-end is configured for (from their specs), before any worker announced them: brokers
        that remember models for scale from zero record them, so jobs for them wait for a worker."""

    async def dormant_models(self) -> list[ModelInfo]:
        """Models served before that have no live worker now (scale-to-zero); none for in-process queues."""
        return []

    @abstractmethod
    def depth(self, model: str) -> int:
        """Jobs waiting for a model (not yet consumed)."""

    async def queue_stats(self, model: str) -> QueueStats:
        """Depth, pending and lag of a model's queue, for the metrics (brokers with more to say override it)."""
        return QueueStats(depth=self.depth(model))
