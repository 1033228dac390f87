"""Soak: steady load for minutes on default settings while workers are killed and Redis restarts.

    .venv/bin/python -m load_tests.soak [--minutes 10] [--concurrency 4] [--kill-every 60]   (make soak)

A private Redis (`maxmemory 256mb`, `noeviction`, no persistence, as a cache-only deployment runs it), two
`dense-serve worker` processes on a tiny checkpoint with every setting at its default, and an API instance
in this process. Clients keep `--concurrency` requests in flight, each with an Idempotency-Key, and retry a
503 or 429 after its Retry-After, as a well-behaved client does (a Redis restart drops what it held: the API
answers those requests 503 at once). Every `--kill-every` seconds one worker is `kill -9`ed and restarted
under the same name; halfway through, Redis is restarted. Reported: requests, correct answers, retries, lost
(a request without a correct answer within its retry budget; must be 0), latency percentiles, and Redis
`used_memory` over time (should be flat). Loopback only; bounded by `--minutes`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import signal
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

RES = 64
MODEL = "lotus-d-depth"


@dataclass
class Soak:
    sent: int = 0
    correct: int = 0
    wrong: int = 0
    retries: Counter[int] = field(default_factory=Counter)
    lost: int = 0
    latencies: list[float] = field(default_factory=list)
    memory: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, used_memory)
    events: list[tuple[float, str]] = field(default_factory=list)

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000.0 if self.latencies else float("nan")


async def client_loop(
    client: httpx.AsyncClient, soak: Soak, images: list[bytes], expected: list[np.ndarray], stop: float, worker: int
) -> None:
    i = worker
    while time.monotonic() < stop:
        i += 1000
        key = uuid.uuid4().hex
        t0 = time.perf_counter()
        soak.sent += 1
        for _attempt in range(30):  # bounded retries: about a minute of backoff at most
            try:
                r = await client.post(
                    f"/v1/depth?format=npy&processing_res={RES}",
                    content=images[i % len(images)],
                    headers={"content-type": "image/png", "idempotency-key": key},
                )
            except httpx.HTTPError:
                soak.retries[0] += 1
                await asyncio.sleep(1.0)
                continue
            if r.status_code in (429, 503):
                soak.retries[r.status_code] += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                continue
            break
        else:
            soak.lost += 1
            continue
        soak.latencies.append(time.perf_counter() - t0)
        if r.status_code != 200:
            soak.lost += 1
            continue
        got = np.load(io.BytesIO(r.content), allow_pickle=False)
        if np.allclose(got, expected[i % len(expected)], atol=1e-5, rtol=0):
            soak.correct += 1
        else:
            soak.wrong += 1
            soak.lost += 1


async def run(args: argparse.Namespace) -> Soak:
    from load_tests.cluster import start_worker, stop
    from models.loading import load_model
    from models.spec import resolve_spec
    from models.tiny import make_tiny
    from service import codec
    from tests.redis_server import RedisServer
    from tests.service_harness import png_bytes, running_service, until_ready

    soak = Soak()
    server = RedisServer(args=("--maxmemory", "256mb", "--maxmemory-policy", "noeviction")).start()
    prefix = f"soak{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_tiny(Path(tmp) / MODEL, "lotus-d", "depth"))
        model = load_model(resolve_spec(model_dir))
        images = [png_bytes(96, 128, seed=s) for s in range(8)]
        expected = [model.predict([codec.decode_image(im)], processing_res=RES)[0].array for im in images]
        names = ["w0", "w1"]
        workers = {n: start_worker(server.url, prefix, model_dir, n) for n in names}
        redis = [server.client()]  # replaced when Redis restarts
        start = time.monotonic()
        try:
            async with running_service(
                lambda *_: Path(model_dir),
                with_worker=False,
                wait_ready=False,
                queue="redis",
                redis_url=server.url,
                redis_prefix=prefix,
            ) as api:
                await until_ready(api.client, 180)
                end = time.monotonic() + args.minutes * 60
                start = time.monotonic()

                async def chaos() -> None:
                    victim = 0
                    restarted_redis = False
                    next_kill = start + args.kill_every
                    while time.monotonic() < end:
                        await asyncio.sleep(1.0)
                        now = time.monotonic()
                        with contextlib.suppress(Exception):  # Redis is restarting
                            soak.memory.append((now - start, int(redis[0].info("memory")["used_memory"])))
                        if not restarted_redis and now - start >= args.minutes * 30:
                            server.stop()
                            server.start()
                            redis[0] = server.client()
                            soak.events.append((now - start, "Redis restarted"))
                            restarted_redis = True
                        if now >= next_kill:
                            name = names[victim % 2]
                            workers[name].send_signal(signal.SIGKILL)
                            workers[name].wait()
                            workers[name] = start_worker(server.url, prefix, model_dir, name)
                            soak.events.append((now - start, f"kill -9 {name}, restarted"))
                            victim += 1
                            next_kill += args.kill_every

                tasks = [client_loop(api.client, soak, images, expected, end, w) for w in range(args.concurrency)]
                await asyncio.gather(chaos(), *tasks)
        finally:
            for w in workers.values():
                stop(w)
            server.close()
    return soak


def report(soak: Soak, args: argparse.Namespace) -> str:
    by_minute: dict[int, list[int]] = {}
    for t, used in soak.memory:
        by_minute.setdefault(int(t // 60), []).append(used)
    lines = [
        f"{args.minutes} min, concurrency {args.concurrency}, a worker killed every {args.kill_every} s, Redis "
        "restarted once, default settings",
        "",
        "| requests | correct | lost | wrong | retries (503 / 429 / transport) | p50 / p99 / max (ms) |",
        "|---:|---:|---:|---:|---|---|",
        f"| {soak.sent} | {soak.correct} | {soak.lost} | {soak.wrong} | {soak.retries[503]} / {soak.retries[429]} / "
        f"{soak.retries[0]} | {soak.p(50):.0f} / {soak.p(99):.0f} / {soak.p(100):.0f} |",
        "",
        "| minute | Redis used_memory, min / median / max (MB) |",
        "|---:|---|",
    ]
    for minute, values in sorted(by_minute.items()):
        mb = [v / 2**20 for v in values]
        lines.append(f"| {minute} | {min(mb):.1f} / {statistics.median(mb):.1f} / {max(mb):.1f} |")
    lines += ["", "Events: " + "; ".join(f"{t:.0f} s {what}" for t, what in soak.events)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--kill-every", type=float, default=60.0)
    ap.add_argument("--out", help="also write the Markdown here")
    args = ap.parse_args()
    soak = asyncio.run(run(args))
    text = report(soak, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if soak.lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
