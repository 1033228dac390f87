"""The Redis Streams queue against a real Redis server: delivery, deadlines, backpressure, idempotency,
dead letters, reclaim, outages, and several API instances."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from models.spec import ModelSpec
from service import codec, metrics
from service.jobs import Job, ModelInfo, Reply
from service.queue.base import QueueStats
from service.queue.redis import GROUP, Keys, RedisBroker
from tests.redis_server import RedisServer
from tests.service_harness import TEST_RES, model_calls, png_bytes, read_npy, running_service, until_ready

pytestmark = pytest.mark.anyio
SLOW = "/v1/uncertainty?seeds=32&processing_res=256&format=json"


def on_redis(tiny_dir, redis_url: str, prefix: str, **kw):
    return running_service(tiny_dir, queue="redis", redis_url=redis_url, redis_prefix=prefix, **kw)


async def post(h, url: str, image: bytes, **headers: str):
    return await h.client.post(url, content=image, headers={"content-type": "image/png", **headers})


async def start_slow(h, model: str = "lotus-g-depth") -> asyncio.Task:
    task = asyncio.create_task(post(h, SLOW, png_bytes(96, 128)))
    lane = h.worker.lanes[model]
    while not lane.busy:
        await asyncio.sleep(0.005)
    return task


def direct(tiny_model, family: str, task: str, image: bytes) -> np.ndarray:
    return tiny_model(family, task).predict([codec.decode_image(image)], processing_res=TEST_RES)[0].array


async def test_round_trip_equals_direct_and_every_key_is_bounded(tiny_dir, tiny_model, redis_url, redis_prefix) -> None:
    async with on_redis(tiny_dir, redis_url, redis_prefix, models=[("lotus-d", "depth")]) as h:
        image = png_bytes(40, 56, seed=3)
        r = await post(h, "/v1/depth?format=npy", image)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(read_npy(r.content), direct(tiny_model, "lotus-d", "depth", image), atol=1e-5)
        assert r.headers["x-worker"]
        client = h.app.state.broker.r
        stream = Keys(redis_prefix).jobs("lotus-d-depth")
        assert (await client.xpending(stream, GROUP))["pending"] == 0  # acknowledged after the reply
        for key in await client.keys(Keys(redis_prefix).tag + ":*"):
            if key.decode() != stream:
                assert await client.ttl(key) > 0, f"{key} has no TTL"
        # The answered job's entry was acknowledged and deleted with its reply: the stream holds nothing.
        assert (await client.xlen(stream)) == 0


async def test_expired_jobs_never_reach_the_model(tiny_dir, redis_url, redis_prefix) -> None:
    async with on_redis(tiny_dir, redis_url, redis_prefix, models=[("lotus-g", "depth")], max_batch_size=1) as h:
        with model_calls(h, "lotus-g-depth") as calls:
            slow = await start_slow(h)
            r = await post(h, "/v1/depth?timeout_ms=300", png_bytes(32, 32))
            assert r.status_code == 504 and not slow.done()
            assert (await slow).status_code == 200
            slow_shapes = calls.shapes()
            # Enqueued behind the expired entry on a FIFO lane of batch size 1: once it is answered, the expired
            # entry has been read, and dropped (or computed, had the worker not checked its deadline).
            last = await post(h, "/v1/depth", png_bytes(32, 32, seed=1))
            assert last.status_code == 200, last.text
        (batch, *size), *_ = reversed(calls.calls)
        small = (size[0], size[1])
        assert small not in slow_shapes and batch == 1, calls.calls
        assert calls.images(small) == 1, f"the expired job reached the model: {calls.calls}"
        assert h.worker.stats.outcomes[("lotus-g-depth", "expired")] == 1
        client = h.app.state.broker.r
        stream = Keys(redis_prefix).jobs("lotus-g-depth")
        assert (await client.xpending(stream, GROUP))["pending"] == 0 and await client.xlen(stream) == 0


async def test_queue_full_is_429_with_retry_after(tiny_dir, redis_url, redis_prefix) -> None:
    async with on_redis(
        tiny_dir, redis_url, redis_prefix, models=[("lotus-g", "depth")], queue_max_jobs=1, max_batch_size=1
    ) as h:
        slow = await start_slow(h)
        r = await post(h, "/v1/depth", png_bytes(32, 32))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.headers["content-type"] == "application/problem+json"
        keyed = await post(h, "/v1/depth", png_bytes(32, 32), **{"idempotency-key": "refused-1"})
        assert keyed.status_code == 429
        assert (await slow).status_code == 200
        assert (await post(h, "/v1/depth", png_bytes(32, 32))).status_code == 200
        # The refused attempt was never queued, so its key must not make the retry wait for it (504 at 30 s).
        retry = await post(h, "/v1/depth?timeout_ms=10000", png_bytes(32, 32), **{"idempotency-key": "refused-1"})
        assert retry.status_code == 200, retry.text


async def test_idempotent_retry_returns_the_same_bytes_without_recompute(tiny_dir, redis_url, redis_prefix) -> None:
    async with on_redis(tiny_dir, redis_url, redis_prefix, models=[("lotus-g", "depth")]) as h:
        image = png_bytes(32, 48, seed=7)
        with model_calls(h, "lotus-g-depth") as calls:
            first = await post(h, "/v1/depth", image, **{"idempotency-key": "order-1"})
            again = await post(h, "/v1/depth", image, **{"idempotency-key": "order-1"})
            assert first.status_code == again.status_code == 200 and first.content == again.content
            assert calls.images() == 1, calls.calls
            together = await asyncio.gather(
                *(post(h, "/v1/depth", image, **{"idempotency-key": "order-2"}) for _ in range(3))
            )
            assert {r.content for r in together} == {first.content}
            assert calls.images() == 2, calls.calls
        other = await post(h, "/v1/depth", png_bytes(32, 48, seed=8), **{"idempotency-key": "order-1"})
        assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]


async def test_poison_job_is_dead_lettered_and_the_rest_are_served(
    tiny_dir, tiny_model, redis_url, redis_prefix
) -> None:
    async with on_redis(
        tiny_dir, redis_url, redis_prefix, models=[("lotus-d", "depth")], max_deliveries=2, max_queue_delay_ms=300
    ) as h:
        encoder = h.worker.served["lotus-d-depth"].predictor.runtime.core.vae.encoder

        def poison(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if any(bool((x == -1).all()) for x in args[0]):
                raise RuntimeError("injected fault: all-black input")

        handle = encoder.register_forward_pre_hook(poison)
        try:
            good = [png_bytes(48, 64, seed=s) for s in range(3)]
            replies = await asyncio.gather(
                *(post(h, "/v1/depth?format=npy", img) for img in [*good, png_bytes(48, 64, value=0.0)])
            )
        finally:
            handle.remove()
        for img, r in zip(good, replies[:3], strict=True):
            assert r.status_code == 200
            np.testing.assert_allclose(read_npy(r.content), direct(tiny_model, "lotus-d", "depth", img), atol=1e-5)
        bad = replies[3]
        # Dead-lettered: the reason (with the model's exception) stays in the log; the client reads its request id.
        assert bad.status_code == 500 and bad.json()["request_id"] in bad.json()["detail"], bad.text
        assert "injected fault" not in bad.text, bad.text
        client = h.app.state.broker.r
        dead = await client.xrange(Keys(redis_prefix).dead("lotus-d-depth"))
        assert len(dead) == 1 and b"injected fault" in dead[0][1][b"reason"]
        assert dead[0][1][b"attempts"] == b"2"
        assert (await client.xpending(Keys(redis_prefix).jobs("lotus-d-depth"), GROUP))["pending"] == 0


def _info(model: str) -> ModelInfo:
    return ModelInfo(
        id=model,
        family="lotus-d",
        task="depth",
        output_kind="depth",
        generative=False,
        processing_res=64,
        device="cpu",
        dtype="float32",
        max_batch_size=8,
        max_queue_delay_ms=5,
    )


async def test_a_dead_workers_job_is_reclaimed_once_its_heartbeat_expires_then_dead_lettered(
    redis_url, redis_prefix
) -> None:
    api = RedisBroker(redis_url, redis_prefix)
    dead = RedisBroker(redis_url, redis_prefix, consumer="dead", heartbeat_s=0.3)
    alive = RedisBroker(redis_url, redis_prefix, consumer="alive", heartbeat_s=0.3, max_deliveries=2)
    reclaimed_before = metrics.JOBS_RECLAIMED.labels("m")._value.get()
    dead_before = metrics.JOBS_DEAD_LETTERED.labels("m")._value.get()
    try:
        await dead.publish_models([_info("m")])
        await alive.publish_models([_info("m")])  # starts its heartbeat and reaper
        submitted = asyncio.create_task(
            api.submit(Job(model="m", task="depth", deadline=time.time() + 20, image=b"img"))
        )
        while (await alive.queue_stats("m")).lag != 1:  # the queue gauges see it waiting...
            await asyncio.sleep(0.01)
        taken = []
        while not taken:
            taken = await dead.consume("m", 8, 0.2)
        assert (await alive.queue_stats("m")) == QueueStats(depth=0, pending=1, lag=0)
        await asyncio.sleep(1.0)  # a live worker's job is never taken, however long it computes...
        assert alive.depth("m") == 0 and alive.stats.reclaimed == 0
        await dead.close()  # ...until it dies: its heartbeat stops (close also drops the key at once)
        t0 = time.monotonic()
        reclaimed = []
        while not reclaimed:
            reclaimed = await alive.consume("m", 8, 0.1)
        assert time.monotonic() - t0 < 3 * 0.3 + 1.0, "reclaimed within a heartbeat TTL and a reaper pass"
        (delivery,) = reclaimed
        assert delivery.job.id == taken[0].job.id and delivery.attempt == 2
        await alive.reply(delivery, Reply(id=delivery.job.id, status="ok", outputs={"prediction": b"map"}))
        assert (await submitted).outputs["prediction"] == b"map"
        assert alive.stats.reclaimed_from_dead == 1
        assert metrics.JOBS_RECLAIMED.labels("m")._value.get() - reclaimed_before == 1
        stats = await alive.queue_stats("m")
        assert stats.pending == 0 and await alive.r.xlen(alive.keys.jobs("m")) == 0  # acknowledged and deleted

        # Delivered more than max_deliveries times without an answer: dead-lettered, the client gets a 500.
        alive.consumer.max_deliveries = 1
        again = RedisBroker(redis_url, redis_prefix, consumer="dead-again", heartbeat_s=0.3)
        submitted = asyncio.create_task(
            api.submit(Job(model="m", task="depth", deadline=time.time() + 20, image=b"img2"))
        )
        while not await again.consume("m", 8, 0.2):
            pass
        await again.close()  # it never announced a heartbeat: dead from the start
        reply = await asyncio.wait_for(submitted, timeout=10)
        assert reply.status == "error" and reply.error and "dead-letter" in reply.error.detail
        (entry,) = await alive.r.xrange(alive.keys.dead("m"))
        assert b"image" not in entry[1] and entry[1][b"image_bytes"] == b"4"  # no image kept in dead letters
        assert metrics.JOBS_DEAD_LETTERED.labels("m")._value.get() - dead_before == 1
        assert await alive.consume("m", 8, 0) == []
    finally:
        for b in (api, dead, alive):
            await b.close()


async def test_a_hung_workers_job_is_reclaimed_after_min_idle_and_its_late_answer_dropped(
    redis_url, redis_prefix
) -> None:
    api = RedisBroker(redis_url, redis_prefix)
    hung = RedisBroker(redis_url, redis_prefix, consumer="hung", heartbeat_s=0.3, min_idle_ms=1500)
    other = RedisBroker(redis_url, redis_prefix, consumer="other", heartbeat_s=0.3, min_idle_ms=1500)
    try:
        await hung.publish_models([_info("m")])  # alive: its heartbeat goes on...
        await other.publish_models([_info("m")])
        submitted = asyncio.create_task(
            api.submit(Job(model="m", task="depth", deadline=time.time() + 20, image=b"img"))
        )
        taken = []
        while not taken:
            taken = await hung.consume("m", 8, 0.2)
        await hung.computing(taken)  # ...and its batch starts, but never finishes
        t0 = time.monotonic()
        reclaimed = []
        while not reclaimed:
            reclaimed = await other.consume("m", 8, 0.1)
        waited = time.monotonic() - t0
        # min_idle_ms after its last sign of progress (its reaper keeps held jobs fresh for min_idle/2 after a
        # batch starts), plus a reaper pass.
        assert 1.5 <= waited < 1.5 * 1.5 + 1.0, waited
        assert other.stats.reclaimed_from_hung == 1
        await other.reply(reclaimed[0], Reply(id=reclaimed[0].job.id, status="ok", outputs={"prediction": b"b"}))
        assert (await submitted).outputs["prediction"] == b"b"
        # The hung worker wakes up and answers too: dropped, nothing written.
        await hung.reply(taken[0], Reply(id=taken[0].job.id, status="ok", outputs={"prediction": b"a"}))
        assert hung.stats.late_replies_discarded == 1
        await asyncio.sleep(0.3)
        assert api.stats.orphan_replies == 0  # the late answer never reached the reply stream
        assert (await api.queue_stats("m")).pending == 0
    finally:
        for b in (api, hung, other):
            await b.close()


async def test_restarted_worker_rereads_its_own_pending_first(redis_url, redis_prefix) -> None:
    api = RedisBroker(redis_url, redis_prefix)
    first = RedisBroker(redis_url, redis_prefix, consumer="w")
    try:
        await first.publish_models([_info("m")])
        task = asyncio.create_task(api.submit(Job(model="m", task="depth", deadline=time.time() + 20, image=b"x")))
        while not await first.consume("m", 8, 0.2):
            pass
        await first.close()  # crashed before answering
        again = RedisBroker(redis_url, redis_prefix, consumer="w")
        (delivery,) = await again.consume("m", 8, 0)
        assert delivery.attempt == 2
        await again.reply(delivery, Reply(id=delivery.job.id, status="ok"))
        assert (await task).status == "ok"
        await again.close()
    finally:
        await api.close()


async def test_redis_outage_gives_fast_503s_and_recovers(tiny_dir, redis_prefix) -> None:
    server = RedisServer().start()
    try:
        async with on_redis(tiny_dir, server.url, redis_prefix, models=[("lotus-g", "depth")]) as h:
            assert (await post(h, "/v1/depth", png_bytes(32, 32))).status_code == 200
            in_flight = await start_slow(h)
            server.stop()
            # The request whose job is computing is answered at once (its answer cannot come back through Redis),
            # not left hanging until the batch ends or its deadline passes.
            stuck = await asyncio.wait_for(in_flight, timeout=5)
            assert h.worker.lanes["lotus-g-depth"].busy, "the in-flight request was answered only after its batch"
            assert stuck.status_code == 503, stuck.text
            assert stuck.json()["type"].endswith("/unavailable"), stuck.text
            assert stuck.json()["detail"] == "the queue is unreachable; retry shortly", stuck.text  # no host, no error
            t0 = time.monotonic()
            r = await post(h, "/v1/depth", png_bytes(32, 32))
            assert r.status_code == 503 and time.monotonic() - t0 < 1.5
            assert r.headers["content-type"] == "application/problem+json"
            assert (await h.client.get("/readyz")).status_code == 503
            server.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r = await post(h, "/v1/depth", png_bytes(32, 32))
                if r.status_code == 200:
                    break
                assert r.status_code == 503
                await asyncio.sleep(0.2)
            assert r.status_code == 200, "service recovered by itself after Redis came back"
            await until_ready(h.client, 10)
    finally:
        server.close()


async def test_several_api_instances_share_the_workers(tiny_dir, tiny_model, redis_url, redis_prefix) -> None:
    async with (
        on_redis(tiny_dir, redis_url, redis_prefix, models=[("lotus-d", "depth")], max_queue_delay_ms=50) as a,
        on_redis(tiny_dir, redis_url, redis_prefix, with_worker=False) as b,
    ):
        images = [png_bytes(40, 40, seed=50 + i) for i in range(12)]
        replies = await asyncio.gather(
            *(post(a if i % 2 else b, "/v1/depth?format=npy", img) for i, img in enumerate(images))
        )
        for img, r in zip(images, replies, strict=True):
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(read_npy(r.content), direct(tiny_model, "lotus-d", "depth", img), atol=1e-5)
        assert a.app.state.broker.submitter.reply_stream != b.app.state.broker.submitter.reply_stream


async def test_the_bundled_server_fallback_works(tiny_dir, redis_prefix) -> None:
    """A fresh machine without redis-server gets valkey-server from the dev dependencies; the queue runs on it."""
    from tests.redis_server import bundled_binary

    server = RedisServer(binary=bundled_binary()).start()
    try:
        async with on_redis(tiny_dir, server.url, redis_prefix, models=[("lotus-d", "depth")]) as h:
            assert (await post(h, "/v1/depth", png_bytes(24, 24))).status_code == 200
    finally:
        server.close()


async def test_scale_from_zero_queues_jobs_until_a_worker_comes(tiny_dir, redis_url, redis_prefix) -> None:
    models = [("lotus-d", "depth")]
    async with on_redis(tiny_dir, redis_url, redis_prefix, models=models):
        pass  # a worker served the model once, then scaled down to zero
    image = png_bytes(32, 32, seed=9)
    async with running_service(
        tiny_dir, with_worker=False, wait_ready=False, queue="redis", redis_url=redis_url, redis_prefix=redis_prefix
    ) as plain:
        assert (await plain.client.get("/readyz")).status_code == 503
        assert (await post(plain, "/v1/depth", image)).status_code == 503  # no live worker: refused
    async with running_service(
        tiny_dir,
        with_worker=False,
        wait_ready=False,
        queue="redis",
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        scale_from_zero=True,
    ) as api:
        ready = await api.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["models"] == {"lotus-d-depth": True}
        waiting = asyncio.create_task(post(api, "/v1/depth?timeout_ms=60000", image))
        broker = api.app.state.broker
        while (await broker.queue_stats("lotus-d-depth")).lag != 1:  # queued: what KEDA scales up on
            assert not waiting.done(), waiting.result().text
            await asyncio.sleep(0.05)
        async with on_redis(tiny_dir, redis_url, redis_prefix, models=models):  # a worker comes up
            reply = await asyncio.wait_for(waiting, timeout=60)
        assert reply.status_code == 200, reply.text


async def test_a_fresh_install_accepts_its_configured_models_before_any_worker_announced_them(
    tiny_dir, redis_url, redis_prefix
) -> None:
    """Kubernetes from zero: the front-ends know the models from their specs, so a job waits in the stream
    (its lag wakes KEDA) instead of being refused because no worker ever ran."""
    spec = ModelSpec(id="lotus-d-depth", source="configured-elsewhere", family="lotus-d", task="depth")
    async with running_service(
        tiny_dir,
        specs=[spec],
        with_worker=False,
        wait_ready=False,
        queue="redis",
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        scale_from_zero=True,
    ) as api:
        broker = api.app.state.broker
        end = time.monotonic() + 10
        while (await api.client.get("/readyz")).status_code != 200:
            assert time.monotonic() < end, (await api.client.get("/readyz")).json()
            await asyncio.sleep(0.05)
        assert await broker.catalog() == []  # no worker has ever served it
        waiting = asyncio.create_task(post(api, "/v1/depth?timeout_ms=60000", png_bytes(32, 32, seed=4)))
        while (await broker.queue_stats("lotus-d-depth")).lag != 1:
            assert not waiting.done(), waiting.result().text
            await asyncio.sleep(0.05)
        async with on_redis(tiny_dir, redis_url, redis_prefix, models=[("lotus-d", "depth")]):  # KEDA starts one
            reply = await asyncio.wait_for(waiting, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-model"] == "lotus-d-depth"


async def test_a_cancelled_request_is_never_computed_on_redis(tiny_dir, redis_url, redis_prefix) -> None:
    async with on_redis(tiny_dir, redis_url, redis_prefix) as h:
        with model_calls(h, "lotus-g-depth") as calls:
            slow = await start_slow(h)  # the lane is busy: the next job waits (in the stream, or read ahead)
            stats = h.worker.stats
            url = "/v1/depth?format=npy&model=lotus-g-depth"
            client = asyncio.create_task(post(h, url, png_bytes(32, 32, seed=3)))
            broker = h.app.state.broker
            end = time.monotonic() + 10
            while ((q := await broker.queue_stats("lotus-g-depth")).lag or 0) + (q.pending or 0) < 2:
                assert time.monotonic() < end and not slow.done(), f"the job never reached the stream: {q}"
                await asyncio.sleep(0.01)
            client.cancel()  # the client disconnects
            with pytest.raises(asyncio.CancelledError):
                await client
            assert (await slow).status_code == 200
            end = time.monotonic() + 10
            while stats.outcomes[("lotus-g-depth", "dropped")] < 1:  # the worker reads it, sees the marker, drops it
                assert time.monotonic() < end, f"the cancelled job was not dropped: {dict(stats.outcomes)}"
                await asyncio.sleep(0.02)
            slow_shapes = calls.shapes()
            last = await post(h, url, png_bytes(32, 32, seed=4))  # the same size, after it
            assert last.status_code == 200, last.text
        (batch, *size), *_ = reversed(calls.calls)
        small = (size[0], size[1])
        assert small not in slow_shapes and batch == 1, calls.calls
        assert calls.images(small) == 1, f"the cancelled job reached the model: {calls.calls}"  # only the last one
        assert (await broker.queue_stats("lotus-g-depth")).pending == 0  # acknowledged, not left behind


async def drop_while_xadd_in_transit(h, url: str, image: bytes, key: str | None, reply_delay_s: float) -> float:
    """Post (with an Idempotency-Key when `key` is given) and drop the connection once Redis has added the job but
    before the XADD's reply reaches the API (held back `reply_delay_s`); when Redis added it (monotonic seconds)."""
    submitter = h.app.state.broker.submitter
    real_xadd = submitter.r.xadd
    added = asyncio.Event()
    added_at = 0.0

    async def reply_in_transit(*args, **kwargs):
        nonlocal added_at
        entry = await real_xadd(*args, **kwargs)  # Redis has the job ...
        added_at = time.monotonic()
        added.set()
        await asyncio.sleep(reply_delay_s)  # ... and its reply has not reached the API yet
        return entry

    submitter.r.xadd = reply_in_transit
    try:
        client = asyncio.create_task(post(h, url, image, **({"idempotency-key": key} if key else {})))
        await asyncio.wait_for(added.wait(), timeout=10)
        client.cancel()  # the connection drops now
        with pytest.raises(asyncio.CancelledError):
            await client
    finally:
        del submitter.r.xadd
    return added_at


async def test_a_keyed_client_leaving_while_its_xadd_is_on_the_wire_is_computed_once(
    tiny_dir, redis_url, redis_prefix
) -> None:
    """Redis may have added the job when the client's cancellation lands (the XADD's reply still in transit):
    that job keeps its Idempotency-Key, so the retry gets its stored answer instead of computing it again
    (found by CI: test_disconnect's retry[redis] computed twice when the drop raced the XADD)."""
    async with on_redis(tiny_dir, redis_url, redis_prefix, models=[("lotus-g", "depth")]) as h:
        image = png_bytes(32, 40, seed=12)
        url = "/v1/depth?format=npy&model=lotus-g-depth"
        with model_calls(h, "lotus-g-depth") as calls:
            await drop_while_xadd_in_transit(h, url, image, "on-the-wire-1", reply_delay_s=1.0)
            retry = await post(h, url, image, **{"idempotency-key": "on-the-wire-1"})
            assert retry.status_code == 200, retry.text
            assert calls.images() == 1, calls.calls  # computed once, for both attempts
            _, *small = calls.calls[0]
            slow = await start_slow(h)  # the lane is busy: the next job waits in the stream
            # Without a key: the job in the stream is marked cancelled, never computed.
            await drop_while_xadd_in_transit(h, url, png_bytes(32, 40, seed=13), None, reply_delay_s=1.0)
            assert (await slow).status_code == 200
            end = time.monotonic() + 10
            while h.worker.stats.outcomes[("lotus-g-depth", "dropped")] < 1:
                assert time.monotonic() < end, f"the abandoned job was not dropped: {dict(h.worker.stats.outcomes)}"
                await asyncio.sleep(0.02)
            assert calls.images(tuple(small)) == 1, calls.calls  # the keyed job only: the abandoned one never ran


async def test_a_keyed_retry_long_after_the_abandoned_xadd_settled_is_computed_once(
    tiny_dir, redis_url, redis_prefix
) -> None:
    """The client leaves while its XADD is on the wire, and its retry comes 1.5 s after Redis added the job, long
    after the abandoned submission settled (0.3 s): the key still names the queued job, so the retry waits for
    that job's answer instead of claiming the key anew. One batch for both attempts (a key released once the
    XADD had succeeded passed the on-the-wire test above, whose retry arrives before the settling)."""
    from prometheus_client.parser import text_string_to_metric_families

    spec = ModelSpec(
        id="slow",
        source=str(tiny_dir("lotus-d", "depth")),
        backend="simulated",
        simulated_batch_ms=3000,  # still computing when the retry comes
        max_batch_size=1,
        processing_res=64,
    )

    async def batches(h) -> float:
        text = (await h.client.get("/metrics")).text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "dense_batch_size_count" and s.labels.get("model") == "slow"
        )

    async with running_service(
        tiny_dir, specs=[spec], queue="redis", redis_url=redis_url, redis_prefix=redis_prefix
    ) as h:
        submitter = h.app.state.broker.submitter
        stats = h.worker.stats
        forwards, counted, answered = stats.forwards["slow"], await batches(h), stats.outcomes[("slow", "ok")]
        image = png_bytes(32, 40, seed=21)
        url = "/v1/depth?format=npy&model=slow"
        added_at = await drop_while_xadd_in_transit(h, url, image, "late-retry-1", reply_delay_s=0.3)
        await asyncio.sleep(max(0.0, added_at + 1.5 - time.monotonic()))
        assert not [t.get_name() for t in submitter._background if t.get_name().startswith("dense-settle")]
        assert stats.outcomes[("slow", "ok")] == answered, dict(stats.outcomes)  # still queued or computing
        retry = await post(h, url, image, **{"idempotency-key": "late-retry-1"})
        assert retry.status_code == 200, retry.text
        assert read_npy(retry.content).shape == (32, 40)
        await asyncio.sleep(0.5)  # a second job would have reached the worker by now
        assert stats.forwards["slow"] - forwards == 1, dict(stats.forwards)  # computed once, for both attempts
        assert await batches(h) - counted == 1
        assert stats.outcomes[("slow", "ok")] - answered == 1, dict(stats.outcomes)
