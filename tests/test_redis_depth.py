"""The queue's numbers stay true when several workers finish out of order (issue 22): waiting = XLEN - pending,
because every answered job's entry is deleted; Redis's own group lag goes NULL in exactly this case."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from service.errors import QueueFull
from service.queue.redis import GROUP, RedisBroker
from service.queue.redis.streams import Groups

pytestmark = pytest.mark.anyio
MODEL = "m"
JOBS = 300
BATCH = 8


async def test_waiting_and_pending_are_right_at_every_sample_with_three_workers_finishing_out_of_order(
    redis_url: str, redis_prefix: str
) -> None:
    broker = RedisBroker(redis_url, redis_prefix, max_depth=JOBS)
    r = Redis.from_url(redis_url)
    stream = broker.keys.jobs(MODEL)
    try:
        await broker.start()
        await Groups(r).ensure(stream)
        for i in range(JOBS):
            await r.xadd(stream, {b"job": str(i).encode()})
        workers = ["w1", "w2", "w3"]
        in_hand: dict[str, list[bytes]] = {w: [] for w in workers}
        read = answered = 0
        raw_lag_went_null = False
        samples = 0

        async def sample() -> None:
            nonlocal raw_lag_went_null, samples
            stats = await broker.queue_stats(MODEL)
            assert (stats.depth, stats.pending) == (JOBS - read, read - answered), (read, answered)
            assert stats.lag == stats.depth
            # What KEDA's streamLength trigger reads (XLEN): everything in flight, waiting or in a worker's hands.
            assert await r.xlen(stream) == JOBS - answered
            # The front-end's backpressure counts the same jobs in flight.
            if JOBS - answered >= broker.submitter.max_depth:
                with pytest.raises(QueueFull):
                    await broker.submitter._check_depth(MODEL)
            else:
                await broker.submitter._check_depth(MODEL)
            (group,) = [g for g in await r.xinfo_groups(stream) if g["name"] == GROUP.encode()]
            raw_lag_went_null |= group["lag"] is None
            samples += 1

        async def take(worker: str) -> None:
            nonlocal read
            response = await r.xreadgroup(GROUP, worker, {stream: ">"}, count=BATCH)
            ids = [entry_id for _, entries in response for entry_id, _ in entries]
            in_hand[worker] += ids
            read += len(ids)

        async def finish(worker: str) -> None:
            """What the reply script does: acknowledge and delete the worker's batch."""
            nonlocal answered
            ids, in_hand[worker] = in_hand[worker], []
            if ids:
                await r.xack(stream, GROUP, *ids)
                await r.xdel(stream, *ids)
            answered += len(ids)

        broker.submitter.max_depth = JOBS - 20  # full at first, no longer once some batches are answered
        await sample()
        while answered < JOBS:
            for worker in workers:  # each reads a batch: w1 first, w3 last
                await take(worker)
                await sample()
            for worker in reversed(workers):  # the last to read finishes first
                await finish(worker)
                await sample()
        assert raw_lag_went_null, "the out-of-order case Redis cannot count was not exercised"
        assert samples == 1 + 6 * -(-JOBS // (len(workers) * BATCH))
    finally:
        await broker.close()
        await r.aclose()
