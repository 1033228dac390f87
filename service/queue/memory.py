"""In-process broker: the embedded default. One bounded asyncio queue per model, futures for replies."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from service import metrics
from service.errors import DeadlineExceeded, InvalidParameter, QueueFull, Unavailable
from service.jobs import Job, ModelInfo, Reply
from service.queue.base import Broker, Delivery, DrainRate, answer_bytes, fingerprint


@dataclass
class _MemoryDelivery(Delivery):
    future: asyncio.Future[Reply] | None = None

    def abandoned(self) -> bool:
        return self.future is not None and self.future.done()


@dataclass
class _Kept:
    """An Idempotency-Key's submission: its future (the reply, once answered), until when it is kept, and the
    bytes its reply counts against the budget (0 while in flight)."""

    fingerprint: str
    future: asyncio.Future[Reply]
    expires: float
    size: int = 0


class MemoryBroker(Broker):
    def __init__(
        self,
        max_jobs_per_model: int = 256,
        result_ttl_s: float = 60.0,
        answer_grace_s: float = 5.0,
        answer_store_bytes: int = 64 * 2**20,
    ) -> None:
        self.max_jobs_per_model = max_jobs_per_model
        self.result_ttl_s = result_ttl_s
        self.answer_grace_s = answer_grace_s
        self.answer_store_bytes = answer_store_bytes
        self._idempotent: dict[str, _Kept] = {}
        self.kept_bytes = 0
        self._queues: dict[str, asyncio.Queue[tuple[Job, asyncio.Future[Reply]]]] = {}
        self._models: dict[str, ModelInfo] = {}
        self._rates: dict[str, DrainRate] = {}
        self._abandoned: dict[str, int] = {}  # queued entries whose submitter gave up (deadline, disconnect)
        self._closed = False

    def _queue(self, model: str) -> asyncio.Queue[tuple[Job, asyncio.Future[Reply]]]:
        if model not in self._queues:
            self._queues[model] = asyncio.Queue()
            self._rates[model] = DrainRate()
        return self._queues[model]

    async def close(self) -> None:
        self._closed = True
        for queue in self._queues.values():
            while not queue.empty():
                _, fut = queue.get_nowait()
                if not fut.done():
                    fut.set_exception(Unavailable("the service is shutting down"))

    async def submit(self, job: Job, idempotency_key: str | None = None) -> Reply:
        if self._closed:
            raise Unavailable("the service is shutting down")
        if idempotency_key is not None:
            return await self._submit_idempotent(job, idempotency_key)
        self._admit(job)
        return await self._enqueue(job, asyncio.get_running_loop().create_future())

    async def _submit_idempotent(self, job: Job, key: str) -> Reply:
        now = time.time()
        self._forget_expired(now)
        seen = self._idempotent.get(key)
        if seen is not None:
            if seen.fingerprint != fingerprint(job):
                raise InvalidParameter(
                    "Idempotency-Key was already used for a different request", field="Idempotency-Key"
                )
            if not seen.future.cancelled():  # a first attempt that timed out is forgotten: compute afresh
                try:
                    reply = await asyncio.wait_for(asyncio.shield(seen.future), timeout=max(0.0, job.deadline - now))
                except TimeoutError:
                    raise DeadlineExceeded(f"no answer within the deadline for job {job.id}") from None
                self._delivered(key, seen.future)
                return reply
        self._admit(job)  # a refused job claims no key, so its retry is not left waiting for nothing
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._idempotent[key] = _Kept(fingerprint(job), future, now + self.result_ttl_s)
        future.add_done_callback(lambda f: self._answered(key, f, job.model))
        reply = await self._enqueue(job, future, idempotent=True)
        self._delivered(key, future)
        return reply

    def _answered(self, key: str, future: asyncio.Future[Reply], model: str) -> None:
        """The reply is in: keep it within the byte budget, or forget the key (a retry computes again)."""
        kept = self._idempotent.get(key)
        if kept is None or kept.future is not future:
            return
        if future.cancelled() or future.exception() is not None:
            del self._idempotent[key]
            return
        self._forget_expired(time.time())
        size = answer_bytes(future.result())
        if self.kept_bytes + size > self.answer_store_bytes:
            del self._idempotent[key]
            metrics.ANSWERS_NOT_KEPT.labels(model).inc()
            return
        kept.size = size
        self.kept_bytes += size
        metrics.ANSWERS_KEPT_BYTES.set(self.kept_bytes)

    def _delivered(self, key: str, future: asyncio.Future[Reply]) -> None:
        """The reply reached a waiting client: keep it only the grace a retry after a lost answer needs."""
        kept = self._idempotent.get(key)
        if kept is not None and kept.future is future:
            kept.expires = min(kept.expires, time.time() + self.answer_grace_s)

    def _forget_expired(self, now: float) -> None:
        gone = [k for k, kept in self._idempotent.items() if kept.expires <= now]
        for k in gone:
            self.kept_bytes -= self._idempotent.pop(k).size
        if gone:
            metrics.ANSWERS_KEPT_BYTES.set(self.kept_bytes)

    def _admit(self, job: Job) -> None:
        """Refuse a job past its deadline or beyond the queue's limit, before anything records it."""
        if job.expired():
            raise DeadlineExceeded(f"job {job.id} was already past its deadline when enqueued")
        waiting = self.depth(job.model)
        if waiting >= self.max_jobs_per_model:
            raise QueueFull(
                f"{waiting} jobs already wait for model '{job.model}' (limit {self.max_jobs_per_model})",
                retry_after=self._rates[job.model].retry_after(waiting),
            )

    async def _enqueue(self, job: Job, future: asyncio.Future[Reply], idempotent: bool = False) -> Reply:
        """Queue an admitted job and await its answer."""
        self._queue(job.model).put_nowait((job, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, job.deadline - time.time()))
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within the deadline for job {job.id}") from None
        finally:
            # The client went away or gave up: the job stays queued but no longer counts, and is never computed.
            # With an Idempotency-Key the client retries: the job is kept, and its retry waits for it.
            if not future.done() and not idempotent:
                future.cancel()
                self._abandoned[job.model] = self._abandoned.get(job.model, 0) + 1

    async def catalog(self) -> list[ModelInfo]:
        return list(self._models.values())

    async def reachable(self) -> bool:
        return not self._closed

    async def publish_models(self, infos: list[ModelInfo]) -> None:
        for info in infos:
            self._models[info.id] = info
            self._queue(info.id)

    async def withdraw_models(self, ids: list[str]) -> None:
        for model in ids:
            self._models.pop(model, None)

    async def consume(self, model: str, max_items: int, timeout_s: float) -> list[Delivery]:
        queue = self._queue(model)
        loop = asyncio.get_running_loop()
        end = loop.time() + max(timeout_s, 0.0)
        entries: list[tuple[Job, asyncio.Future[Reply]]] = []
        while not entries:
            if queue.empty():
                remaining = end - loop.time()
                if remaining <= 0:
                    return []
                try:
                    entries.append(await asyncio.wait_for(queue.get(), timeout=remaining))
                except TimeoutError:
                    return []
            while len(entries) < max_items and not queue.empty():
                entries.append(queue.get_nowait())
            entries = self._live(model, entries)
        return [_MemoryDelivery(job=job, future=fut) for job, fut in entries]

    def _live(
        self, model: str, entries: list[tuple[Job, asyncio.Future[Reply]]]
    ) -> list[tuple[Job, asyncio.Future[Reply]]]:
        """Drop entries nobody waits for any more; they were already answered (504, disconnect)."""
        live = []
        for job, fut in entries:
            if fut.cancelled():
                self._abandoned[model] = max(0, self._abandoned.get(model, 0) - 1)
            else:
                live.append((job, fut))
        return live

    async def reply(self, delivery: Delivery, reply: Reply) -> None:
        assert isinstance(delivery, _MemoryDelivery)
        if reply.status in ("ok", "error"):
            self._rates[delivery.job.model].record()
        if delivery.future is not None and not delivery.future.done():
            delivery.future.set_result(reply)

    def depth(self, model: str) -> int:
        queue = self._queues.get(model)
        return max(0, queue.qsize() - self._abandoned.get(model, 0)) if queue else 0
