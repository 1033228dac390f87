"""The Python client's retries carry one Idempotency-Key per logical request, for `AsyncClient` as for `Client`:
a real HTTP server on loopback answers each request's first attempt 503 (Retry-After: 0), drops the connection
of its second without answering, and answers the third; it records every attempt's key. Every attempt of one
call must carry that call's key, and different calls different keys (else the server could compute a retried
request twice, or hand one request another's stored answer)."""

from __future__ import annotations

import asyncio
import io
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from dense_serve_client import AsyncClient, Client, RetryPolicy
from PIL import Image

#: Fast retries: the server's Retry-After is 0, and a dropped connection waits `backoff_s`.
QUICK = RetryPolicy(max_retries=4, backoff_s=0.01)
ATTEMPTS = 3  # 503, dropped, answered


@dataclass
class FlakyServer:
    """An HTTP/1.1 server (asyncio streams, keep-alive) in a thread of its own. Per Idempotency-Key: the first
    attempt gets a 503, the second a closed connection, the third a float32 NPY map whose every value is the
    request body's length (so an answer says which upload it belongs to)."""

    base: str = ""
    attempts: list[str | None] = field(default_factory=list)  # each attempt's key, in arrival order
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self) -> Counter[str | None]:
        with self._lock:
            return Counter(self.attempts)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client closed its connection
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                key = headers.get("idempotency-key")
                with self._lock:
                    self.attempts.append(key)
                    attempt = self.attempts.count(key)
                if attempt == 1:
                    problem = b'{"type":"about:blank","title":"not ready","status":503,"detail":"warming up"}'
                    writer.write(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
                        b"Retry-After: 0\r\nContent-Length: %d\r\n\r\n%s" % (len(problem), problem)
                    )
                elif attempt == 2:
                    return  # the connection drops: no answer at all
                else:
                    buf = io.BytesIO()
                    np.save(buf, np.full((4, 6), float(len(body)), np.float32))
                    npy = buf.getvalue()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-npy\r\nX-Output-Kind: depth\r\n"
                        b"X-Model: flaky\r\nContent-Length: %d\r\n\r\n%s" % (len(npy), npy)
                    )
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
def flaky() -> Iterator[FlakyServer]:
    server = FlakyServer()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def run() -> None:
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.base = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        started.set()
        async with listener:
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(10), "the test server did not start"
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def png(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def check(server: FlakyServer, images: list[bytes], results: list, named: str | None = None) -> None:
    """Each call: ATTEMPTS attempts, all with one key, its own; answered with its own upload's map."""
    seen = server.seen()
    assert None not in seen, seen  # every attempt carried a key
    assert sorted(seen.values()) == [ATTEMPTS] * len(images), seen  # one key per call, on each of its attempts
    if named is not None:
        assert seen[named] == ATTEMPTS, seen
    for image, result in zip(images, results, strict=True):
        assert result.attempts == ATTEMPTS
        assert np.array_equal(result.array, np.full((4, 6), float(len(image)), np.float32))


def test_async_client_retries_a_503_and_a_dropped_connection_with_one_key_per_call(flaky: FlakyServer) -> None:
    images = [png(24, 32, seed) for seed in range(3)]

    async def run() -> tuple[list, list]:
        async with AsyncClient(flaky.base, retry=QUICK) as client:
            together = await asyncio.gather(
                client.depth(images[0]),
                client.predict(images[1], "depth"),
                client.depth(images[2], idempotency_key="mine"),
            )
            many = [r async for r in client.predict_many(images[:2], concurrency=2)]
        return list(together), many

    together, many = asyncio.run(run())
    check(flaky, images + images[:2], together + many, named="mine")


def test_sync_client_retries_a_503_and_a_dropped_connection_with_one_key_per_call(flaky: FlakyServer) -> None:
    images = [png(24, 32, seed) for seed in range(3)]
    with Client(flaky.base, retry=QUICK) as client:
        results = [client.depth(images[0]), client.depth(images[1], idempotency_key="mine")]
        results += list(client.predict_many([images[2], images[0]], concurrency=2))
    check(flaky, [images[0], images[1], images[2], images[0]], results, named="mine")
