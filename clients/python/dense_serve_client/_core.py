"""What the sync and async clients share: building a request, reading an answer, and the retry policy.

No I/O here, so `Client` and `AsyncClient` differ only in how they send and sleep.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np

from dense_serve_client.errors import APIError, from_problem
from dense_serve_client.images import ImageInput, image_bytes
from dense_serve_client.results import Prediction, UncertaintyPrediction, decode_npy, decode_png_map

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
