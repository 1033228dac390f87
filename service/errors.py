"""Typed service failures. Each has a stable `code`; every front-end maps codes to its status in one table."""

from __future__ import annotations


class ServiceError(Exception):
    code = "internal"
    title = "Internal error"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class Unauthorized(ServiceError):
    code, title = "unauthorized", "Missing or invalid API key"


class PayloadTooLarge(ServiceError):
    code, title = "payload_too_large", "Payload too large"


class UnsupportedMedia(ServiceError):
    code, title = "unsupported_media", "Unsupported or unreadable image"


class InvalidParameter(ServiceError):
    code, title = "invalid_parameter", "Invalid parameter"


class ModelNotFound(ServiceError):
    code, title = "model_not_found", "Unknown model"


class TaskNotServed(ServiceError):
    code, title = "task_not_served", "Model does not serve this request"


class QueueFull(ServiceError):
    code, title = "queue_full", "Too many requests queued"


class DeadlineExceeded(ServiceError):
    code, title = "deadline_exceeded", "Deadline exceeded"


class ModelFailure(ServiceError):
    code, title = "model_failure", "Model failed on this request"


class Unavailable(ServiceError):
    code, title = "unavailable", "Service unavailable"


class ClientClosed(ServiceError):
    """The client went away before its answer (HTTP 499, nginx's convention; nobody reads it)."""

    code, title = "client_closed", "Client closed the request"


ERRORS: dict[str, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        ServiceError,
        Unauthorized,
        PayloadTooLarge,
        UnsupportedMedia,
        InvalidParameter,
        ModelNotFound,
        TaskNotServed,
        QueueFull,
        DeadlineExceeded,
        ModelFailure,
        Unavailable,
        ClientClosed,
    )
}


def from_code(code: str, detail: str, **extra: object) -> ServiceError:
    return ERRORS.get(code, ServiceError)(detail, **extra)
