"""Separate API and worker processes joined by a real Redis: load sharing, kill -9 of a worker under load,
and graceful SIGTERM of a worker."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import pytest

from load_tests.cluster import start_worker, stop
from load_tests.kill_worker import RES, count_from_logs, held_by, kill_worker_run
from service import codec
from service.queue.redis import GROUP, Keys
from tests.service_harness import png_bytes, running_service, until_ready

pytestmark = pytest.mark.anyio
MODEL = "lotus-d-depth"


async def _wait_workers(broker, n: int, timeout_s: float = 120.0) -> None:
    end = time.monotonic() + timeout_s
    while len(await broker.r.keys(broker.keys.workers_pattern())) < n:
        assert time.monotonic() < end, "worker processes did not come up"
        await asyncio.sleep(0.2)


async def test_two_worker_processes_share_load_and_survive_a_kill_on_default_settings(
    tiny_dir, tiny_model, redis_url, redis_prefix, tmp_path
) -> None:
    """Every setting at its default: the killed worker's jobs are reclaimed once its heartbeat expires and
    answered long before their deadline; nothing is lost, nothing is answered twice."""
    from service.config import Settings

    defaults = Settings()
    model_dir = str(tiny_dir("lotus-d", "depth"))
    logs = {name: tmp_path / f"{name}.log" for name in ("w0", "w1")}
    victim = start_worker(redis_url, redis_prefix, model_dir, "w0", log_file=logs["w0"])
    survivor = start_worker(redis_url, redis_prefix, model_dir, "w1", log_file=logs["w1"])
    try:
        async with running_service(
            tiny_dir, with_worker=False, wait_ready=False, queue="redis", redis_url=redis_url, redis_prefix=redis_prefix
        ) as api:
            await until_ready(api.client, 120)
            broker = api.app.state.broker
            await _wait_workers(broker, 2)
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
            assert all(r.status_code == 200 for r in replies), {r.status_code: r.text[:300] for r in replies}
            assert set(Counter(r.headers["x-worker"] for r in replies)) == {"w0", "w1"}

            run = await kill_worker_run(
                api.client, victim, lambda: held_by(broker, "w0"), images, expected, requests=200, concurrency=16
            )
            assert victim.wait(timeout=10) == -signal.SIGKILL
            count_from_logs(run, logs)
            assert run.lost == 0 and run.wrong == 0 and not run.errors, run
            assert run.victim_requests and run.reclaimed >= 1, run  # it held jobs, and they were taken over
            # ... within a heartbeat TTL (its death is noticed) plus a reaper pass and a batch or two.
            assert run.worst_recovery_s < defaults.heartbeat_ttl_s + defaults.heartbeat_s + 3.0, run.recovery_s
            assert run.duplicates <= len(run.victim_requests), run  # only what it held can have run twice
            assert broker.stats.orphan_replies == 0  # one answer per request reached the API
            pending = await broker.r.xpending(broker.keys.jobs(MODEL), GROUP)
            assert pending["pending"] == 0
            assert await broker.r.xlen(broker.keys.jobs(MODEL)) == 0  # every entry acknowledged and deleted
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
            stream = Keys(redis_prefix).jobs(MODEL)
            # It reads all six, then waits (400 ms) to fill a bigger batch: stop it while it holds them.
            while len(await broker.r.xpending_range(stream, GROUP, "-", "+", 10, consumername="w-term")) < 6:
                await asyncio.sleep(0.005)
            worker.send_signal(signal.SIGTERM)
            replies = await asyncio.gather(*requests)
            assert worker.wait(timeout=30) == 0
            assert all(r.status_code == 200 for r in replies), [r.status_code for r in replies]
            assert (await broker.r.xpending(stream, GROUP))["pending"] == 0
            assert not await broker.r.exists(Keys(redis_prefix).worker("w-term"))  # it withdrew its models
    finally:
        stop(worker)
