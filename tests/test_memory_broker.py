"""The in-process broker: bounded queues, deadlines, abandoned jobs, drain-rate Retry-After, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.errors import DeadlineExceeded, QueueFull, Unavailable
from service.jobs import Job, Reply
from service.queue.base import DrainRate
from service.queue.memory import MemoryBroker

pytestmark = pytest.mark.anyio


def job(timeout_s: float = 5.0, model: str = "m") -> Job:
    return Job(model=model, task="depth", deadline=time.time() + timeout_s, image=b"x")


async def test_reply_reaches_the_submitter() -> None:
    broker = MemoryBroker()
    task = asyncio.create_task(broker.submit(j := job()))
    (delivery,) = await broker.consume("m", 8, 1.0)
    assert delivery.job.id == j.id and not delivery.abandoned()
    await broker.reply(delivery, Reply(id=j.id, status="ok"))
    assert (await task).status == "ok"


async def test_abandoned_jobs_free_their_slot_and_are_never_delivered() -> None:
    broker = MemoryBroker(max_jobs_per_model=1)
    with pytest.raises(DeadlineExceeded):
        await broker.submit(job(timeout_s=0.05))
    assert broker.depth("m") == 0  # the dead entry no longer counts against the bound
    live = asyncio.create_task(broker.submit(j := job()))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as full:
        await broker.submit(job())
    assert full.value.extra["retry_after"] >= 1
    deliveries = await broker.consume("m", 8, 1.0)
    assert [d.job.id for d in deliveries] == [j.id]  # the abandoned one was skipped, not delivered
    await broker.reply(deliveries[0], Reply(id=j.id, status="ok"))
    await live


async def test_expired_at_enqueue_is_refused_and_consume_times_out_empty() -> None:
    broker = MemoryBroker()
    with pytest.raises(DeadlineExceeded, match="already past"):
        await broker.submit(job(timeout_s=-1))
    assert await broker.consume("m", 8, 0.05) == []
    assert await broker.consume("m", 8, 0) == []


async def test_close_fails_waiting_submitters_with_unavailable() -> None:
    broker = MemoryBroker()
    task = asyncio.create_task(broker.submit(job()))
    await asyncio.sleep(0)
    await broker.close()
    with pytest.raises(Unavailable):
        await task
    with pytest.raises(Unavailable):
        await broker.submit(job())
    assert not await broker.reachable()


def test_drain_rate_gives_retry_after_from_throughput() -> None:
    rate = DrainRate(window_s=10)
    assert rate.retry_after(100) == 1  # no history yet: the floor
    for i in range(21):
        rate.record(now=100.0 + i * 0.5)  # 2 jobs per second
    assert rate.per_second(now=110.0) == pytest.approx(2.1, rel=0.01)
    assert rate.retry_after(40, now=110.0) == 20
    assert rate.retry_after(10_000, now=110.0) == 60  # capped
