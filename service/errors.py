"""Typed service failures, in one table: each class carries its stable `code`, its title, its HTTP status and
its gRPC status name, so REST (problem+json), gRPC and the queue all say the same thing. No grpc import here:
the front-ends resolve the name with `grpc.StatusCode[...]`."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

PROBLEM_TYPE_BASE = "https://dense-serve.dev/problems/"


class ServiceError(Exception):
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"
    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[str] = "INTERNAL"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        #: Problem members beyond the standard ones (`field`, `errors`, `limit`, `model`) and `retry_after`.
        self.extra = extra

    @property
    def type(self) -> str:
        return PROBLEM_TYPE_BASE + self.code

    @property
    def field(self) -> str | None:
        value = self.extra.get("field")
        return value if isinstance(value, str) else None

    @property
    def public(self) -> bool:
        """Whether `detail` may reach a client. A 500's may quote an exception (a model's, a library's: paths,
        hosts, internals); every other status carries our own sentence (a 503 says why and when to retry)."""
        return self.http_status != 500

    def client_detail(self, request_id: str | None) -> str:
        """What the client reads: `detail`, or for a 500 a generic line and the request id (the log has the rest)."""
        return self.detail if self.public else internal_detail(self.title, request_id)

    def info(self) -> ErrorInfo:
        """What travels through the queue: enough to raise the same error on the other side."""
        return ErrorInfo(code=self.code, detail=self.detail, field=self.field)


def internal_detail(title: str, request_id: str | None) -> str:
    """A 500's client-facing detail: what failed in general words, and where the log has the particulars."""
    where = f" under request id {request_id}" if request_id else ""
    return f"{title}; the server's log has the detail{where}"


class Unauthorized(ServiceError):
    code, title, http_status, grpc_status = "unauthorized", "Missing or invalid API key", 401, "UNAUTHENTICATED"


class ModelNotFound(ServiceError):
    code, title, http_status, grpc_status = "model_not_found", "Unknown model", 404, "NOT_FOUND"


class NotAcceptable(ServiceError):
    code, title, http_status, grpc_status = "not_acceptable", "Not acceptable", 406, "INVALID_ARGUMENT"


class PayloadTooLarge(ServiceError):
    code, title, http_status, grpc_status = "payload_too_large", "Payload too large", 413, "INVALID_ARGUMENT"


class UnsupportedMedia(ServiceError):
    code, title, http_status, grpc_status = (
        "unsupported_media",
        "Unsupported or unreadable image",
        415,
        "INVALID_ARGUMENT",
    )


class InvalidParameter(ServiceError):
    code, title, http_status, grpc_status = "invalid_parameter", "Invalid parameter", 422, "INVALID_ARGUMENT"


class TaskNotServed(ServiceError):
    """The model exists but not for this route (a depth model asked for normals): the pair is not found, as
    OpenAI's API answers for a model on the wrong endpoint; the parameters themselves are valid."""

    code, title, http_status, grpc_status = (
        "task_not_served",
        "No model serves this request",
        404,
        "NOT_FOUND",
    )


class QueueFull(ServiceError):
    code, title, http_status, grpc_status = "queue_full", "Too many requests queued", 429, "RESOURCE_EXHAUSTED"


class ClientClosed(ServiceError):
    """The client went away before its answer (HTTP 499, nginx's convention; nobody reads it)."""

    code, title, http_status, grpc_status = "client_closed", "Client closed the request", 499, "CANCELLED"


class ModelFailure(ServiceError):
    code, title, http_status, grpc_status = "model_failure", "Model failed on this request", 500, "INTERNAL"


class Unavailable(ServiceError):
    code, title, http_status, grpc_status = "unavailable", "Service unavailable", 503, "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    code, title, http_status, grpc_status = "deadline_exceeded", "Deadline exceeded", 504, "DEADLINE_EXCEEDED"


ERRORS: dict[str, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        ServiceError,
        Unauthorized,
        ModelNotFound,
        NotAcceptable,
        PayloadTooLarge,
        UnsupportedMedia,
        InvalidParameter,
        TaskNotServed,
        QueueFull,
        ClientClosed,
        ModelFailure,
        Unavailable,
        DeadlineExceeded,
    )
}


class ErrorInfo(BaseModel):
    """A failure as it travels through the queue (the worker side raised it, the front-end re-raises it)."""

    code: str
    detail: str
    field: str | None = None

    def error(self) -> ServiceError:
        extra = {"field": self.field} if self.field else {}
        return ERRORS.get(self.code, ServiceError)(self.detail, **extra)
