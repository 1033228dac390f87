"""Keyed answers (Idempotency-Key) are kept only as long as a retry can need them, and within a byte budget:
the in-process queue and Redis follow the same rules, checked here on the real brokers (a real Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from service import metrics
from service.jobs import Job, ModelInfo, Reply
from service.queue.base import Broker, answer_bytes
from service.queue.memory import MemoryBroker
from service.queue.redis import Keys, RedisBroker

pytestmark = pytest.mark.anyio


@dataclass
class Queue:
    """The front-end's side and a worker's side of one queue (the same object for the in-process one)."""

    api: Broker
    worker: Broker


@asynccontextmanager
async def queue(kind: str, redis_url: str, prefix: str, grace_s: float, budget: int) -> AsyncIterator[Queue]:
    if kind == "memory":
        broker = MemoryBroker(result_ttl_s=60, answer_grace_s=grace_s, answer_store_bytes=budget)
        yield Queue(broker, broker)
        await broker.close()
        return
    options = {"result_ttl_s": 60, "answer_grace_s": grace_s, "answer_store_bytes": budget}
    api = RedisBroker(redis_url, prefix, **options)
    worker = RedisBroker(redis_url, prefix, consumer="w", **options)
    await api.start()
    await worker.start()
    await worker.publish_models(
        [ModelInfo(id="m", family="lotus-d", task="depth", output_kind="depth", generative=False,
                   processing_res=64, device="cpu", dtype="fp32", max_batch_size=1, max_queue_delay_ms=0)]
    )  # fmt: skip
    try:
        yield Queue(api, worker)
    finally:
        await api.close()
        await worker.close()


def request(image: bytes, timeout_s: float = 20.0) -> Job:
    return Job(model="m", task="depth", deadline=time.time() + timeout_s, image=image)


async def answer(q: Queue, payload: bytes, wait_s: float = 5.0) -> str:
    """Be the worker: take the next job and answer it with `payload`; its id."""
    deliveries = []
    end = time.monotonic() + wait_s
    while not deliveries:
        assert time.monotonic() < end, "no job reached the worker"
        deliveries = await q.worker.consume("m", 1, 0.2)
    (delivery,) = deliveries
    await q.worker.reply(delivery, Reply(id=delivery.job.id, status="ok", outputs={"prediction": payload}))
    return delivery.job.id


async def nothing_to_compute(q: Queue, wait_s: float = 0.5) -> bool:
    return not await q.worker.consume("m", 1, wait_s)


def not_kept(model: str = "m") -> float:
    return metrics.REGISTRY.get_sample_value("dense_answers_not_kept_total", {"model": model}) or 0.0


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_delivered_answer_is_kept_only_for_the_grace(kind: str, redis_url: str, redis_prefix: str) -> None:
    async with queue(kind, redis_url, redis_prefix, grace_s=1.0, budget=2**20) as q:
        first = asyncio.create_task(q.api.submit(request(b"photo"), idempotency_key="k1"))
        await answer(q, b"map-1")
        assert (await first).outputs["prediction"] == b"map-1"  # delivered to a client that was waiting
        # Within the grace (an answer lost in transit), the retry gets it without computing again...
        retry = asyncio.create_task(q.api.submit(request(b"photo"), idempotency_key="k1"))
        assert await nothing_to_compute(q, 0.3)
        assert (await retry).outputs["prediction"] == b"map-1"
        if isinstance(q.api, RedisBroker):
            keys = Keys(redis_prefix)
            result = keys.result((await first).id)
            assert 0 < await q.api.r.pttl(result) <= 1000  # shortened from result_ttl_s (60 s) to the grace
        # ...after it, the answer is gone and the same request is computed again.
        await asyncio.sleep(1.3)
        late = asyncio.create_task(q.api.submit(request(b"photo"), idempotency_key="k1"))
        await answer(q, b"map-2")
        assert (await late).outputs["prediction"] == b"map-2"


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_an_answer_whose_client_left_is_kept_for_its_retry(kind: str, redis_url: str, redis_prefix: str) -> None:
    async with queue(kind, redis_url, redis_prefix, grace_s=0.2, budget=2**20) as q:
        first = asyncio.create_task(q.api.submit(request(b"photo"), idempotency_key="k2"))
        deliveries = []
        while not deliveries:
            deliveries = await q.worker.consume("m", 1, 0.2)
        first.cancel()  # the client's connection drops while the job computes
        with pytest.raises(asyncio.CancelledError):
            await first
        (delivery,) = deliveries
        await q.worker.reply(delivery, Reply(id=delivery.job.id, status="ok", outputs={"prediction": b"map"}))
        await asyncio.sleep(0.6)  # well past the grace: it was never delivered, so the full TTL applies
        retry = asyncio.create_task(q.api.submit(request(b"photo"), idempotency_key="k2"))
        assert await nothing_to_compute(q, 0.3)
        assert (await retry).outputs["prediction"] == b"map"


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_past_the_byte_budget_an_answer_is_not_kept_and_its_retry_computes_again(
    kind: str, redis_url: str, redis_prefix: str
) -> None:
    payload = bytes(3000)
    size = answer_bytes(Reply(id="x", status="ok", outputs={"prediction": payload}))
    async with queue(kind, redis_url, redis_prefix, grace_s=0.2, budget=size + size // 2) as q:
        before = not_kept()
        for key in ("a", "b"):  # both clients leave before their answers: each answer would be kept 60 s
            task = asyncio.create_task(q.api.submit(request(key.encode()), idempotency_key=key))
            deliveries = []
            while not deliveries:
                deliveries = await q.worker.consume("m", 1, 0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            (delivery,) = deliveries
            await q.worker.reply(delivery, Reply(id=delivery.job.id, status="ok", outputs={"prediction": payload}))
            await asyncio.sleep(0.05)  # the in-process queue files the reply in a callback
        assert not_kept() == before + 1  # the second did not fit beside the first
        if isinstance(q.api, RedisBroker):
            total = int(await q.api.r.hget(Keys(redis_prefix).kept_bytes(), "_total"))
            assert size <= total < size + 1024  # Redis counts every field it holds (metadata too)
        else:
            assert isinstance(q.api, MemoryBroker) and q.api.kept_bytes == size
        # "a" is answered from what was kept; "b" is computed again at once, not left waiting for its deadline.
        kept = asyncio.create_task(q.api.submit(request(b"a"), idempotency_key="a"))
        assert await nothing_to_compute(q, 0.3)
        assert (await kept).outputs["prediction"] == payload
        t0 = time.monotonic()
        again = asyncio.create_task(q.api.submit(request(b"b"), idempotency_key="b"))
        await answer(q, b"recomputed")
        assert (await again).outputs["prediction"] == b"recomputed"
        assert time.monotonic() - t0 < 5


async def test_redis_releases_the_bytes_of_expired_answers(redis_url: str, redis_prefix: str) -> None:
    """The budget counts answers while they live: once delivered ones pass their grace, new ones fit again."""
    payload = bytes(3000)
    size = answer_bytes(Reply(id="x", status="ok", outputs={"prediction": payload}))
    async with queue("redis", redis_url, redis_prefix, grace_s=0.3, budget=size + size // 2) as q:
        before = not_kept()
        for i in range(4):
            task = asyncio.create_task(q.api.submit(request(b"p%d" % i), idempotency_key=f"e{i}"))
            await answer(q, payload)
            await task
            await asyncio.sleep(0.6)  # past the grace of the one delivered before
        assert not_kept() == before  # each one fitted, because the one before had been released
        expiry = await q.api.r.zcard(Keys(redis_prefix).kept_expiry())
        assert expiry == 1, expiry  # only the last one is counted
        for key in (Keys(redis_prefix).kept_expiry(), Keys(redis_prefix).kept_bytes()):
            assert await q.api.r.ttl(key) > 0  # the index goes when keyed traffic stops


class SlowReplies:
    """A loopback TCP proxy in front of Redis that passes commands at once and holds each reply back `delay_s`:
    a command has taken effect in Redis while its client still waits for the answer."""

    def __init__(self, port: int, delay_s: float) -> None:
        self.port, self.delay_s = port, delay_s
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay_s: float) -> None:
            try:
                while data := await src.read(65536):
                    if delay_s:
                        await asyncio.sleep(delay_s)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, 0.0), pipe(up_reader, writer, self.delay_s))


async def test_a_client_leaving_while_its_key_claim_is_on_the_wire_does_not_block_its_retry(
    redis_url: str, redis_prefix: str
) -> None:
    """The claim (SET NX) took effect in Redis, but its reply had not come when the client left: nothing was
    queued, so the claim is released and the retry is computed at once, instead of waiting for the deadline of a
    job that does not exist (a 504 seen in full-suite runs when a connection dropped early)."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    async with SlowReplies(port, delay_s=0.3) as slow_url:
        api = RedisBroker(slow_url, redis_prefix, answer_grace_s=1.0)
        worker = RedisBroker(redis_url, redis_prefix, consumer="w")
        q = Queue(api, worker)
        await api.start()
        await worker.start()
        try:
            first = asyncio.create_task(api.submit(request(b"photo", timeout_s=30), idempotency_key="k"))
            idem = Keys(redis_prefix).tag + ":idem:*"
            while not await worker.r.keys(idem):  # the claim is in Redis; its reply is still on the way
                await asyncio.sleep(0.01)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            await asyncio.sleep(1.0)  # the release (a script, through the slow proxy) has run
            assert await nothing_to_compute(q, 0.2)  # nothing was queued
            t0 = time.monotonic()
            retry = asyncio.create_task(api.submit(request(b"photo", timeout_s=30), idempotency_key="k"))
            await answer(q, b"map", wait_s=8)
            assert (await retry).outputs["prediction"] == b"map"
            assert time.monotonic() - t0 < 8
        finally:
            await api.close()
            await worker.close()
