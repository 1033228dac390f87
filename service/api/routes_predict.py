"""`POST /v1/depth`, `/v1/normals`, `/v1/uncertainty`, `/v1/segment` (probes): validate, enqueue, await the
reply, respond.

Parameters are FastAPI query models (their limits are the server's); the same fields may come as form fields
or JSON fields beside the image. Either way they become one `PredictionRequest`, validated once.
"""

import asyncio
import base64
import time
from collections.abc import Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from models.outputs import ServedTask
from service import codec, tracing
from service.api.dependencies import Context, context
from service.api.inputs import read_input
from service.api.negotiate import choose
from service.api.schemas import (
    MEDIA_TYPES,
    PredictionJSON,
    Problem,
    parameter_models,
    request_body,
    segment_parameters,
)
from service.errors import ERRORS, ClientClosed, InvalidParameter, PayloadTooLarge, UnsupportedMedia
from service.frontend import make_job, resolve_model
from service.jobs import Reply
from service.request import (
    SEGMENT_FORMATS,
    Limits,
    PredictionRequest,
    RequestKind,
    check_answer_format,
    invalid_parameter,
    parse_request,
)

BINARY = {"schema": {"type": "string", "format": "binary"}}


def _problem_answer(description: str) -> dict[str, Any]:
    """One documented problem answer, with RFC 9457's media type."""
    return {
        "model": Problem,
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


#: Every problem the routes can answer; 400 is Starlette's own answer to a body that is not the multipart it
#: claims to be (a broken boundary).
PROBLEMS: dict[int | str, dict[str, Any]] = {
    cls.http_status: _problem_answer(cls.title)
    for cls in ERRORS.values()
    if cls.http_status >= 400 and cls.code not in ("client_closed",)
} | {400: _problem_answer("Malformed request body (invalid multipart data)")}


def _answers(description: str) -> dict[int | str, dict[str, Any]]:
    binary = {media: BINARY for media in {m for f, m in MEDIA_TYPES.items() if f != "json"}}
    return {200: {"description": description, "model": PredictionJSON, "content": binary}, **PROBLEMS}


def predict_router(limits: Limits) -> APIRouter:
    """The prediction routes, with parameter models that carry this server's limits."""
    router = APIRouter(prefix="/v1", tags=["predictions"])
    predict_params, uncertainty_params = parameter_models(limits)

    @router.post(
        "/depth",
        summary="Depth (or disparity) map of an image",
        responses=_answers(
            "16-bit PNG (round(v * 65535)), float32 NPY, half-float EXR (channel Y), float32 TIFF, a colour "
            "preview, or JSON"
        ),
        openapi_extra=request_body(predict_params),
    )
    async def depth(
        request: Request, params: Annotated[predict_params, Query()], ctx: Annotated[Context, Depends(context)]
    ) -> Response:
        return await _handle(request, ctx, params, "predict", "depth")

    @router.post(
        "/normals",
        summary="Surface normals of an image",
        responses=_answers(
            "8-bit RGB PNG (round((n + 1) / 2 * 255)), float32 NPY [H, W, 3], half-float EXR (R, G, B), float32 "
            "TIFF, or JSON"
        ),
        openapi_extra=request_body(predict_params),
    )
    async def normals(
        request: Request, params: Annotated[predict_params, Query()], ctx: Annotated[Context, Depends(context)]
    ) -> Response:
        return await _handle(request, ctx, params, "predict", "normals")

    @router.post(
        "/uncertainty",
        summary="Lotus-G multi-seed prediction and its uncertainty",
        responses=_answers(
            "binary formats carry the uncertainty map (16-bit PNG of value / uncertainty_png_max, NPY, EXR, TIFF or "
            "colour); JSON carries prediction, uncertainty and optionally members"
        ),
        openapi_extra=request_body(uncertainty_params),
    )
    async def uncertainty(
        request: Request, params: Annotated[uncertainty_params, Query()], ctx: Annotated[Context, Depends(context)]
    ) -> Response:
        return await _handle(request, ctx, params, "uncertainty", None)

    segment_params = segment_parameters(limits)

    @router.post(
        "/segment",
        summary="Class map of an image from a probe on a served UNet (see /v1/models: task segment)",
        responses=_answers(
            "8-bit index PNG (class i = value i), uint8 NPY [H, W], a colour overlay on the image, or JSON with "
            "the class names, per-class pixel counts and the map (with_depth: the base model's map too)"
        ),
        openapi_extra=request_body(segment_params),
    )
    async def segment(
        request: Request, params: Annotated[segment_params, Query()], ctx: Annotated[Context, Depends(context)]
    ) -> Response:
        return await _handle(request, ctx, params, "predict", "segment")

    return router


async def _handle(
    request: Request, ctx: Context, query: BaseModel, kind: RequestKind, task: ServedTask | None
) -> Response:
    started = time.perf_counter()
    image, body = await read_input(request, ctx.settings.max_upload_bytes)
    fields = {**query.model_dump(exclude_unset=True), **_body_fields(type(query), body), "kind": kind}
    if task is not None:
        fields["task"] = task
    req = parse_request(fields, ctx.limits)
    fmt = choose(req.format if "format" in fields else None, request.headers.get("accept"))
    if req.task == "segment" and fmt not in SEGMENT_FORMATS:
        raise InvalidParameter(f"a class map is answered as {', '.join(SEGMENT_FORMATS)}, not {fmt}", field="format")
    check_answer_format(req, fmt)
    req = req.model_copy(update={"format": fmt})
    info = await resolve_model(ctx.broker, req.model, req.task, kind, ctx.expected_models, ctx.settings.scale_from_zero)
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise InvalidParameter("Idempotency-Key must be 1 to 255 characters", field="Idempotency-Key")
    size = await _probe(image, ctx.settings.max_pixels)
    with tracing.span("dense.request", request.state.traceparent, model=info.id, task=req.task, kind=kind) as tp:
        job = make_job(
            req,
            info,
            image,
            default_timeout_ms=ctx.settings.default_timeout_ms,
            request_id=request.state.request_id,
            traceparent=tp,
            image_size=size,
            max_answer_bytes=ctx.settings.max_answer_bytes,
        )
        reply = (await _submit_unless_disconnected(request, ctx.broker.submit(job, key))).raise_for_status()
    total_ms = (time.perf_counter() - started) * 1000.0
    return _respond(request, reply, req, "uncertainty" if kind == "uncertainty" else "prediction", total_ms)


def _body_fields(params: type[BaseModel], body: dict[str, Any]) -> dict[str, Any]:
    """Form or JSON fields beside the image, checked by the route's own parameter model (so a field the
    schema does not list is refused, as in the query string); a JSON `null` means "the default"."""
    try:
        return params.model_validate(body).model_dump(exclude_unset=True, exclude_none=True)
    except ValidationError as exc:
        raise invalid_parameter(exc) from exc


async def _submit_unless_disconnected(request: Request, submission: Coroutine[Any, Any, Reply]) -> Reply:
    """Await the answer, unless the client closes the connection first: then the submission is cancelled, which
    tells the queue (a cancel marker on Redis), so a job still waiting is never computed. Servers do not cancel
    a handler whose client left; they only pass `http.disconnect` to whoever receives next."""
    answer = asyncio.ensure_future(submission)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)
    if answer.cancelled():
        raise ClientClosed("the client closed the connection before the answer; the job was withdrawn")
    return answer.result()


async def _disconnected(request: Request) -> None:
    """The request body is read, so the next message the server has for us is the client's disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _probe(image: bytes, max_pixels: int) -> tuple[int, int]:
    """Reject at the edge what the worker would reject anyway: wrong format, too many pixels (header only);
    the image's (width, height)."""
    try:
        _, width, height = await run_in_threadpool(codec.probe_image, image, max_pixels)
        return width, height
    except codec.ImageTooLargeError as exc:
        raise PayloadTooLarge(str(exc), limit=max_pixels) from exc
    except codec.ImageDecodeError as exc:
        raise UnsupportedMedia(str(exc)) from exc


def _respond(request: Request, reply: Reply, req: PredictionRequest, main: str, total_ms: float) -> Response:
    meta = reply.metadata
    assert meta is not None
    timings = {**reply.timings, "total": total_ms}
    headers = {
        "Server-Timing": ", ".join(f"{name};dur={ms:.2f}" for name, ms in timings.items()),
        "X-Model": meta.model,
        "X-Output-Kind": meta.kind,
        "X-Batch-Size": str(reply.batch_size),
    }
    if meta.seed is not None:
        headers["X-Seed"] = str(meta.seed)
    headers["X-Steps"] = str(meta.steps)
    if meta.normals_convention:
        headers["X-Normals-Convention"] = meta.normals_convention
    if meta.uncertainty_method:  # a binary uncertainty map says which measure it is
        headers["X-Uncertainty-Method"] = meta.uncertainty_method
    if reply.worker:
        headers["X-Worker"] = reply.worker
    if req.format != "json":
        return Response(reply.outputs[main], media_type=MEDIA_TYPES[req.format], headers=headers)
    outputs = {
        name: {
            "media_type": "application/x-npy" if name == "members" else MEDIA_TYPES[req.json_encoding],
            "data": base64.b64encode(data).decode(),
        }
        for name, data in reply.outputs.items()
    }
    body = PredictionJSON(
        **meta.model_dump(exclude={"height", "width"}),
        request_id=request.state.request_id,
        batch_size=reply.batch_size,
        timings=timings,
        outputs=outputs,
    )
    return JSONResponse(body.model_dump(exclude_none=True), headers=headers)
