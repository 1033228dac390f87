"""Separate API and worker processes joined by a real Redis: load sharing, kill -9 of a worker under load,
and graceful SIGTERM of a worker."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import pytest

from load_tests.cluster import start_worker, stop
from load_tests.kill_worker import RES, kill_worker_run
from service import codec
from service.queue.redis_streams import GROUP
from tests.service_harness import png_bytes, running_service, until_ready

pytestmark = pytest.mark.anyio
MODEL = "lotus-d-depth"


async def _wait_workers(broker, prefix: str, n: int, timeout_s: float = 120.0) -> None:
    end = time.monotonic() + timeout_s
    while len(await broker.r.keys(f"{prefix}:worker:*")) < n:
        assert time.monotonic() < end, "worker processes did not come up"
        await asyncio.sleep(0.2)


async def test_two_worker_processes_share_load_and_survive_a_kill(
    tiny_dir, tiny_model, redis_url, redis_prefix
) -> None:
    model_dir = str(tiny_dir("lotus-d", "depth"))
    env = {"DENSE_MIN_IDLE_MS": "1500", "DENSE_MAX_QUEUE_DELAY_MS": "30"}
    # w0 is the victim: it waits long to fill big batches, so it holds unanswered jobs when it is killed.
    victim = start_worker(
        redis_url,
        redis_prefix,
        model_dir,
        "w0",
        DENSE_MIN_IDLE_MS="1500",
        DENSE_MAX_QUEUE_DELAY_MS="200",
        DENSE_MAX_BATCH_SIZE="64",
    )
    survivor = start_worker(redis_url, redis_prefix, model_dir, "w1", **env)
    try:
        async with running_service(
            tiny_dir, with_worker=False, wait_ready=False, queue="redis", redis_url=redis_url, redis_prefix=redis_prefix
        ) as api:
            await until_ready(api.client, 120)
            broker = api.app.state.broker
            await _wait_workers(broker, redis_prefix, 2)
            model = tiny_model("lotus-d", "depth")
            images = [png_bytes(48, 64, seed=s) for s in range(8)]
            expected = [model.predict([codec.decode_image(i)], processing_res=RES)[0].array for i in images]

            # Both workers take part.
            replies = await asyncio.gather(
                *(
                    api.client.post(
                        f"/v1/depth?format=npy&processing_res={RES}",
                        content=images[i % 8],
                        headers={"content-type": "image/png"},
                    )
                    for i in range(48)
                )
            )
            assert all(r.status_code == 200 for r in replies)
            assert set(Counter(r.headers["x-worker"] for r in replies)) == {"w0", "w1"}

            async def victim_pending() -> int:
                info = await broker.r.xpending_range(
                    f"{redis_prefix}:jobs:{MODEL}", GROUP, "-", "+", 100, consumername="w0"
                )
                return len(info)

            run = await kill_worker_run(
                api.client,
                victim,
                victim_pending,
                images,
                expected,
                requests=200,
                concurrency=16,
                kill_after=30,
                min_idle_ms=1500,
            )
            assert victim.wait(timeout=10) == -signal.SIGKILL
            assert run.answered_ok == 200 and run.lost == 0 and run.wrong == 0, run
            assert run.in_flight_at_kill >= 1 and run.reclaimed >= 1, run  # its jobs were taken over
            pending = await broker.r.xpending(f"{redis_prefix}:jobs:{MODEL}", GROUP)
            assert pending["pending"] == 0
    finally:
        stop(victim)
        stop(survivor)


async def test_worker_sigterm_finishes_and_acknowledges_its_batch(tiny_dir, redis_url, redis_prefix) -> None:
    model_dir = str(tiny_dir("lotus-d", "depth"))
    worker = start_worker(
        redis_url, redis_prefix, model_dir, "w-term", DENSE_MAX_QUEUE_DELAY_MS="400", DENSE_MAX_BATCH_SIZE="64"
    )
    try:
        async with running_service(
            tiny_dir, with_worker=False, wait_ready=False, queue="redis", redis_url=redis_url, redis_prefix=redis_prefix
        ) as api:
            await until_ready(api.client, 120)
            broker = api.app.state.broker
            requests = [
                asyncio.create_task(
                    api.client.post(
                        f"/v1/depth?format=npy&processing_res={RES}&timeout_ms=10000",
                        content=png_bytes(32, 32, seed=i),
                        headers={"content-type": "image/png"},
                    )
                )
                for i in range(6)
            ]
            stream = f"{redis_prefix}:jobs:{MODEL}"
            # It reads all six, then waits (400 ms) to fill a bigger batch: stop it while it holds them.
            while len(await broker.r.xpending_range(stream, GROUP, "-", "+", 10, consumername="w-term")) < 6:
                await asyncio.sleep(0.005)
            worker.send_signal(signal.SIGTERM)
            replies = await asyncio.gather(*requests)
            assert worker.wait(timeout=30) == 0
            assert all(r.status_code == 200 for r in replies), [r.status_code for r in replies]
            assert (await broker.r.xpending(stream, GROUP))["pending"] == 0
            assert not await broker.r.exists(f"{redis_prefix}:worker:w-term")  # it withdrew its models
    finally:
        stop(worker)
