"""Typed errors built from the server's RFC 9457 problem+json answers (and from gRPC frame errors).

Each class is one problem code of the API (`type` ends in it); catch `APIError` for all of them, or a subclass
(`QueueFull`, `InvalidParameter`, ...) for one.
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_TYPE_BASE = "https://dense-serve.dev/problems/"


class DenseServeError(Exception):
    """Anything this client raises on purpose."""


class APIError(DenseServeError):
    """The server refused or failed a request. Attributes mirror the problem+json members.

    `status` is the HTTP status (or, for a gRPC frame error, the HTTP status its code maps to), `type` the
    problem type URI, `code` its last segment, `field` the request parameter at fault (when one is),
    `problem` the whole body, `attempts` how many times the request was sent (retries included).
    """

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        type: str | None = None,
        field: str | None = None,
        request_id: str | None = None,
        problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        self.status = status if status is not None else self.http_status
        self.title = title or type_name(self.code)
        self.type = type or PROBLEM_TYPE_BASE + self.code
        self.detail = detail
        self.field = field
        self.request_id = request_id
        self.problem = problem or {}
        self.retry_after = retry_after
        self.attempts = attempts
        where = f" (field {field})" if field else ""
        rid = f" [request {request_id}]" if request_id else ""
        super().__init__(f"{self.status} {self.title}: {detail}{where}{rid}")


def type_name(code: str) -> str:
    return code.replace("_", " ").capitalize()


class Unauthorized(APIError):
    code, http_status = "unauthorized", 401


class ModelNotFound(APIError):
    code, http_status = "model_not_found", 404


class TaskNotServed(APIError):
    """The model exists but does not serve this route (a depth model asked for normals)."""

    code, http_status = "task_not_served", 404


class NotAcceptable(APIError):
    code, http_status = "not_acceptable", 406


class PayloadTooLarge(APIError):
    code, http_status = "payload_too_large", 413


class UnsupportedMedia(APIError):
    code, http_status = "unsupported_media", 415


class InvalidParameter(APIError):
    code, http_status = "invalid_parameter", 422


class QueueFull(APIError):
    """429: the model's queue is full. Retried by the client (honouring `Retry-After`) before this is raised."""

    code, http_status = "queue_full", 429


class ModelFailure(APIError):
    code, http_status = "model_failure", 500


class Unavailable(APIError):
    """503: no model ready yet, or the server is shutting down. Retried like `QueueFull`."""

    code, http_status = "unavailable", 503


class DeadlineExceeded(APIError):
    code, http_status = "deadline_exceeded", 504


_BY_CODE: dict[str, type[APIError]] = {
    cls.code: cls
    for cls in (
        APIError,
        Unauthorized,
        ModelNotFound,
        TaskNotServed,
        NotAcceptable,
        PayloadTooLarge,
        UnsupportedMedia,
        InvalidParameter,
        QueueFull,
        ModelFailure,
        Unavailable,
        DeadlineExceeded,
    )
}
_BY_STATUS: dict[int, type[APIError]] = {
    cls.http_status: cls for cls in reversed(list(_BY_CODE.values())) if cls is not APIError
}


def error_class(code: str | None, status: int | None) -> type[APIError]:
    """The class of a problem: by its code (the `type`'s last segment) first, else by HTTP status."""
    if code and code in _BY_CODE:
        return _BY_CODE[code]
    if status is not None and status in _BY_STATUS:
        return _BY_STATUS[status]
    return APIError


def from_problem(
    status: int,
    body: Any,
    *,
    request_id: str | None = None,
    retry_after: float | None = None,
    attempts: int = 1,
    text: str = "",
) -> APIError:
    """An exception for an HTTP error answer; `body` is the parsed problem+json (or anything else a proxy sent)."""
    problem = body if isinstance(body, dict) else {}
    ptype = problem.get("type") if isinstance(problem.get("type"), str) else None
    code = ptype.rsplit("/", 1)[-1] if ptype else None
    cls = error_class(code, status)
    detail = problem.get("detail") if isinstance(problem.get("detail"), str) else (text.strip()[:500] or "no detail")
    field = problem.get("field") if isinstance(problem.get("field"), str) else None
    errors = problem.get("errors")
    if field is None and isinstance(errors, list) and errors and isinstance(errors[0], dict):
        field = errors[0].get("field") if isinstance(errors[0].get("field"), str) else None  # FastAPI's checks
    title = problem.get("title") if isinstance(problem.get("title"), str) else None
    rid = problem.get("request_id") if isinstance(problem.get("request_id"), str) else request_id
    return cls(
        detail,
        status=status,
        title=title,
        type=ptype,
        field=field,
        request_id=rid,
        problem=problem,
        retry_after=retry_after,
        attempts=attempts,
    )


class TransportError(DenseServeError):
    """No answer: the server could not be reached, closed the connection, or did not answer within the client's
    timeout (the `httpx` or `grpc` exception is the `__cause__`). `attempts` counts the tries made."""

    def __init__(self, message: str, attempts: int = 1) -> None:
        super().__init__(message)
        self.attempts = attempts
