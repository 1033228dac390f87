"""Logging for every role: plain text for people, or one JSON object per line for log pipelines.

Each line carries the `request_id` and W3C `traceparent` of the request it is about: the API sets them per
request, and the worker sets them from the job (they travel inside it through the queue), so one request's
lines can be joined across processes.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import secrets
import uuid
from collections.abc import Iterator

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
TRACEPARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent", default=None)
TRACEPARENT_RE = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


REQUEST_ID_RE = re.compile(r"^[\w.:-]{1,128}$")


def request_identity(request_id: str | None, traceparent: str | None) -> tuple[str, str]:
    """A front-end's ids for one request: the client's when sane (they end up in logs and headers), new ones
    otherwise. Shared by REST (headers) and gRPC (metadata)."""
    rid = request_id if request_id and REQUEST_ID_RE.match(request_id) else uuid.uuid4().hex
    return rid, valid_traceparent(traceparent) or new_traceparent()


def valid_traceparent(value: str | None) -> str | None:
    """A well-formed version-00 traceparent, else None (a malformed one is dropped, as the spec says)."""
    return value if value and TRACEPARENT_RE.match(value.strip().lower()) else None


def new_traceparent() -> str:
    """Start a trace when the client sent none: random trace and span ids, sampled."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


@contextlib.contextmanager
def context(request_id: str | None, traceparent: str | None) -> Iterator[None]:
    """Tag every log line in the block (and in tasks it starts) with this request."""
    tokens = (REQUEST_ID.set(request_id), TRACEPARENT.set(traceparent))
    try:
        yield
    finally:
        REQUEST_ID.reset(tokens[0])
        TRACEPARENT.reset(tokens[1])


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        record.traceparent = TRACEPARENT.get() or "-"
        return True


def configure(level: str = "info", fmt: str = "text", role: str = "") -> None:
    """Replace the root handlers once per process; uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(traceparent)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                static_fields={"role": role} if role else None,
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
