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
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import httpx

from dense_serve_client._core import (
    DEFAULT_TIMEOUT_S,
    AnswerUncertainty,
    Call,
    Kind,
    RetryPolicy,
    Steps,
    Task,
    UncertaintyMethod,
    WireFormat,
    base_headers,
    error_of,
    parse_prediction,
    prediction_call,
    retry_after_s,
)
from dense_serve_client.errors import TransportError
from dense_serve_client.images import ImageInput
from dense_serve_client.results import Health, ModelInfo, Prediction, UncertaintyPrediction

DEFAULT_URL = "http://127.0.0.1:8000"


def _predict_params(
    model: str | None,
    processing_res: int | None,
    match_input_resolution: bool | None,
    seed: int | None,
    steps: Steps | None,
    ensemble_size: int | None,
    timeout_ms: int | None,
) -> dict[str, Any]:
    return {
        "model": model,
        "processing_res": processing_res,
        "match_input_resolution": match_input_resolution,
        "seed": seed,
        "steps": steps,
        "ensemble_size": ensemble_size,
        "timeout_ms": timeout_ms,
    }


def _uncertainty_params(
    task: str,
    seeds: int | None,
    reduction: str | None,
    return_members: bool | None,
    method: UncertaintyMethod | None,
    common: dict[str, Any],
) -> dict[str, Any]:
    return {
        "task": task, "seeds": seeds, "reduction": reduction, "return_members": return_members, "method": method,
        **common,
    }  # fmt: skip


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float,
        retry: RetryPolicy | None,
        compress: bool,
        idempotency: bool,
        headers: dict[str, str] | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self.idempotency = idempotency
        self._headers = base_headers(api_key, compress, headers)

    def _call(self, kind: Kind, image: ImageInput, params: dict[str, Any], wire: WireFormat, key: str | None) -> Call:
        return prediction_call(
            kind, image, params, wire=wire, idempotency_key=key, idempotent=self.idempotency, http_timeout=self.timeout
        )

    def _prediction_kwargs(self, task: Kind, params: dict[str, Any]) -> tuple[Kind, dict[str, Any], WireFormat, Any]:
        """`predict(image, task, **params)` -> the call's parts; unknown names are a TypeError, as in a method."""
        params = dict(params)
        wire = params.pop("format", "npy")
        key = params.pop("idempotency_key", None)
        allowed = {"model", "processing_res", "match_input_resolution", "seed", "steps", "ensemble_size", "timeout_ms"}
        if task == "uncertainty":
            allowed |= {"task", "seeds", "reduction", "return_members", "method"}
        elif task in ("depth", "normals"):
            allowed |= {"uncertainty"}
        else:
            raise ValueError(f"task must be 'depth', 'normals' or 'uncertainty', got {task!r}")
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise TypeError(f"unknown parameter(s) for {task}: {', '.join(unknown)}")
        return task, params, wire, key


class Client(_Base):
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
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

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
        params = _predict_params(model, processing_res, match_input_resolution, seed, steps, ensemble_size, timeout_ms)
        params["uncertainty"] = uncertainty
        return self._predict(self._call("depth", image, params, format, idempotency_key))

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
        params = _predict_params(model, processing_res, match_input_resolution, seed, steps, ensemble_size, timeout_ms)
        params["uncertainty"] = uncertainty
        return self._predict(self._call("normals", image, params, format, idempotency_key))

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
        params = _uncertainty_params(
            task, seeds, reduction, return_members, method,
            _predict_params(model, processing_res, match_input_resolution, seed, steps, ensemble_size, timeout_ms),
        )  # fmt: skip
        result = self._predict(self._call("uncertainty", image, params, format, idempotency_key))
        assert isinstance(result, UncertaintyPrediction)
        return result

    def predict(self, image: ImageInput, task: Kind = "depth", **params: Any) -> Prediction:
        """`depth`, `normals` or `uncertainty` by name, with the same keyword parameters."""
        kind, params, wire, key = self._prediction_kwargs(task, params)
        return self._predict(self._call(kind, image, params, wire, key))

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
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        kind, params, wire, key = self._prediction_kwargs(task, params)
        if key is not None:
            raise TypeError("predict_many gives each image its own Idempotency-Key; do not pass idempotency_key")
        bar = _progress(images, progress)
        source = iter(images)
        window: deque[Future[Prediction]] = deque()
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dense-serve-client")
        exhausted = False
        try:
            while True:
                while not exhausted and _running(window) < concurrency and len(window) < 4 * concurrency:
                    try:
                        image = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    window.append(pool.submit(lambda im=image: self._predict(self._call(kind, im, params, wire, None))))
                if not window:
                    return
                if window[0].done():
                    head = window.popleft()
                    if bar is not None:
                        bar.update(1)
                    exc = head.exception()
                    if exc is None:
                        yield head.result()
                    elif return_exceptions:
                        yield exc  # type: ignore[misc]
                    else:
                        raise exc
                else:
                    wait([f for f in window if not f.done()], return_when=FIRST_COMPLETED)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if bar is not None:
                bar.close()

    # ---- metadata
    def models(self) -> list[ModelInfo]:
        """The models served right now (`GET /v1/models`)."""
        response = self._http.get("/v1/models")
        if not response.is_success:
            raise error_of(response, 1)
        return [ModelInfo.from_json(row) for row in response.json()["models"]]

    def health(self) -> Health:
        """Liveness and readiness; an unreachable server is `alive=False` (not an exception)."""
        try:
            live = self._http.get("/healthz")
            ready = self._http.get("/readyz")
        except httpx.TransportError as exc:
            return Health(alive=False, ready=False, detail={"error": str(exc)})
        return _health(live, ready)

    # ---- plumbing
    def _predict(self, call: Call) -> Prediction:
        response, attempts = self._send(call)
        return parse_prediction(call, response, attempts)

    def _send(self, call: Call) -> tuple[httpx.Response, int]:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    content=call.content,
                    headers=call.headers,
                    timeout=call.timeout if call.timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as exc:
                if attempt <= self.retry.max_retries and self.retry.retries_transport(exc):
                    time.sleep(self.retry.wait_s(attempt, None))
                    continue
                raise TransportError(f"{call.method} {self.base_url}{call.path}: {exc!r}", attempt) from exc
            if response.is_success:
                return response, attempt
            if response.status_code in self.retry.statuses and attempt <= self.retry.max_retries:
                time.sleep(self.retry.wait_s(attempt, retry_after_s(response)))
                continue
            raise error_of(response, attempt)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
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
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

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
        params = _predict_params(model, processing_res, match_input_resolution, seed, steps, ensemble_size, timeout_ms)
        params["uncertainty"] = uncertainty
        return await self._predict(self._call("depth", image, params, format, idempotency_key))

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
        params = _predict_params(model, processing_res, match_input_resolution, seed, steps, ensemble_size, timeout_ms)
        params["uncertainty"] = uncertainty
        return await self._predict(self._call("normals", image, params, format, idempotency_key))

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
        params = _uncertainty_params(
            task, seeds, reduction, return_members, method,
            _predict_params(model, processing_res, match_input_resolution, seed, steps, ensemble_size, timeout_ms),
        )  # fmt: skip
        result = await self._predict(self._call("uncertainty", image, params, format, idempotency_key))
        assert isinstance(result, UncertaintyPrediction)
        return result

    async def predict(self, image: ImageInput, task: Kind = "depth", **params: Any) -> Prediction:
        """`depth`, `normals` or `uncertainty` by name, with the same keyword parameters."""
        kind, params, wire, key = self._prediction_kwargs(task, params)
        return await self._predict(self._call(kind, image, params, wire, key))

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
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        kind, params, wire, key = self._prediction_kwargs(task, params)
        if key is not None:
            raise TypeError("predict_many gives each image its own Idempotency-Key; do not pass idempotency_key")
        bar = _progress(images, progress)
        source = _aiter(images)
        window: deque[asyncio.Task[Prediction]] = deque()
        exhausted = False
        try:
            while True:
                while not exhausted and _running(window) < concurrency and len(window) < 4 * concurrency:
                    try:
                        image = await anext(source)
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    window.append(asyncio.ensure_future(self._predict(self._call(kind, image, params, wire, None))))
                if not window:
                    return
                if window[0].done():
                    head = window.popleft()
                    if bar is not None:
                        bar.update(1)
                    exc = head.exception()
                    if exc is None:
                        yield head.result()
                    elif return_exceptions:
                        yield exc  # type: ignore[misc]
                    else:
                        raise exc
                else:
                    await asyncio.wait([t for t in window if not t.done()], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in window:
                t.cancel()
            await asyncio.gather(*window, return_exceptions=True)
            if bar is not None:
                bar.close()

    async def models(self) -> list[ModelInfo]:
        """The models served right now (`GET /v1/models`)."""
        response = await self._http.get("/v1/models")
        if not response.is_success:
            raise error_of(response, 1)
        return [ModelInfo.from_json(row) for row in response.json()["models"]]

    async def health(self) -> Health:
        """Liveness and readiness; an unreachable server is `alive=False` (not an exception)."""
        try:
            live = await self._http.get("/healthz")
            ready = await self._http.get("/readyz")
        except httpx.TransportError as exc:
            return Health(alive=False, ready=False, detail={"error": str(exc)})
        return _health(live, ready)

    async def _predict(self, call: Call) -> Prediction:
        response, attempts = await self._send(call)
        return parse_prediction(call, response, attempts)

    async def _send(self, call: Call) -> tuple[httpx.Response, int]:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    content=call.content,
                    headers=call.headers,
                    timeout=call.timeout if call.timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as exc:
                if attempt <= self.retry.max_retries and self.retry.retries_transport(exc):
                    await asyncio.sleep(self.retry.wait_s(attempt, None))
                    continue
                raise TransportError(f"{call.method} {self.base_url}{call.path}: {exc!r}", attempt) from exc
            if response.is_success:
                return response, attempt
            if response.status_code in self.retry.statuses and attempt <= self.retry.max_retries:
                await asyncio.sleep(self.retry.wait_s(attempt, retry_after_s(response)))
                continue
            raise error_of(response, attempt)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _running(window: Iterable[Future[Any] | asyncio.Task[Any]]) -> int:
    return sum(1 for f in window if not f.done())


async def _aiter(images: Iterable[ImageInput] | AsyncIterable[ImageInput]) -> AsyncIterator[ImageInput]:
    if isinstance(images, AsyncIterable):
        async for image in images:
            yield image
    else:
        for image in images:
            yield image


def _progress(images: object, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError("progress=True needs tqdm: pip install 'dense-serve-client[progress]'") from exc
    total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
    return tqdm(total=total, unit="img", desc="dense-serve")


def _health(live: httpx.Response, ready: httpx.Response) -> Health:
    for response in (live, ready):
        if response.status_code in (401, 403):
            raise error_of(response, 1)
    try:
        body = ready.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    models = body.get("models") if isinstance(body.get("models"), dict) else {}
    return Health(alive=live.status_code == 200, ready=ready.status_code == 200, models=models, detail=body)
