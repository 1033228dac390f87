"""A burst against a healthy Redis is slowness, never an outage: 128 uploads at once to one `dense-serve api`
process with two `dense-serve worker` processes (simulated device) get 200s, or 429 once the queue is full,
and never a 503 that calls Redis unreachable. A stopped Redis is still a 503 within a second (below, and
`test_redis_queue.py::test_redis_outage_gives_fast_503s_and_recovers` for the embedded service).

Underneath (`ConnectionOptions.client`): commands beyond the pool's size wait for a connection (redis-py's own
pool refused the 101st with "Too many connections"), and a read whose reply comes late is sent once more while a
write that may have taken effect (XADD) is not: shown on a real Redis paused with CLIENT PAUSE."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from load_tests.cluster import start_worker, stop
from models.outputs import Family, Task
from service import codec
from service.queue.redis.connection import ConnectionOptions
from tests.conftest import REPO
from tests.redis_server import RedisServer, free_port
from tests.service_harness import png_bytes, read_npy

pytestmark = pytest.mark.anyio
TinyDir = Callable[[Family, Task], Path]
BURST = 128
MAX_JOBS = 96  # below the burst: a 429 is possible when the workers fall behind
RES = 64


def spec_file(tmp_path: Path, tiny_dir: TinyDir) -> Path:
    """A simulated device (50 ms a batch of up to 16): the serving path is real, the model's work a sleep."""
    spec = tmp_path / "sim.toml"
    spec.write_text(
        f'id = "sim"\nsource = "{tiny_dir("lotus-d", "depth")}"\nbackend = "simulated"\n'
        f"simulated_batch_ms = 50\nmax_batch_size = 16\nprocessing_res = {RES}\n"
    )
    return spec


def jpeg_bytes(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(h, w, seed=seed))).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def wait_ready(base: str, proc: subprocess.Popen[str], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "the API process exited"
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base} not ready within {timeout_s} s")


@contextmanager
def api_process(redis_url: str, prefix: str, **env: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`dense-serve api --queue redis` on a free loopback port (REST only, open: loopback)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "api", "--redis-url", redis_url, "--port", str(port), "--no-auth"],
        cwd=REPO,
        env={
            **os.environ,
            "DENSE_REDIS_PREFIX": prefix,
            "DENSE_GRPC_ENABLED": "false",
            "DENSE_LOG_LEVEL": "warning",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc)


async def test_a_burst_of_128_uploads_on_a_healthy_redis_is_never_a_503(
    tmp_path: Path, tiny_dir: TinyDir, redis_url: str, redis_prefix: str
) -> None:
    from models.loading import load_model
    from models.spec import resolve_spec

    spec = spec_file(tmp_path, tiny_dir)
    workers = [start_worker(redis_url, redis_prefix, str(spec), f"burst-{i}") for i in range(2)]
    try:
        with api_process(redis_url, redis_prefix, DENSE_QUEUE_MAX_JOBS=str(MAX_JOBS)) as (base, proc):
            images = [png_bytes(96, 128, seed=i) if i % 2 else jpeg_bytes(96, 128, seed=i) for i in range(BURST)]
            model = load_model(resolve_spec(str(spec)).model_copy(update={"simulated_batch_ms": 0.0}))
            expected = [model.predict([codec.decode_image(i)], processing_res=RES)[0].array for i in images]
            wait_ready(base, proc, 120)
            limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
            async with httpx.AsyncClient(base_url=base, timeout=50, limits=limits) as client:
                load = os.getloadavg()[0]
                t0 = time.monotonic()
                replies = await asyncio.gather(
                    *(
                        client.post(
                            "/v1/depth?model=sim&format=npy",
                            content=image,
                            headers={"content-type": "image/png" if i % 2 else "image/jpeg"},
                        )
                        for i, image in enumerate(images)
                    )
                )
                wall = time.monotonic() - t0
            statuses = Counter(r.status_code for r in replies)
            print(f"burst of {BURST}: {dict(statuses)} in {wall:.2f} s, load {load:.2f} -> {os.getloadavg()[0]:.2f}")
            problems = {r.status_code: r.text[:300] for r in replies if r.status_code != 200}
            assert set(statuses) <= {200, 429}, problems
            assert statuses[200] >= BURST // 2, problems  # the workers keep up with most of it
            for image, want, r in zip(images, expected, replies, strict=True):
                if r.status_code == 200:
                    np.testing.assert_allclose(read_npy(r.content), want, atol=1e-5)
                else:
                    assert r.json()["type"].endswith("/queue_full") and "retry-after" in r.headers, r.text
                del image
            assert wall < 40, wall
    finally:
        for w in workers:
            stop(w)


async def test_a_stopped_redis_is_a_503_within_a_second(tmp_path: Path, tiny_dir: TinyDir, redis_prefix: str) -> None:
    """The other side of the same timeouts: a Redis that is gone (connection refused) is an outage at once."""
    server = RedisServer().start()
    spec = spec_file(tmp_path, tiny_dir)
    worker = start_worker(server.url, redis_prefix, str(spec), "outage-0")
    try:
        with api_process(server.url, redis_prefix) as (base, proc):
            wait_ready(base, proc, 120)
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                ok = await client.post(
                    "/v1/depth?model=sim", content=png_bytes(32, 32), headers={"content-type": "image/png"}
                )
                assert ok.status_code == 200, ok.text
                server.stop()
                for seed in range(3):  # each: refused at once, none waits out a timeout or a retry
                    t0 = time.monotonic()
                    r = await client.post(
                        "/v1/depth?model=sim",
                        content=png_bytes(32, 32, seed=seed),
                        headers={"content-type": "image/png"},
                    )
                    took = time.monotonic() - t0
                    assert r.status_code == 503, r.text
                    assert "unreachable" in r.json()["detail"], r.text
                    assert took < 1.0, took
    finally:
        stop(worker)
        server.close()


async def test_more_commands_than_connections_wait_for_one(redis_url: str, redis_prefix: str) -> None:
    """300 commands at once on a pool of 64: all answered, no 'Too many connections', no more than 64 opened."""
    r = ConnectionOptions(redis_url).client()
    try:
        key = f"{redis_prefix}:k"
        await r.set(key, b"v", ex=60)
        replies = await asyncio.gather(*(r.get(key) for _ in range(300)))
        assert replies == [b"v"] * 300
        pool = r.connection_pool
        assert len(pool._in_use_connections) + len(pool._available_connections) <= pool.max_connections == 64
    finally:
        await r.aclose()


async def test_a_late_reply_is_read_again_but_a_write_is_not_repeated(redis_prefix: str) -> None:
    """A Redis that answers late (CLIENT PAUSE: alive, slow) against reply timeouts of 0.5 s: a GET that times out
    is sent again and answered; an XADD that times out raises (its fate is the caller's to settle), and is never
    sent twice. A refused connection fails at once."""
    server = RedisServer().start()  # its own: CLIENT PAUSE stops every client of the server
    r = ConnectionOptions(server.url, op_timeout_s=0.5, reply_timeout_s=0.5).client()
    admin = Redis.from_url(server.url)
    try:
        key, stream = f"{redis_prefix}:k", f"{redis_prefix}:s"
        await r.set(key, b"v")
        await admin.execute_command("CLIENT", "PAUSE", 750, "ALL")
        t0 = time.monotonic()
        assert await r.get(key) == b"v"
        assert 0.5 <= time.monotonic() - t0 < 1.0  # one timeout, then the second try's answer
        await asyncio.sleep(0.1)
        await admin.execute_command("CLIENT", "PAUSE", 750, "ALL")
        with pytest.raises(RedisTimeoutError):
            await r.xadd(stream, {b"job": b"1"})
        await asyncio.sleep(0.5)  # the pause is over: a second XADD would have been answered by now
        assert await r.xlen(stream) <= 1
    finally:
        await r.aclose()
        await admin.aclose()
        server.close()
    gone = ConnectionOptions(f"redis://127.0.0.1:{free_port()}/0").client()
    try:
        t0 = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await gone.get("k")
        assert time.monotonic() - t0 < 0.5
    finally:
        await gone.aclose()
