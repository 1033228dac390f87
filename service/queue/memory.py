"""In-process broker: the embedded default. One bounded asyncio queue per model, futures for replies."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from service.errors import DeadlineExceeded, QueueFull, Unavailable
from service.jobs import Job, ModelInfo, Reply
from service.queue.base import Broker, Delivery, DrainRate


@dataclass
class _MemoryDelivery(Delivery):
    future: asyncio.Future[Reply] | None = None

    def abandoned(self) -> bool:
        return self.future is not None and self.future.done()


class MemoryBroker(Broker):
    def __init__(self, max_jobs_per_model: int = 256) -> None:
        self.max_jobs_per_model = max_jobs_per_model
        self._queues: dict[str, asyncio.Queue[tuple[Job, asyncio.Future[Reply]]]] = {}
        self._models: dict[str, ModelInfo] = {}
        self._rates: dict[str, DrainRate] = {}
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

    async def submit(self, job: Job) -> Reply:
        if self._closed:
            raise Unavailable("the service is shutting down")
        if job.expired():
            raise DeadlineExceeded(f"job {job.id} was already past its deadline when enqueued")
        queue = self._queue(job.model)
        if queue.qsize() >= self.max_jobs_per_model:
            retry = self._rates[job.model].retry_after(queue.qsize())
            raise QueueFull(
                f"{queue.qsize()} jobs already wait for model '{job.model}' (limit {self.max_jobs_per_model})",
                retry_after=retry,
            )
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        queue.put_nowait((job, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, job.deadline - time.time()))
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within the deadline for job {job.id}") from None
        finally:
            if not future.done():
                future.cancel()  # the worker sees the job abandoned and never computes it

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
        if queue.empty():
            if timeout_s <= 0:
                return []
            try:
                first = await asyncio.wait_for(queue.get(), timeout=timeout_s)
            except TimeoutError:
                return []
        else:
            first = queue.get_nowait()
        entries = [first]
        while len(entries) < max_items and not queue.empty():
            entries.append(queue.get_nowait())
        return [_MemoryDelivery(job=job, future=fut) for job, fut in entries]

    async def reply(self, delivery: Delivery, reply: Reply) -> None:
        assert isinstance(delivery, _MemoryDelivery)
        if reply.status in ("ok", "error"):
            self._rates[delivery.job.model].record()
        if delivery.future is not None and not delivery.future.done():
            delivery.future.set_result(reply)

    def depth(self, model: str) -> int:
        queue = self._queues.get(model)
        return queue.qsize() if queue else 0
