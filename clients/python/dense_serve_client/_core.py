"""What the sync and async clients share: building a request, reading an answer, and the retry policy.

No I/O here, so `Client` and `AsyncClient` differ only in how they send and sleep. Each method is a *plan*, a
generator that yields a `Call` to send (and receives its `httpx.Response`, or has the connection's
`httpx.TransportError` thrown in) or a `Sleep` to wait out, and returns the method's result; `_drive` in
each client is the only loop that does I/O.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

import httpx
import numpy as np

from dense_serve_client.errors import APIError, TransportError, from_problem
from dense_serve_client.images import ImageInput, image_bytes
from dense_serve_client.results import (
    Health,
    ModelInfo,
    Prediction,
    UncertaintyPrediction,
    decode_npy,
    decode_png_map,
)

Task = Literal["depth", "normals"]
#: What a prediction may be asked for: a task, or `uncertainty` (a Lotus-G multi-seed ensemble).
Kind = Literal["depth", "normals", "uncertainty"]
#: Wire formats the client decodes into arrays: float32 NPY (exact, the cheapest to produce and read; the
#: default) or PNG (16-bit depth, 8-bit normals: a tenth of the bytes, for slow links).
WireFormat = Literal["npy", "png"]
#: `steps`: a count, or "auto" (the most steps that fit the request's deadline; multi-step families).
Steps = int | Literal["auto"]
#: An uncertainty endpoint's method: the multi-seed spread, Marigold's step change, or diffusers' ensembling.
UncertaintyMethod = Literal["seeds", "steps", "diffusers"]
#: What a depth / normals answer carries beside its map: nothing, or its run's step-change uncertainty.
AnswerUncertainty = Literal["none", "steps"]
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one logical request (all with its one `Idempotency-Key`, so the server never computes it
    twice): on the HTTP statuses in `statuses` (429 queue full, 503 not ready / shutting down), honouring
    `Retry-After` (capped at `max_wait_s`), else waiting `backoff_s`, doubled each time; and on connection
    failures (refused, reset) when `transport_errors`. `max_retries=0` turns retries off."""

    max_retries: int = 4
    backoff_s: float = 0.25
    max_wait_s: float = 30.0
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))
    transport_errors: bool = True

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_s < 0 or self.max_wait_s < 0:
            raise ValueError("RetryPolicy values must not be negative")

    def wait_s(self, retry: int, retry_after: float | None) -> float:
        """Seconds before retry number `retry` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_wait_s)
        return min(self.backoff_s * 2 ** (retry - 1), self.max_wait_s)

    def retries_transport(self, exc: Exception) -> bool:
        """Connection refused, reset or closed before an answer: the request may be sent again (with its key,
        a job the server did receive is answered once). A read timeout is not retried: the caller's time is up."""
        return self.transport_errors and isinstance(exc, httpx.ConnectError | httpx.RemoteProtocolError)


NO_RETRY = RetryPolicy(max_retries=0)


@dataclass(frozen=True)
class Call:
    """One logical request: sent once, or again with the same body and key after a retryable answer."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    kind: Kind | None = None
    wire: WireFormat = "npy"

    def options(self) -> dict[str, Any]:
        """The keyword arguments of `httpx.Client.request` (and `AsyncClient.request`) that send it."""
        timeout = self.timeout if self.timeout is not None else httpx.USE_CLIENT_DEFAULT
        return {"params": self.params, "content": self.content, "headers": self.headers, "timeout": timeout}


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def prediction_call(
    kind: Kind,
    image: ImageInput,
    params: dict[str, Any],
    *,
    wire: WireFormat = "npy",
    idempotency_key: str | None = None,
    idempotent: bool = True,
    http_timeout: float | None = None,
) -> Call:
    """`POST /v1/{depth,normals,uncertainty}` with the image as the raw body and the REST parameters in the
    query (`None` = the server's default). Uncertainty answers come as JSON (prediction + spread + members), and
    so do depth / normals answers that carry their step-change uncertainty."""
    if wire not in ("npy", "png"):
        raise ValueError(f"format must be 'npy' or 'png', got {wire!r}")
    query = {name: _param(value) for name, value in params.items() if value is not None}
    if kind == "uncertainty" or params.get("uncertainty") == "steps":  # two maps: a JSON answer
        query["format"] = "json"
        query["json_encoding"] = wire
    else:
        query["format"] = wire
    headers = {"Content-Type": "application/octet-stream"}
    if idempotent or idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key or uuid.uuid4().hex
    timeout = http_timeout
    if http_timeout is not None and params.get("timeout_ms"):
        # The HTTP wait must outlast the server's own deadline, or a slow answer is abandoned and computed anyway.
        timeout = max(http_timeout, params["timeout_ms"] / 1000.0 + 5.0)
    return Call("POST", f"/v1/{kind}", query, image_bytes(image), headers, timeout, kind, wire)


def retry_after_s(response: httpx.Response) -> float | None:
    """`Retry-After` as seconds: an integer, or an HTTP date."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_of(response: httpx.Response, attempts: int) -> APIError:
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    return from_problem(
        response.status_code,
        body,
        request_id=response.headers.get("x-request-id"),
        retry_after=retry_after_s(response),
        attempts=attempts,
        text=response.text if body is None else "",
    )


def server_timing(header: str | None) -> dict[str, float]:
    """`decode;dur=1.20, queue;dur=3.4` -> {"decode": 1.2, "queue": 3.4} (ms)."""
    timings: dict[str, float] = {}
    for entry in (header or "").split(","):
        name, *opts = [p.strip() for p in entry.split(";")]
        for opt in opts:
            if opt.startswith("dur="):
                with contextlib.suppress(ValueError):
                    timings[name] = float(opt[4:])
    return timings


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def parse_prediction(call: Call, response: httpx.Response, attempts: int) -> Prediction:
    """A 200 answer -> `Prediction` (binary map + headers) or `UncertaintyPrediction` (JSON)."""
    if call.kind == "uncertainty" or call.params.get("format") == "json":
        return _parse_uncertainty(call, response, attempts)
    headers = response.headers
    kind = headers.get("x-output-kind", "normals" if call.kind == "normals" else "depth")
    media = headers.get("content-type", "").split(";")[0].strip()
    if media == "application/x-npy":
        array = decode_npy(response.content)
    elif media == "image/png":
        array = decode_png_map(response.content, kind)
    else:
        raise APIError(f"unexpected answer type {media!r}", status=response.status_code, attempts=attempts)
    return Prediction(
        array=array,
        kind=kind,  # type: ignore[arg-type]
        model=headers.get("x-model", ""),
        seed=_int(headers.get("x-seed")),
        steps=_int(headers.get("x-steps")),
        batch_size=_int(headers.get("x-batch-size")),
        timings=server_timing(headers.get("server-timing")),
        request_id=headers.get("x-request-id"),
        attempts=attempts,
    )


def _blob(outputs: dict[str, Any], name: str, kind: str) -> np.ndarray | None:
    entry = outputs.get(name)
    if not entry:
        return None
    data = base64.b64decode(entry["data"])
    if entry.get("media_type") == "application/x-npy":
        return decode_npy(data)
    return decode_png_map(data, kind)


def _parse_uncertainty(call: Call, response: httpx.Response, attempts: int) -> UncertaintyPrediction:
    body = response.json()
    kind = body["kind"]
    outputs = body.get("outputs", {})
    prediction = _blob(outputs, "prediction", kind)
    uncertainty = _blob(outputs, "uncertainty", "depth")
    if prediction is None or uncertainty is None:
        raise APIError("the uncertainty answer lacks its prediction or uncertainty map", attempts=attempts)
    if outputs.get("uncertainty", {}).get("media_type") == "image/png":
        # 16-bit PNG of value / uncertainty_png_max (1 for depth, 180 for degrees): back to the unit.
        uncertainty = uncertainty * float(body.get("uncertainty_png_max") or 1.0)
    return UncertaintyPrediction(
        array=prediction,
        kind=kind,
        model=body.get("model", ""),
        seed=body.get("seed"),
        steps=body.get("steps"),
        batch_size=body.get("batch_size"),
        timings=dict(body.get("timings", {})),
        request_id=body.get("request_id") or response.headers.get("x-request-id"),
        attempts=attempts,
        uncertainty=uncertainty.astype(np.float32, copy=False),
        members=_blob(outputs, "members", kind),
        seeds=body.get("seeds"),
        reduction=body.get("reduction"),
        uncertainty_unit=body.get("uncertainty_unit"),
        method=body.get("uncertainty_method"),
        step_window=body.get("step_window"),
    )


def base_headers(api_key: str | None, compress: bool, extra: dict[str, str] | None) -> dict[str, str]:
    """Auth, and `Accept-Encoding: identity` unless `compress`: on a LAN a float32 NPY answer is faster raw
    than zstd/gzip-compressed (which saves only ~20 % on maps)."""
    headers = {"Accept-Encoding": _encodings() if compress else "identity", "User-Agent": user_agent()}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


def _encodings() -> str:
    """httpx decodes zstd only with the `zstandard` package."""
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return "gzip"
    return "zstd, gzip"


def user_agent() -> str:
    from dense_serve_client import __version__

    return f"dense-serve-client/{__version__} httpx/{httpx.__version__}"


# ---- plans: the methods' logic as generators, run by `Client._drive` (blocking) or `AsyncClient._drive` (asyncio)

T = TypeVar("T")


@dataclass(frozen=True)
class Sleep:
    """A plan's wait before its next attempt: `time.sleep` or `asyncio.sleep`, as the driver runs."""

    seconds: float


@dataclass(frozen=True)
class Done(Generic[T]):
    """A plan's result, once it has nothing more to send."""

    value: T


#: What a plan yields (a request to send, a wait) and receives back (the answer to a `Call`, `None` after a
#: `Sleep`); a connection failure is thrown into it instead. It returns the method's result.
Plan = Generator[Call | Sleep, httpx.Response | None, T]
#: What a driver hands back to a plan after a step.
Outcome = httpx.Response | httpx.TransportError | None


def advance(plan: Plan[T], outcome: Outcome) -> Call | Sleep | Done[T]:
    """The plan's next step after `outcome` (`None` to start it, and after a `Sleep`)."""
    try:
        if isinstance(outcome, httpx.TransportError):
            return plan.throw(outcome)
        return plan.send(outcome)
    except StopIteration as stop:
        return Done(stop.value)


def exchange(call: Call, policy: RetryPolicy, base_url: str) -> Plan[tuple[httpx.Response, int]]:
    """`call` until a 2xx answer (returned with the number of attempts) or the policy gives up. Every attempt is
    the same `Call`, so the same body and the same Idempotency-Key: the server computes it at most once."""
    attempt = 0
    while True:
        attempt += 1
        try:
            response = yield call
        except httpx.TransportError as exc:
            if attempt <= policy.max_retries and policy.retries_transport(exc):
                yield Sleep(policy.wait_s(attempt, None))
                continue
            raise TransportError(f"{call.method} {base_url}{call.path}: {exc!r}", attempt) from exc
        assert response is not None
        if response.is_success:
            return response, attempt
        if response.status_code in policy.statuses and attempt <= policy.max_retries:
            yield Sleep(policy.wait_s(attempt, retry_after_s(response)))
            continue
        raise error_of(response, attempt)


def prediction_plan(call: Call, policy: RetryPolicy, base_url: str) -> Plan[Prediction]:
    """A prediction call, retried by `policy`, its answer read into a `Prediction`."""
    response, attempts = yield from exchange(call, policy, base_url)
    return parse_prediction(call, response, attempts)


def uncertainty_plan(plan: Plan[Prediction]) -> Plan[UncertaintyPrediction]:
    """`plan` narrowed: an uncertainty endpoint always answers with an `UncertaintyPrediction`."""
    result = yield from plan
    assert isinstance(result, UncertaintyPrediction)
    return result


def models_plan() -> Plan[list[ModelInfo]]:
    """`GET /v1/models`, sent once: a connection failure is the caller's to see."""
    response = yield Call("GET", "/v1/models")
    assert response is not None
    if not response.is_success:
        raise error_of(response, 1)
    return [ModelInfo.from_json(row) for row in response.json()["models"]]


def health_plan() -> Plan[Health]:
    """`/healthz` then `/readyz`; an unreachable server is `alive=False`, not an exception."""
    try:
        live = yield Call("GET", "/healthz")
        ready = yield Call("GET", "/readyz")
    except httpx.TransportError as exc:
        return Health(alive=False, ready=False, detail={"error": str(exc)})
    assert live is not None and ready is not None
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


def arguments(method_locals: dict[str, Any]) -> tuple[ImageInput, dict[str, Any]]:
    """A prediction method's `locals()` -> its image and its keyword parameters, as `predict(**params)` takes
    them: the methods spell their parameters out for readers and type checkers, and pass them on in one line."""
    params = {name: value for name, value in method_locals.items() if name not in ("self", "image")}
    return method_locals["image"], params


class Core:
    """A client's settings, and its methods as plans: all of `Client` and `AsyncClient` but the sending."""

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

    def _http_options(self, max_connections: int) -> dict[str, Any]:
        """The pooled `httpx.Client` / `httpx.AsyncClient`'s settings: every connection may stay open."""
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        return {"base_url": self.base_url, "headers": self._headers, "timeout": self.timeout, "limits": limits}

    def _prediction(self, task: Kind, image: ImageInput, params: dict[str, Any]) -> Plan[Prediction]:
        """`predict(image, task, **params)`'s plan. The call is built here, before the plan runs, so a bad
        argument raises where the method is called (or awaited)."""
        kind, params, wire, key = self._prediction_kwargs(task, params)
        return prediction_plan(self._call(kind, image, params, wire, key), self.retry, self.base_url)

    def _uncertainty(self, image: ImageInput, params: dict[str, Any]) -> Plan[UncertaintyPrediction]:
        return uncertainty_plan(self._prediction("uncertainty", image, params))

    def _many(self, task: Kind, params: dict[str, Any], concurrency: int) -> Callable[[ImageInput], Plan[Prediction]]:
        """`predict_many`'s checks, and what makes each image's plan (with a fresh Idempotency-Key each)."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        kind, params, wire, key = self._prediction_kwargs(task, params)
        if key is not None:
            raise TypeError("predict_many gives each image its own Idempotency-Key; do not pass idempotency_key")

        def plan(image: ImageInput) -> Plan[Prediction]:
            return prediction_plan(self._call(kind, image, params, wire, None), self.retry, self.base_url)

        return plan

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


# ---- predict_many: which requests run, and which result is next, for threads and asyncio tasks alike


class _Pending(Protocol):
    """What `Window` needs of a `concurrent.futures.Future` or an `asyncio.Task`."""

    def done(self) -> bool: ...
    def result(self) -> Any: ...
    def exception(self) -> BaseException | None: ...


F = TypeVar("F", bound=_Pending)


class Window(Generic[F]):
    """`predict_many`'s bookkeeping: another request starts while fewer than `concurrency` run (and fewer than
    4x that wait, finished, for an earlier one), and results leave in the input's order."""

    def __init__(self, concurrency: int, return_exceptions: bool, images: object, progress: bool) -> None:
        self.concurrency = concurrency
        self.return_exceptions = return_exceptions
        self.pending: deque[F] = deque()
        self.exhausted = False
        self._bar = progress_bar(images, progress)

    def wants_more(self) -> bool:
        running = sum(1 for f in self.pending if not f.done())
        return not self.exhausted and running < self.concurrency and len(self.pending) < 4 * self.concurrency

    def running(self) -> list[F]:
        return [f for f in self.pending if not f.done()]

    def pop(self) -> F | None:
        """The oldest request once it is done (counted on the bar), else None: the caller waits."""
        if not self.pending[0].done():
            return None
        if self._bar is not None:
            self._bar.update(1)
        return self.pending.popleft()

    def outcome(self, head: F) -> Prediction:
        """A finished request's result; its error is raised (the rest are abandoned), or with
        `return_exceptions` returned in its place."""
        exc = head.exception()
        if exc is None:
            result: Prediction = head.result()
            return result
        if self.return_exceptions:
            return exc  # type: ignore[return-value]
        raise exc

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress_bar(images: object, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError("progress=True needs tqdm: pip install 'dense-serve-client[progress]'") from exc
    total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
    return tqdm(total=total, unit="img", desc="dense-serve")
