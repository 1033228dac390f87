"""`Client` and `AsyncClient`: the REST API as methods that take an image and return a numpy map.

Parameters have the REST API's names and meanings (one vocabulary with the server, its gRPC API and its CLI):

- `model`: model id (`models()` lists them); default: the first model serving the task;
- `processing_res`: long edge the model sees, a multiple of 8; `0` = the input's native size; default: the model's;
- `match_input_resolution`: resize the map back to the input size (server default `True`);
- `seed`: Lotus-G / Marigold noise seed (default 0); `steps`: denoising steps (single-step families always take
  1; multi-step ones also take `"auto"`: the most steps that fit `timeout_ms`); `ensemble_size`: Marigold members
  ensembled as diffusers does (multi-step families only);
- `uncertainty` (depth and normals of a multi-step model): `"steps"` returns the step-change uncertainty of the
  run with the map (an `UncertaintyPrediction`; no extra UNet call, a few VAE decodes);
- `timeout_ms`: the server's deadline; past it the answer is `DeadlineExceeded` and the job is never computed;
- uncertainty only: `task` (`depth` or `normals`), `seeds` (ensemble size, 2-32, default 8), `reduction`
  (`mean` or `median`), `return_members`, `method` (`seeds`, and for Marigold `steps` or `diffusers`);
- `format`: the wire format the client decodes, `npy` (float32, exact, default) or `png` (16-bit; smaller).

A value the server refuses raises `InvalidParameter` naming the field. 429 and 503 answers are retried
(honouring `Retry-After`) with the same `Idempotency-Key`, so the server computes a request at most once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import httpx

from dense_serve_client._core import (
    DEFAULT_TIMEOUT_S,
    AnswerUncertainty,
    Core,
    Done,
    Kind,
    Outcome,
    Plan,
    RetryPolicy,
    Sleep,
    Steps,
    Task,
    UncertaintyMethod,
    Window,
    WireFormat,
    advance,
    arguments,
    health_plan,
    models_plan,
)
from dense_serve_client.images import ImageInput
from dense_serve_client.results import Health, ModelInfo, Prediction, UncertaintyPrediction

DEFAULT_URL = "http://127.0.0.1:8000"
T = TypeVar("T")


class Client(Core):
    """A blocking client with a pooled connection per host (thread-safe: `predict_many` uses it from threads).

    `api_key` is sent as `Authorization: Bearer KEY`; `timeout` (seconds) bounds each HTTP exchange (raised to
    outlast a request's own `timeout_ms`); `retry` is the `RetryPolicy` of 429/503 answers; `compress` asks
    for zstd/gzip answers (for slow links only); `idempotency=False` stops sending an `Idempotency-Key` (the
    server then keeps no answer for a retry, and a retried request might be computed twice).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        compress: bool = False,
        idempotency: bool = True,
        headers: dict[str, str] | None = None,
        max_connections: int = 64,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retry, compress, idempotency, headers)
        self._http = httpx.Client(transport=transport, **self._http_options(max_connections))

    # ---- predictions
    def depth(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        processing_res: int | None = None,
        match_input_resolution: bool | None = None,
        seed: int | None = None,
        steps: Steps | None = None,
        ensemble_size: int | None = None,
        uncertainty: AnswerUncertainty | None = None,
        timeout_ms: int | None = None,
        format: WireFormat = "npy",
        idempotency_key: str | None = None,
    ) -> Prediction:
        """Depth (or disparity: `.kind` says which) as float32 `[H, W]`. With `uncertainty="steps"`: an
        `UncertaintyPrediction` carrying the run's step-change uncertainty."""
        return self._drive(self._prediction("depth", *arguments(locals())))

    def normals(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        processing_res: int | None = None,
        match_input_resolution: bool | None = None,
        seed: int | None = None,
        steps: Steps | None = None,
        ensemble_size: int | None = None,
        uncertainty: AnswerUncertainty | None = None,
        timeout_ms: int | None = None,
        format: WireFormat = "npy",
        idempotency_key: str | None = None,
    ) -> Prediction:
        """Unit surface normals as float32 `[H, W, 3]`. With `uncertainty="steps"`: an
        `UncertaintyPrediction` carrying the run's step-change uncertainty."""
        return self._drive(self._prediction("normals", *arguments(locals())))

    def uncertainty(
        self,
        image: ImageInput,
        *,
        task: Task = "depth",
        seeds: int | None = None,
        reduction: str | None = None,
        return_members: bool | None = None,
        method: UncertaintyMethod | None = None,
        model: str | None = None,
        processing_res: int | None = None,
        match_input_resolution: bool | None = None,
        seed: int | None = None,
        steps: Steps | None = None,
        ensemble_size: int | None = None,
        timeout_ms: int | None = None,
        format: WireFormat = "npy",
        idempotency_key: str | None = None,
    ) -> UncertaintyPrediction:
        """A prediction and its per-pixel uncertainty: by default the spread of `seeds` members (seed, seed + 1,
        ...); for a multi-seed Marigold also `method="steps"` (one run's step change) or `"diffusers"`."""
        return self._drive(self._uncertainty(*arguments(locals())))

    def predict(self, image: ImageInput, task: Kind = "depth", **params: Any) -> Prediction:
        """`depth`, `normals` or `uncertainty` by name, with the same keyword parameters."""
        return self._drive(self._prediction(task, image, params))

    def predict_many(
        self,
        images: Iterable[ImageInput],
        *,
        task: Kind = "depth",
        concurrency: int = 4,
        progress: bool = False,
        return_exceptions: bool = False,
        **params: Any,
    ) -> Iterator[Prediction]:
        """Predict every image, keeping `concurrency` requests in flight (the server batches them), and yield
        the results in the input's order. `images` is read lazily. A failed image raises its error when its
        turn comes (the rest are abandoned), or is yielded in its place with `return_exceptions=True`.
        `progress=True` shows a tqdm bar (`pip install tqdm`)."""
        plan = self._many(task, params, concurrency)
        window: Window[Future[Prediction]] = Window(concurrency, return_exceptions, images, progress)
        source = iter(images)
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dense-serve-client")
        try:
            while True:
                while window.wants_more():
                    try:
                        image = next(source)
                    except StopIteration:
                        window.exhausted = True
                        break
                    window.pending.append(pool.submit(lambda im=image: self._drive(plan(im))))
                if not window.pending:
                    return
                head = window.pop()
                if head is None:
                    wait(window.running(), return_when=FIRST_COMPLETED)
                else:
                    yield window.outcome(head)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            window.close()

    # ---- metadata
    def models(self) -> list[ModelInfo]:
        """The models served right now (`GET /v1/models`)."""
        return self._drive(models_plan())

    def health(self) -> Health:
        """Liveness and readiness; an unreachable server is `alive=False` (not an exception)."""
        return self._drive(health_plan())

    # ---- plumbing
    def _drive(self, plan: Plan[T]) -> T:
        """Run a core plan: send its calls on the pooled connection, sleep its waits in this thread."""
        step = advance(plan, None)
        while not isinstance(step, Done):
            outcome: Outcome = None
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
            else:
                try:
                    outcome = self._http.request(step.method, step.path, **step.options())
                except httpx.TransportError as exc:
                    outcome = exc
            step = advance(plan, outcome)
        return step.value

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(Core):
    """The same methods as `Client`, as coroutines (`predict_many` is an async iterator); one pooled
    `httpx.AsyncClient`. Use `async with AsyncClient(...) as client:` or call `aclose()`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        compress: bool = False,
        idempotency: bool = True,
        headers: dict[str, str] | None = None,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retry, compress, idempotency, headers)
        self._http = httpx.AsyncClient(transport=transport, **self._http_options(max_connections))

    async def depth(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        processing_res: int | None = None,
        match_input_resolution: bool | None = None,
        seed: int | None = None,
        steps: Steps | None = None,
        ensemble_size: int | None = None,
        uncertainty: AnswerUncertainty | None = None,
        timeout_ms: int | None = None,
        format: WireFormat = "npy",
        idempotency_key: str | None = None,
    ) -> Prediction:
        """Depth (or disparity: `.kind` says which) as float32 `[H, W]`. With `uncertainty="steps"`: an
        `UncertaintyPrediction` carrying the run's step-change uncertainty."""
        return await self._drive(self._prediction("depth", *arguments(locals())))

    async def normals(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        processing_res: int | None = None,
        match_input_resolution: bool | None = None,
        seed: int | None = None,
        steps: Steps | None = None,
        ensemble_size: int | None = None,
        uncertainty: AnswerUncertainty | None = None,
        timeout_ms: int | None = None,
        format: WireFormat = "npy",
        idempotency_key: str | None = None,
    ) -> Prediction:
        """Unit surface normals as float32 `[H, W, 3]`. With `uncertainty="steps"`: an
        `UncertaintyPrediction` carrying the run's step-change uncertainty."""
        return await self._drive(self._prediction("normals", *arguments(locals())))

    async def uncertainty(
        self,
        image: ImageInput,
        *,
        task: Task = "depth",
        seeds: int | None = None,
        reduction: str | None = None,
        return_members: bool | None = None,
        method: UncertaintyMethod | None = None,
        model: str | None = None,
        processing_res: int | None = None,
        match_input_resolution: bool | None = None,
        seed: int | None = None,
        steps: Steps | None = None,
        ensemble_size: int | None = None,
        timeout_ms: int | None = None,
        format: WireFormat = "npy",
        idempotency_key: str | None = None,
    ) -> UncertaintyPrediction:
        """A prediction and its per-pixel uncertainty: by default the spread of `seeds` members (seed, seed + 1,
        ...); for a multi-seed Marigold also `method="steps"` (one run's step change) or `"diffusers"`."""
        return await self._drive(self._uncertainty(*arguments(locals())))

    async def predict(self, image: ImageInput, task: Kind = "depth", **params: Any) -> Prediction:
        """`depth`, `normals` or `uncertainty` by name, with the same keyword parameters."""
        return await self._drive(self._prediction(task, image, params))

    async def predict_many(
        self,
        images: Iterable[ImageInput] | AsyncIterable[ImageInput],
        *,
        task: Kind = "depth",
        concurrency: int = 4,
        progress: bool = False,
        return_exceptions: bool = False,
        **params: Any,
    ) -> AsyncIterator[Prediction]:
        """As `Client.predict_many`: `concurrency` requests in flight, results in the input's order."""
        plan = self._many(task, params, concurrency)
        window: Window[asyncio.Task[Prediction]] = Window(concurrency, return_exceptions, images, progress)
        source = _aiter(images)
        try:
            while True:
                while window.wants_more():
                    try:
                        image = await anext(source)
                    except StopAsyncIteration:
                        window.exhausted = True
                        break
                    window.pending.append(asyncio.ensure_future(self._drive(plan(image))))
                if not window.pending:
                    return
                head = window.pop()
                if head is None:
                    await asyncio.wait(window.running(), return_when=asyncio.FIRST_COMPLETED)
                else:
                    yield window.outcome(head)
        finally:
            for t in window.pending:
                t.cancel()
            await asyncio.gather(*window.pending, return_exceptions=True)
            window.close()

    async def models(self) -> list[ModelInfo]:
        """The models served right now (`GET /v1/models`)."""
        return await self._drive(models_plan())

    async def health(self) -> Health:
        """Liveness and readiness; an unreachable server is `alive=False` (not an exception)."""
        return await self._drive(health_plan())

    async def _drive(self, plan: Plan[T]) -> T:
        """Run a core plan: send its calls on the pooled connection, sleep its waits without blocking the loop."""
        step = advance(plan, None)
        while not isinstance(step, Done):
            outcome: Outcome = None
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
            else:
                try:
                    outcome = await self._http.request(step.method, step.path, **step.options())
                except httpx.TransportError as exc:
                    outcome = exc
            step = advance(plan, outcome)
        return step.value

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _aiter(images: Iterable[ImageInput] | AsyncIterable[ImageInput]) -> AsyncIterator[ImageInput]:
    if isinstance(images, AsyncIterable):
        async for image in images:
            yield image
    else:
        for image in images:
            yield image
