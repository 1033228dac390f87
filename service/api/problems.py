"""RFC 9457 problem+json: the one table from service error codes to HTTP statuses, and the handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import PROBLEM_TYPE_BASE, QueueFull, ServiceError, Unauthorized, Unavailable

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


def problem_body(
    status: int, code: str, title: str, detail: str, instance: str | None, request_id: str | None, **extra: object
) -> dict[str, object]:
    body: dict[str, object] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        "request_id": request_id,
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def problem(
    request: Request | None,
    status: int,
    code: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: object,
) -> JSONResponse:
    body = problem_body(
        status,
        code,
        title,
        detail,
        request.url.path if request else None,
        getattr(request.state, "request_id", None) if request else None,
        **extra,
    )
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def service_error_response(request: Request, exc: ServiceError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, QueueFull) or (isinstance(exc, Unavailable) and "retry_after" in exc.extra):
        headers["Retry-After"] = str(exc.extra.get("retry_after", 1))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="dense-serve"'
    extra = {k: v for k, v in exc.extra.items() if k != "retry_after"}
    request_id = getattr(request.state, "request_id", None)
    if not exc.public:  # the client gets a generic line and the id; the log keeps what happened
        log.error("%s on %s (request %s): %s", exc.code, request.url.path, request_id, exc.detail)
    detail = exc.client_detail(request_id)
    return problem(request, exc.http_status, exc.code, exc.title, detail, headers, **extra)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]), "message": e["msg"]}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        field = errors[0]["field"] if errors else None  # as an InvalidParameter raised anywhere else names it
        return problem(request, 422, "invalid_parameter", "Invalid parameter", detail, field=field, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(
            request,
            exc.status_code,
            f"http_{exc.status_code}",
            str(exc.detail),
            str(exc.detail),
            headers=getattr(exc, "headers", None),
        )

    # Unexpected exceptions are rendered by RequestIdMiddleware, inside the request-id scope.
