"""Edge concerns as plain ASGI middleware: a request id on every response, the body size limit enforced
while the body streams in (a 413 before the whole upload is read), and the request metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from urllib.parse import parse_qs

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette_compress import CompressMiddleware, add_compress_type

from service import logs, metrics
from service.api.problems import PROBLEM, problem_body
from service.errors import internal_detail

log = logging.getLogger(__name__)


class RequestIdMiddleware:
    """Echo a sane client `X-Request-ID`, or make one; store it in `request.state.request_id`, with the
    client's W3C `traceparent` (or a new trace) in `request.state.traceparent`, and tag the logs with both.

    It also turns an unexpected exception into a 500 problem, so that answer carries the id too (Starlette's
    own last-resort handler sits outside every user middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, traceparent = logs.request_identity(_header(scope, b"x-request-id"), _header(scope, b"traceparent"))
        state = scope.setdefault("state", {})
        state["request_id"], state["traceparent"] = request_id, traceparent

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            with logs.context(request_id, traceparent):
                await self.app(scope, receive, send_with_id)
        except Exception:
            if started:
                raise
            log.exception("unhandled error on %s (request %s)", scope.get("path"), request_id)
            # The exception's text stays in the log: it may name paths, hosts or internals.
            detail = internal_detail("Internal error", request_id)
            body = problem_body(500, "internal", "Internal error", detail, scope.get("path"), request_id)
            await _send_json(send_with_id, 500, body)


#: zstd level 1 and gzip level 1: a 1080p float32 NPY (8.3 MB) compresses in tens of milliseconds on the event
#: loop (starlette-compress runs the codec inline), not hundreds; PNG, EXR and TIFF are compressed already and
#: never recompressed. Brotli is off: an order of magnitude slower than zstd for little gain on float maps.
HTTP_ZSTD_LEVEL = 1
HTTP_GZIP_LEVEL = 1
COMPRESSED_TYPES = ("application/x-npy", "application/json")


def add_compression(app: FastAPI) -> None:
    """`Accept-Encoding: zstd, gzip` compression of NPY and JSON bodies (starlette-compress)."""
    for media_type in COMPRESSED_TYPES:
        add_compress_type(media_type)
    app.add_middleware(
        CompressMiddleware,
        minimum_size=1024,
        zstd_level=HTTP_ZSTD_LEVEL,
        gzip_level=HTTP_GZIP_LEVEL,
        brotli=False,
    )


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """`max_image_bytes` is the upload limit; a body may carry a little more (multipart framing, form
    fields), and a JSON body a third more (base64). The image itself is checked exactly by the handler."""

    SLACK = 64 * 1024

    def __init__(self, app: ASGIApp, max_image_bytes: int) -> None:
        self.app = app
        self.max_image_bytes = max_image_bytes

    def limit_for(self, scope: Scope) -> int:
        ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        base = self.max_image_bytes * 4 // 3 + 4 if ctype == "application/json" else self.max_image_bytes
        return base + self.SLACK

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            await self._reject(scope, send, f"request body of {declared} bytes")
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(scope, send, f"request body over {seen} bytes (still streaming)")

    async def _reject(self, scope: Scope, send: Send, what: str) -> None:
        body = problem_body(
            413,
            "payload_too_large",
            "Payload too large",
            f"{what} exceeds the upload limit of {self.max_image_bytes} bytes (max_upload_bytes)",
            scope.get("path"),
            scope.get("state", {}).get("request_id"),
            limit=self.max_image_bytes,
        )
        await _send_json(send, 413, body, close=True)


async def _send_json(send: Send, status: int, body: dict[str, object], close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", PROBLEM.encode()), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


#: Routes measured under their own name; anything else is "other" (bounded label cardinality).
MEASURED_ROUTES = {"/v1/depth", "/v1/normals", "/v1/uncertainty", "/v1/models", "/healthz", "/readyz", "/metrics"}


class MetricsMiddleware:
    """Request duration histogram, in-flight gauge and body bytes per route, model, task and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in MEASURED_ROUTES else "other"
        start = time.perf_counter()
        status, model, kind, bytes_in, bytes_out = 500, "", "", 0, 0

        async def counting_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            return message

        async def observing_send(message: Message) -> None:
            nonlocal status, model, kind, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
                for key, value in message.get("headers", []):
                    if key == b"x-model":
                        model = value.decode("latin-1")
                    elif key == b"x-output-kind":
                        kind = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            # A scrape is not traffic: /metrics would otherwise always count itself in flight.
            with metrics.in_flight("rest") if route != "/metrics" else contextlib.nullcontext():
                await self.app(scope, counting_receive, observing_send)
        finally:
            metrics.observe_request(
                "rest",
                route,
                model,
                _task(route, scope, kind),
                status,
                time.perf_counter() - start,
                bytes_in,
                bytes_out,
            )


def _task(route: str, scope: Scope, kind: str) -> str:
    """From the answer's output kind when there is one, else from the route (errors carry no kind)."""
    if kind:
        return "normals" if kind == "normals" else "depth"
    if route in ("/v1/depth", "/v1/normals"):
        return route.rsplit("/", 1)[1]
    if route == "/v1/uncertainty":
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        return "normals" if query.get("task") == ["normals"] else "depth"
    return ""
