"""Run the real embedded service (in-process broker + worker + FastAPI app) for tests, over an ASGI client."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI
from PIL import Image

from models.outputs import Family, Task
from models.spec import ModelSpec
from service.config import Settings
from service.jobs import Job, Reply
from service.processes import build_app
from service.worker.worker import Worker

DEFAULT_MODELS: list[tuple[Family, Task]] = [("lotus-g", "depth"), ("lotus-g", "normals"), ("lotus-d", "depth")]
TEST_RES = 64


@dataclass
class Harness:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def worker(self) -> Worker:
        return self.app.state.worker


def specs_for(tiny_dir: Callable[[Family, Task], Path], models: list[tuple[Family, Task]]) -> list[ModelSpec]:
    return [
        ModelSpec(id=f"{family}-{task}", source=str(tiny_dir(family, task)), processing_res=TEST_RES)
        for family, task in models
    ]


@asynccontextmanager
async def running_service(
    tiny_dir: Callable[[Family, Task], Path],
    models: list[tuple[Family, Task]] = DEFAULT_MODELS,
    wait_ready: bool = True,
    specs: list[ModelSpec] | None = None,
    with_worker: bool = True,
    **settings: Any,
) -> AsyncIterator[Harness]:
    """Serve `models` (tiny checkpoints, processing_res 64), or exactly `specs` when given. Without a worker
    it is an API instance only (for the Redis queue, where worker processes join)."""
    cfg = Settings(**{"grpc_enabled": False, **settings})
    chosen = specs if specs is not None else specs_for(tiny_dir, models)
    app = build_app(cfg, chosen if with_worker or specs is not None else [], with_worker=with_worker)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            harness = Harness(app, client, cfg)
            if wait_ready:
                await until_ready(client)
            yield harness


async def until_ready(client: httpx.AsyncClient, timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if (await client.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("service not ready")


@dataclass
class ModelCalls:
    """Every UNet forward pass of one served model, as the `(batch, height, width)` of its latent input, in call
    order: what the model really computed, whatever the lane's own counters say."""

    calls: list[tuple[int, int, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, sample: object) -> None:
        shape = tuple(sample.shape)  # type: ignore[attr-defined]
        with self._lock:
            self.calls.append((int(shape[0]), int(shape[-2]), int(shape[-1])))

    def images(self, hw: tuple[int, int] | None = None) -> int:
        """Images computed (the batch sizes summed), only those with latent size `hw` when given."""
        with self._lock:
            return sum(b for b, h, w in self.calls if hw is None or (h, w) == hw)

    def shapes(self) -> set[tuple[int, int]]:
        with self._lock:
            return {(h, w) for _, h, w in self.calls}


@contextmanager
def model_calls(h: Harness, model_id: str) -> Iterator[ModelCalls]:
    """Count the served model's real UNet calls (a forward hook on the module the worker runs) while inside."""
    runtime = h.worker.served[model_id].predictor.runtime
    core = getattr(runtime, "core", None)
    if core is None:
        raise TypeError(f"{model_id} runs on {type(runtime).__name__}: model calls are counted on the torch runtime")
    seen = ModelCalls()
    handle = core.unet.register_forward_hook(lambda _module, args, _output: seen.record(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


@dataclass
class Submissions:
    """Jobs the front-end handed to the queue, in order, and the same jobs in the order their answers came."""

    jobs: list[Job] = field(default_factory=list)
    answered: list[Job] = field(default_factory=list)


@contextmanager
def submitted_jobs(h: Harness) -> Iterator[Submissions]:
    """Observe the real broker's `submit` while inside: what was queued, and when each answer came back."""
    broker = h.app.state.broker
    real = broker.submit
    seen = Submissions()

    async def observed(job: Job, idempotency_key: str | None = None) -> Reply:
        seen.jobs.append(job)
        reply = await real(job, idempotency_key)
        seen.answered.append(job)
        return reply

    broker.submit = observed
    try:
        yield seen
    finally:
        del broker.submit  # the class's method again


def png_bytes(h: int, w: int, seed: int = 0, value: float | None = None) -> bytes:
    """A real PNG image: smooth random colours (or one flat value)."""
    if value is not None:
        arr = np.full((h, w, 3), round(value * 255), dtype=np.uint8)
    else:
        rng = np.random.default_rng(seed)
        small = rng.integers(0, 256, (max(2, h // 4), max(2, w // 4), 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def read_png16(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64) / 65535.0


def read_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
