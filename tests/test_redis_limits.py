"""The Redis path at its limits, against real redis-server processes and real `dense-serve` processes:
memory bounded by what is in flight at volume, a full Redis answered with a 503 that names memory and
recovered from by itself, passwords and TLS, and a hung worker (SIGSTOP) whose jobs move to another worker
and whose late answers are dropped."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from redis.exceptions import ConnectionError as RedisConnectionError

from load_tests.cluster import start_worker, stop
from load_tests.kill_worker import held_by
from models.outputs import Family, Task
from service.queue.redis.connection import ConnectionOptions
from tests.conftest import REPO
from tests.redis_server import RedisServer, TlsFiles, free_port, server_binary
from tests.service_harness import png_bytes, running_service, until_ready

pytestmark = pytest.mark.anyio
TinyDir = Callable[[Family, Task], Path]
MODEL = "lotus-d-depth"


def photo_png(seed: int, side: int = 300) -> bytes:
    """A noisy PNG of about 300 KB: the size of a phone photo's JPEG."""
    rgb = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def serve_process(model_dir: str, redis_url: str, prefix: str, **env: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--model", model_dir, "--port", str(port),
         "--queue", "redis", "--redis-url", redis_url],
        cwd=REPO,
        env={**os.environ, "DENSE_REDIS_PREFIX": prefix, "DENSE_GRPC_ENABLED": "false", "DENSE_LOG_LEVEL": "warning",
             **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(proc: subprocess.Popen[str], base: str, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        while time.monotonic() < end:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("server not ready")


@pytest.mark.heavy
async def test_800_photos_at_volume_keep_redis_memory_flat(tiny_dir: TinyDir, redis_prefix: str) -> None:
    """What the first release failed: 64 MB of Redis filled after ~50 requests. Now memory follows what is in
    flight, and comes back to where it started."""
    server = RedisServer(args=("--maxmemory", "64mb", "--maxmemory-policy", "noeviction")).start()
    proc, base = serve_process(str(tiny_dir("lotus-d", "depth")), server.url, redis_prefix)
    try:
        await wait_ready(proc, base)
        r = server.client()
        images = [photo_png(s) for s in range(16)]
        assert all(250_000 < len(i) < 350_000 for i in images)
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            await client.post("/v1/depth?processing_res=64", content=images[0], headers={"content-type": "image/png"})
            start = r.info("memory")["used_memory"]
            statuses: list[int] = []
            peak = start
            sem = asyncio.Semaphore(8)

            async def one(i: int) -> None:
                nonlocal peak
                async with sem:
                    resp = await client.post(
                        "/v1/depth?processing_res=64", content=images[i % 16], headers={"content-type": "image/png"}
                    )
                statuses.append(resp.status_code)
                if i % 50 == 0:
                    peak = max(peak, r.info("memory")["used_memory"])

            await asyncio.gather(*(one(i) for i in range(800)))
        assert statuses.count(200) == 800, {s: statuses.count(s) for s in set(statuses)}
        end = r.info("memory")["used_memory"]
        mb = [f"{v / 2**20:.1f} MB" for v in (start, peak, end)]
        print("Redis used_memory before / peak / after:", " / ".join(mb))  # pytest -s shows it
        assert end - start < 3 * 2**20, (start, end)  # back to within a few MB of the start
        assert peak < 32 * 2**20, peak  # never near the limit: 8 in flight are a few MB
        stream = f"{{{redis_prefix}}}:jobs:{MODEL}"
        assert r.xlen(stream) == 0  # acknowledged jobs are deleted, not left for MAXLEN to trim
        assert not r.keys(f"{{{redis_prefix}}}:result:*")  # no Idempotency-Key, nothing stored
    finally:
        stop(proc)
        server.close()


async def test_a_full_redis_is_a_503_that_names_memory_and_service_resumes(
    tiny_dir: TinyDir, redis_prefix: str
) -> None:
    server = RedisServer(args=("--maxmemory", "64mb", "--maxmemory-policy", "noeviction")).start()
    try:
        async with running_service(
            tiny_dir, models=[("lotus-d", "depth")], queue="redis", redis_url=server.url, redis_prefix=redis_prefix
        ) as h:
            assert (await h.client.post("/v1/depth", content=png_bytes(32, 32), headers=_PNG)).status_code == 200
            r = server.client()
            for i in range(8):  # something else takes 8 MB ...
                r.set(f"ballast{i}", b"x" * 2**20)
            r.config_set("maxmemory", "4mb")  # ... of a Redis that may hold 4: it is over maxmemory now
            assert r.info("memory")["used_memory"] > 4 * 2**20
            full = await h.client.post("/v1/depth", content=png_bytes(32, 32, seed=1), headers=_PNG)
            assert full.status_code == 503, full.text
            problem = full.json()
            assert "out of memory" in problem["detail"] and "maxmemory" in problem["detail"], problem
            assert full.headers["retry-after"].isdigit()
            assert h.app.state.broker.stats.rejected_out_of_memory >= 1
            r.delete(*r.keys("ballast*"))  # memory frees ...
            again = await h.client.post("/v1/depth", content=png_bytes(32, 32, seed=2), headers=_PNG)
            assert again.status_code == 200, again.text  # ... and the service resumes by itself
    finally:
        server.close()


_PNG = {"content-type": "image/png"}


def _worker_cli(redis_url: str, model_dir: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--redis-url", redis_url, "--model", model_dir],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_redis_with_a_password_refuses_a_wrong_or_missing_one_at_start_up(
    tiny_dir: TinyDir, redis_prefix: str
) -> None:
    server = RedisServer(password="s3cret-pw").start()
    model_dir = str(tiny_dir("lotus-d", "depth"))
    try:
        missing = _worker_cli(server.url, model_dir)
        assert missing.returncode == 2 and "needs a password" in missing.stderr, missing.stderr
        assert "DENSE_REDIS_PASSWORD" in missing.stderr
        wrong = _worker_cli(server.url, model_dir, DENSE_REDIS_PASSWORD="nope")
        assert wrong.returncode == 2 and "refused the password" in wrong.stderr, wrong.stderr
        assert "nope" not in wrong.stderr  # secrets never appear in messages
        async with running_service(
            tiny_dir,
            models=[("lotus-d", "depth")],
            queue="redis",
            redis_url=server.url,
            redis_password="s3cret-pw",
            redis_prefix=redis_prefix,
        ) as h:
            assert (await h.client.post("/v1/depth", content=png_bytes(32, 32), headers=_PNG)).status_code == 200
    finally:
        server.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
async def test_redis_over_tls_with_a_password(tiny_dir: TinyDir, redis_prefix: str, tmp_path: Path) -> None:
    tls = TlsFiles.make(tmp_path)
    try:
        server = RedisServer(password="tls-pw", tls=tls).start()
    except RuntimeError as exc:  # pragma: no cover - a redis-server built without TLS
        pytest.skip(f"{server_binary()} has no TLS support: {exc}")
    try:
        assert server.url.startswith("rediss://")
        async with running_service(
            tiny_dir,
            models=[("lotus-d", "depth")],
            queue="redis",
            redis_url=server.url,
            redis_password="tls-pw",
            redis_tls_ca_file=tls.ca,
            redis_prefix=redis_prefix,
        ) as h:
            assert (await h.client.post("/v1/depth", content=png_bytes(32, 32), headers=_PNG)).status_code == 200
        untrusted = _worker_cli(server.url, str(tiny_dir("lotus-d", "depth")), DENSE_REDIS_PASSWORD="tls-pw")
        assert untrusted.returncode != 0  # without the CA the server's certificate is not trusted
    finally:
        server.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
async def test_tls_refuses_a_trusted_certificate_made_out_to_another_host(tmp_path: Path) -> None:
    """The host name is checked, not only the CA: a certificate that our CA signed for another name is refused."""
    options: dict[str, tuple[RedisServer, ConnectionOptions]] = {}
    for name, names in (("right", "IP:127.0.0.1,DNS:localhost"), ("wrong", "DNS:redis.other.invalid")):
        (tmp_path / name).mkdir()
        tls = TlsFiles.make(tmp_path / name, names=names)
        try:
            server = RedisServer(tls=tls).start()
        except RuntimeError as exc:  # pragma: no cover - a redis-server built without TLS
            pytest.skip(f"{server_binary()} has no TLS support: {exc}")
        options[name] = (server, ConnectionOptions(server.url, tls_ca_file=tls.ca, op_timeout_s=5))
    try:
        good = options["right"][1].client()
        assert await good.ping()
        await good.aclose()
        bad = options["wrong"][1].client()
        with pytest.raises(RedisConnectionError, match=r"(?i)hostname|certificate|IP address mismatch"):
            await bad.ping()
        await bad.aclose()
    finally:
        for server, _ in options.values():
            server.close()


async def test_a_hung_worker_loses_its_jobs_to_another_and_its_late_answers_are_dropped(
    tiny_dir: TinyDir, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    model_dir = str(tiny_dir("lotus-d", "depth"))
    logs = {name: tmp_path / f"{name}.log" for name in ("hung", "ok")}
    # The victim's batch holds the device long enough to be caught in the middle of it.
    victim = start_worker(
        redis_url, redis_prefix, model_dir, "hung", log_file=logs["hung"], DENSE_MAX_QUEUE_DELAY_MS="200"
    )
    other = None
    try:
        async with running_service(
            tiny_dir, with_worker=False, wait_ready=False, queue="redis", redis_url=redis_url, redis_prefix=redis_prefix
        ) as api:
            await until_ready(api.client, 120)
            broker = api.app.state.broker
            images = [png_bytes(48, 64, seed=s) for s in range(6)]
            posts = [
                asyncio.create_task(
                    api.client.post(
                        "/v1/depth?format=npy&processing_res=64",
                        content=img,
                        headers={"content-type": "image/png", "x-request-id": f"hang-{i}"},
                    )
                )
                for i, img in enumerate(images)
            ]
            end = time.monotonic() + 30
            while not await held_by(broker, "hung"):
                assert time.monotonic() < end
                await asyncio.sleep(0.005)
            victim.send_signal(signal.SIGSTOP)  # hung: alive as a process, but not running
            stopped_at = time.monotonic()
            await asyncio.sleep(0.2)
            held = await held_by(broker, "hung")  # what it holds now, frozen (it may have read more meanwhile)
            other = start_worker(redis_url, redis_prefix, model_dir, "ok", log_file=logs["ok"])
            replies = await asyncio.gather(*posts)
            assert [r.status_code for r in replies] == [200] * 6
            held_answered = {r.headers["x-request-id"]: r.headers["x-worker"] for r in replies}
            assert all(held_answered[rid] == "ok" for rid in held), held_answered  # taken over by the other
            recovered = time.monotonic() - stopped_at
            assert recovered < 60, recovered  # the other worker's start-up (a minute at most) and one reaper pass
            victim.send_signal(signal.SIGCONT)  # it wakes up and answers what it held: dropped
            end = time.monotonic() + 30
            while "this reply is dropped" not in logs["hung"].read_text():
                assert time.monotonic() < end, logs["hung"].read_text()[-2000:]
                await asyncio.sleep(0.1)
            dropped = [
                json.loads(line)["message"]
                for line in logs["hung"].read_text().splitlines()
                if "this reply is dropped" in line
            ]
            assert 1 <= len(dropped) <= len(held)
            await asyncio.sleep(0.5)
            assert broker.stats.orphan_replies == 0  # no second answer reached the API
    finally:
        if victim.poll() is None:
            victim.send_signal(signal.SIGCONT)
        stop(victim)
        if other is not None:
            stop(other)


async def test_a_command_the_acl_denies_counts_as_missing(redis_prefix: str) -> None:
    """The start-up probe of optional commands (XACKDEL on Redis 8.2) reads a NOPERM as "not there", so the
    scripts fall back to what the user may run instead of failing on every answer."""
    from redis.asyncio import Redis

    from service.queue.redis.connection import _knows

    server = RedisServer().start()
    try:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all", "-xlen")
        r = Redis.from_url(f"redis://limited:pw@127.0.0.1:{server.port}/0")
        try:
            assert await _knows(r, "XRANGE", "{probe}:none", "-", "+")  # allowed and known
            assert not await _knows(r, "XLEN", "{probe}:none")  # known to Redis, denied to this user
            assert not await _knows(r, "NOSUCHCOMMAND", "x")
        finally:
            await r.aclose()
    finally:
        server.close()
