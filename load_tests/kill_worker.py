"""Chaos run: kill -9 one of two worker processes in the middle of a loaded run, on default settings, and count
what happened. Every request must get exactly one correct answer; none may be lost.

    .venv/bin/python -m load_tests.kill_worker [--requests 200] [--concurrency 16]   (make chaos)

Starts its own Redis (or uses REDIS_URL), two `dense-serve worker` processes on a tiny checkpoint, and an
API instance in this process. Counted, not inferred: `lost` is requests without a correct answer; `reclaimed`
comes from the surviving worker's own log of what it claimed; `duplicates` are jobs both workers computed
(at-least-once delivery: the victim may have computed a batch it never acknowledged), from the workers' logs
of every batch; `recovery` is the time from the kill to the answer of each job the victim held.
Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

RES = 64
MODEL = "lotus-d-depth"


@dataclass
class KillRun:
    requests: int
    correct: int = 0
    wrong: int = 0
    errors: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    served_by: Counter[str] = field(default_factory=Counter)
    killed_after: int = 0
    victim_requests: list[str] = field(default_factory=list)  # held (read, unanswered) by the victim when killed
    recovery_s: dict[str, float] = field(default_factory=dict)  # from the kill to the answer, for those
    reclaimed: int = 0
    duplicates: int = 0

    @property
    def lost(self) -> int:
        """Requests without a correct answer: errors, timeouts and wrong maps alike."""
        return self.requests - self.correct

    @property
    def worst_recovery_s(self) -> float:
        return max(self.recovery_s.values(), default=0.0)

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000.0 if self.latencies else float("nan")


async def kill_worker_run(
    client: httpx.AsyncClient,
    victim: subprocess.Popen[str],
    victim_requests: Callable[[], Awaitable[list[str]]],
    images: list[bytes],
    expected: list[np.ndarray],
    requests: int = 200,
    concurrency: int = 16,
    kill_after: int = 40,
    atol: float = 1e-5,
) -> KillRun:
    """Send `requests` at `concurrency`, each with its own X-Request-ID; once `kill_after` are answered,
    SIGKILL the victim at a moment it holds jobs it has read but not acknowledged."""
    run = KillRun(requests=requests)
    sem = asyncio.Semaphore(concurrency)
    answered_at: dict[str, float] = {}
    kill_time = 0.0
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        rid = f"chaos-{i}"
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    f"/v1/depth?format=npy&processing_res={RES}",
                    content=images[i % len(images)],
                    headers={"content-type": "image/png", "x-request-id": rid},
                )
            except httpx.HTTPError:
                run.errors[0] += 1
                return
            finally:
                done += 1
            answered_at[rid] = time.monotonic()
            run.latencies.append(time.perf_counter() - t0)
        if r.status_code != 200:
            run.errors[r.status_code] += 1
            return
        run.served_by[r.headers.get("x-worker", "?")] += 1
        got = np.load(io.BytesIO(r.content), allow_pickle=False)
        if np.allclose(got, expected[i % len(expected)], atol=atol, rtol=0):
            run.correct += 1
        else:
            run.wrong += 1

    async def killer() -> None:
        nonlocal kill_time
        while done < kill_after:
            await asyncio.sleep(0.002)
        while not (held := await victim_requests()) and done < requests:
            await asyncio.sleep(0.002)
        os.kill(victim.pid, signal.SIGKILL)
        kill_time = time.monotonic()
        run.killed_after, run.victim_requests = done, held

    kill_task = asyncio.create_task(killer())
    await asyncio.gather(*(one(i) for i in range(requests)))
    await kill_task
    run.recovery_s = {r: answered_at[r] - kill_time for r in run.victim_requests if r in answered_at}
    return run


def count_from_logs(run: KillRun, logs: dict[str, Path]) -> None:
    """Reclaims and duplicate computations, from the workers' JSON logs (name -> file)."""
    computed: Counter[str] = Counter()
    for path in logs.values():
        for line in path.read_text().splitlines():
            try:
                message = json.loads(line).get("message", "")
            except ValueError:
                continue
            if message.startswith("computing ") and "requests: " in message:
                computed.update(r for r in message.split("requests: ", 1)[1].split(",") if r.startswith("chaos-"))
            elif message.startswith("reclaimed job ") and "(request chaos-" in message:
                run.reclaimed += 1
    run.duplicates = sum(1 for n in computed.values() if n > 1)


async def held_by(broker, consumer: str) -> list[str]:
    """Request ids of the jobs a worker has read and not acknowledged."""
    stream = broker.keys.jobs(MODEL)
    pending = await broker.r.xpending_range(stream, "workers", "-", "+", 256, consumername=consumer)
    held = []
    for p in pending:
        entries = await broker.r.xrange(stream, min=p["message_id"], max=p["message_id"])
        if entries:
            held.append(json.loads(entries[0][1][b"job"])["request_id"])
    return held


def table(run: KillRun, wall_s: float) -> str:
    header = [
        "requests", "correct", "lost", "wrong", "errors", "killed after", "victim held", "reclaimed",
        "duplicates", "recovery max (s)", "p50 / p99 / max latency (ms)", "wall (s)", "served by",
    ]  # fmt: skip
    row = [
        run.requests, run.correct, run.lost, run.wrong, dict(run.errors), run.killed_after,
        len(run.victim_requests), run.reclaimed, run.duplicates, f"{run.worst_recovery_s:.1f}",
        f"{run.p(50):.0f} / {run.p(99):.0f} / {run.p(100):.0f}", f"{wall_s:.1f}", dict(run.served_by),
    ]  # fmt: skip
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(map(str, row)) + " |"]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(_main(args))
    return 0


async def _main(args: argparse.Namespace) -> None:
    import tempfile
    import uuid

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
        model_dir = str(make_tiny(Path(tmp) / MODEL, "lotus-d", "depth"))
        model = load_model(resolve_spec(model_dir))
        images = [png_bytes(48, 64, seed=s) for s in range(8)]
        expected = [model.predict([codec.decode_image(i)], processing_res=RES)[0].array for i in images]
        logs = {name: Path(tmp) / f"{name}.log" for name in ("w0", "w1")}
        workers = [start_worker(url, prefix, model_dir, name, log_file=logs[name]) for name in ("w0", "w1")]
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
                broker = api.app.state.broker
                while len(await broker.r.keys(broker.keys.workers_pattern())) < 2:
                    await asyncio.sleep(0.2)
                t0 = time.perf_counter()
                run = await kill_worker_run(
                    api.client,
                    workers[0],
                    lambda: held_by(broker, "w0"),
                    images,
                    expected,
                    args.requests,
                    args.concurrency,
                )
                wall = time.perf_counter() - t0
        finally:
            for w in workers:
                stop(w)
        count_from_logs(run, logs)
    if server:
        server.close()
    print(table(run, wall))


if __name__ == "__main__":
    raise SystemExit(main())
