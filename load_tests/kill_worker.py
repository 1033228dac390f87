"""Chaos run: kill -9 one of two worker processes in the middle of a loaded run, and count what the
clients got. Every request must get exactly one correct answer; none may be lost.

    .venv/bin/python -m load_tests.kill_worker [--requests 200] [--concurrency 16]

Starts its own Redis (or uses REDIS_URL), two `dense-serve worker` processes on a tiny checkpoint, and an
API instance in this process. Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

RES = 64


@dataclass
class KillRun:
    requests: int
    answered_ok: int = 0
    wrong: int = 0
    errors: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    served_by: Counter[str] = field(default_factory=Counter)
    killed_after: int = 0
    in_flight_at_kill: int = 0
    min_idle_ms: int = 0

    @property
    def reclaimed(self) -> int:
        """Requests that waited at least `min_idle_ms`: the killed worker's jobs, answered by the other."""
        return sum(1 for t in self.latencies if t * 1000.0 >= self.min_idle_ms)

    @property
    def lost(self) -> int:
        return self.requests - self.answered_ok - sum(self.errors.values())

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000.0 if self.latencies else float("nan")


async def kill_worker_run(
    client: httpx.AsyncClient,
    victim: subprocess.Popen[str],
    victim_pending: Callable[[], Awaitable[int]],
    images: list[bytes],
    expected: list[np.ndarray],
    requests: int = 200,
    concurrency: int = 16,
    kill_after: int = 40,
    min_idle_ms: int = 2000,
    atol: float = 1e-5,
) -> KillRun:
    """Send `requests` at `concurrency`; once `kill_after` are answered, SIGKILL the victim at a moment it
    holds jobs it has read but not acknowledged (so they must be reclaimed by the other worker)."""
    run = KillRun(requests=requests, min_idle_ms=min_idle_ms)
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        async with sem:
            t0 = time.perf_counter()
            r = await client.post(
                f"/v1/depth?format=npy&processing_res={RES}",
                content=images[i % len(images)],
                headers={"content-type": "image/png"},
            )
            run.latencies.append(time.perf_counter() - t0)
        done += 1
        if r.status_code != 200:
            run.errors[r.status_code] += 1
            return
        run.answered_ok += 1
        run.served_by[r.headers.get("x-worker", "?")] += 1
        got = np.load(io.BytesIO(r.content), allow_pickle=False)
        if not np.allclose(got, expected[i % len(expected)], atol=atol, rtol=0):
            run.wrong += 1

    async def killer() -> None:
        while done < kill_after:
            await asyncio.sleep(0.002)
        while (pending := await victim_pending()) == 0 and done < requests:
            await asyncio.sleep(0.002)
        os.kill(victim.pid, signal.SIGKILL)
        run.killed_after, run.in_flight_at_kill = done, pending

    kill_task = asyncio.create_task(killer())
    await asyncio.gather(*(one(i) for i in range(requests)))
    await kill_task
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--min-idle-ms", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(_main(args))
    return 0


async def _main(args: argparse.Namespace) -> None:
    import tempfile
    import uuid
    from pathlib import Path

    from load_tests.cluster import start_worker, stop
    from models.loading import load_model
    from models.spec import resolve_spec
    from models.tiny import make_tiny
    from service import codec
    from tests.redis_server import RedisServer, external_url
    from tests.service_harness import png_bytes, running_service, until_ready

    server = None if external_url() else RedisServer().start()
    url = external_url() or server.url
    prefix = f"chaos{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_tiny(Path(tmp) / "lotus-d-depth", "lotus-d", "depth"))
        model = load_model(resolve_spec(model_dir))
        images = [png_bytes(48, 64, seed=s) for s in range(8)]
        expected = [model.predict([codec.decode_image(i)], processing_res=RES)[0].array for i in images]
        env = {"DENSE_MIN_IDLE_MS": str(args.min_idle_ms)}
        # The victim waits long to fill big batches, so it always holds read-but-unanswered jobs when killed.
        workers = [
            start_worker(
                url, prefix, model_dir, "w0", DENSE_MAX_QUEUE_DELAY_MS="300", DENSE_MAX_BATCH_SIZE="64", **env
            ),
            start_worker(url, prefix, model_dir, "w1", **env),
        ]
        try:
            async with running_service(
                lambda *_: Path(model_dir),
                with_worker=False,
                wait_ready=False,
                queue="redis",
                redis_url=url,
                redis_prefix=prefix,
            ) as api:
                await until_ready(api.client, 180)
                while len(await api.app.state.broker.r.keys(f"{prefix}:worker:*")) < 2:
                    await asyncio.sleep(0.2)
                broker = api.app.state.broker

                async def pending_of_w0() -> int:
                    info = await broker.r.xpending_range(
                        f"{prefix}:jobs:lotus-d-depth", "workers", "-", "+", 100, consumername="w0"
                    )
                    return len(info)

                t0 = time.perf_counter()
                run = await kill_worker_run(
                    api.client,
                    workers[0],
                    pending_of_w0,
                    images,
                    expected,
                    args.requests,
                    args.concurrency,
                    min_idle_ms=args.min_idle_ms,
                )
                wall = time.perf_counter() - t0
                dup = api.app.state.broker.stats["late_or_duplicate_replies"]
        finally:
            for w in workers:
                stop(w)
    if server:
        server.close()
    header = [
        "requests",
        "answered ok",
        "lost",
        "wrong",
        "errors",
        "duplicate replies",
        "killed after (in flight)",
        "reclaimed",
        "p50 / p99 / max latency (ms)",
        "wall (s)",
        "served by",
    ]
    row = [
        run.requests,
        run.answered_ok,
        run.lost,
        run.wrong,
        dict(run.errors),
        dup,
        f"{run.killed_after} ({run.in_flight_at_kill})",
        run.reclaimed,
        f"{run.p(50):.0f} / {run.p(99):.0f} / {run.p(100):.0f}",
        f"{wall:.1f}",
        dict(run.served_by),
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
