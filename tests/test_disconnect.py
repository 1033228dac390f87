"""A client that goes away is never computed: a raw socket closed against a real `dense-serve serve` process
(in-process queue and Redis), and a cancelled gRPC stream on Redis. The device is simulated (it sleeps per
batch) so that a job reliably waits behind another."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.outputs import Family, Task
from models.spec import ModelSpec
from service.grpc.stubs import dense_pb2 as pb
from service.grpc.stubs.dense_pb2_grpc import DenseServiceStub
from service.queue.redis import Keys
from tests.conftest import REPO
from tests.redis_server import free_port
from tests.service_harness import png_bytes, running_service

pytestmark = pytest.mark.anyio
TinyDir = Callable[[Family, Task], Path]
BATCH_MS = 1500


def metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


@contextmanager
def serve(tmp_path: Path, tiny_dir: TinyDir, prefix: str, *args: str) -> Iterator[str]:
    spec = tmp_path / "slow.toml"
    spec.write_text(
        f'id = "slow"\nsource = "{tiny_dir("lotus-d", "depth")}"\nbackend = "simulated"\n'
        f"simulated_batch_ms = {BATCH_MS}\nmax_batch_size = 1\nprocessing_res = 64\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--model", str(spec), "--port", str(port), *args],
        cwd=REPO,
        env={**os.environ, "DENSE_GRPC_ENABLED": "false", "DENSE_LOG_LEVEL": "warning", "DENSE_REDIS_PREFIX": prefix},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def raw_post(base: str, body: bytes, idempotency_key: str | None = None) -> socket.socket:
    """An HTTP request sent over a bare socket, left waiting for its answer."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    key = f"Idempotency-Key: {idempotency_key}\r\n" if idempotency_key else ""
    head = (
        f"POST /v1/depth?format=npy HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n{key}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


@pytest.mark.parametrize("queue", ["memory", "redis"])
async def test_a_client_that_closes_its_socket_is_never_computed(
    tmp_path: Path, tiny_dir: TinyDir, redis_url: str, redis_prefix: str, queue: str
) -> None:
    extra = ["--queue", "redis", "--redis-url", redis_url] if queue == "redis" else []
    with serve(tmp_path, tiny_dir, redis_prefix, *extra) as base:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            first = asyncio.create_task(
                client.post("/v1/depth", content=png_bytes(32, 32), headers={"content-type": "image/png"})
            )
            end = time.monotonic() + 30
            while metric(base, "dense_requests_in_flight") < 1:  # the first job holds the device
                assert time.monotonic() < end
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            sock = raw_post(base, png_bytes(40, 40, seed=2))
            while metric(base, "dense_requests_in_flight") < 2:  # the second waits behind it
                assert time.monotonic() < end
                await asyncio.sleep(0.02)
            sock.close()  # the client goes away
            assert (await first).status_code == 200
            while metric(base, "dense_jobs_total", model="slow", status="dropped") < 1:
                assert time.monotonic() < end, "the abandoned job was not dropped"
                await asyncio.sleep(0.05)
            await asyncio.sleep(BATCH_MS / 1000 + 0.3)  # had it been computed, it would have finished by now
            assert metric(base, "dense_batch_size_count", model="slow") == 1  # only the first job ran
            assert metric(base, "dense_request_duration_seconds_count", route="/v1/depth", status="499") == 1


@pytest.mark.parametrize("queue", ["memory", "redis"])
async def test_a_client_with_an_idempotency_key_that_drops_its_connection_gets_the_answer_on_retry(
    tmp_path: Path, tiny_dir: TinyDir, redis_url: str, redis_prefix: str, queue: str
) -> None:
    """Its client will retry, so the job is kept (not withdrawn), and the retry is answered without computing
    again."""
    extra = ["--queue", "redis", "--redis-url", redis_url] if queue == "redis" else []
    image = png_bytes(40, 40, seed=3)
    with serve(tmp_path, tiny_dir, redis_prefix, *extra) as base:
        sock = raw_post(base, image, idempotency_key="order-77")
        end = time.monotonic() + 30
        while metric(base, "dense_requests_in_flight") < 1:
            assert time.monotonic() < end
            await asyncio.sleep(0.02)
        sock.close()  # the connection drops while the job waits or computes
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            retry = await client.post(
                "/v1/depth?format=npy",
                content=image,
                headers={"content-type": "image/png", "idempotency-key": "order-77"},
            )
        assert retry.status_code == 200, retry.text
        assert metric(base, "dense_batch_size_count", model="slow") == 1  # computed once, for both attempts
        assert metric(base, "dense_jobs_total", model="slow", status="dropped") == 0


async def test_a_cancelled_grpc_stream_on_redis_leaves_nothing_to_compute(
    tiny_dir: TinyDir, redis_url: str, redis_prefix: str
) -> None:
    source = str(tiny_dir("lotus-d", "depth"))
    # Each frame computes for 2 s: the cancel has that long to travel client -> front-end -> Redis -> worker
    # before a third frame would start (600 ms was too short once under full-suite load: 3 forwards).
    spec = ModelSpec(
        id="slow", source=source, backend="simulated", simulated_batch_ms=2000, max_batch_size=1, processing_res=64
    )
    async with running_service(
        tiny_dir,
        specs=[spec],
        queue="redis",
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        grpc_enabled=True,
        grpc_port=0,
    ) as h:
        stats = h.worker.stats
        async with grpc.aio.insecure_channel(f"127.0.0.1:{h.app.state.grpc.port}") as channel:
            stub = DenseServiceStub(channel)
            image = png_bytes(48, 48)
            answered = asyncio.Event()

            async def frames() -> AsyncIterator[pb.StreamRequest]:
                yield pb.StreamRequest(config=pb.StreamConfig(max_in_flight=6))
                for i in range(6):
                    yield pb.StreamRequest(frame=pb.PredictRequest(encoded=image, frame_id=i, model="slow"))
                await answered.wait()
                await asyncio.sleep(3600)  # the robot keeps the stream open until it cancels

            call = stub.StreamPredict(frames())
            assert (await call.read()).frame_id == 0
            answered.set()
            call.cancel()
        # The front-end marks each withdrawn frame's job cancelled in Redis; from then on a worker drops them.
        # How long that takes is the machine's business (seconds under full-suite load), so the count of
        # forwards is taken once the marks are there, not after a fixed time.
        r, markers = h.app.state.broker.r, Keys(redis_prefix).tag + ":cancel:*"
        end = time.monotonic() + 30
        while not await r.keys(markers):
            assert time.monotonic() < end, "no frame was withdrawn"
            await asyncio.sleep(0.02)
        forwards_at_cancel = stats.forwards["slow"]
        while sum(n for (model, _), n in stats.outcomes.items() if model == "slow") < 6:  # every frame settled
            assert time.monotonic() < end, dict(stats.outcomes)
            await asyncio.sleep(0.05)
        # At most the frame computing when the marks landed finishes after them; nothing else starts.
        assert stats.forwards["slow"] <= forwards_at_cancel + 1, (forwards_at_cancel, stats.forwards)
        # Frame 0 answered (and any frame computed before the marks landed); every other frame dropped: before
        # compute, or after it and before encoding.
        ok, dropped = stats.outcomes[("slow", "ok")], stats.outcomes[("slow", "dropped")]
        assert 1 <= ok <= forwards_at_cancel and ok + dropped == 6, dict(stats.outcomes)
