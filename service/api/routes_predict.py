"""`POST /v1/depth`, `/v1/normals`, `/v1/uncertainty`: validate, enqueue, await the reply, respond."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from models.outputs import Task
from service import codec, tracing
from service.api.inputs import read_input, validate_params
from service.api.negotiate import MEDIA_TYPES, OutputChoice, choose
from service.api.schemas import PredictionJSON, PredictParams, Problem, UncertaintyParams
from service.config import Settings
from service.errors import ClientClosed, InvalidParameter, PayloadTooLarge, UnsupportedMedia, from_code
from service.frontend import resolve_model
from service.jobs import Job, JobKind, JobParams, Reply
from service.queue.base import Broker

router = APIRouter(prefix="/v1", tags=["predictions"])

_PARAMS_DOC = {
    "model": "model id (default: the first model serving the task)",
    "processing_res": "long edge to process at, a multiple of 8 (0 = native size within the pixel limit)",
    "match_input_resolution": "resize the map back to the input size (default true)",
    "seed": "Lotus-G noise seed (default 0)",
    "timeout_ms": "deadline for this request (default 30000)",
    "format": "png | npy | json | color | exr | tiff (default: by Accept, else 16-bit PNG)",
    "json_encoding": "png | npy: how maps are encoded inside a JSON response",
}
_UNC_DOC = {
    "task": "depth | normals",
    "seeds": "ensemble size 2..32 (default 8); member i uses seed + i",
    "reduction": "mean (uncertainty = std / mean angle) | median (MAD / median angle)",
    "return_members": "include every member in a JSON response (NPY)",
}


def _openapi(params: dict[str, str], binary_doc: str) -> dict[str, Any]:
    fields = {name: {"type": "string", "description": doc} for name, doc in params.items()}
    return {
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": {"type": "string"}, "description": doc}
            for name, doc in params.items()
        ],
        "requestBody": {
            "required": True,
            "description": "the image: a multipart 'image' file, a raw image body, or JSON with base64 'image'",
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "string", "format": "binary"}, **fields},
                    }
                },
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/webp": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "string", "format": "byte"}, **fields},
                    }
                },
            },
        },
        "responses": {
            "200": {
                "description": binary_doc,
                "content": {
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
                    "image/x-exr": {"schema": {"type": "string", "format": "binary"}},
                    "image/tiff": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {"schema": {"$ref": "#/components/schemas/PredictionJSON"}},
                },
            }
        },
    }


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": text, "content": {"application/problem+json": {}}}
    for status, text in [
        (401, "missing or invalid API key"),
        (404, "unknown model"),
        (406, "no acceptable representation"),
        (413, "upload or pixel limit exceeded"),
        (415, "not a supported image"),
        (422, "invalid parameter, or the model does not serve this request"),
        (429, "queue full (see Retry-After)"),
        (500, "the model failed on this request"),
        (503, "no model ready yet, or shutting down"),
        (504, "deadline exceeded"),
    ]
}
_MODELS = {"PredictionJSON": PredictionJSON}


@router.post(
    "/depth",
    summary="Depth (or disparity) map of an image",
    responses=_ERRORS,
    openapi_extra=_openapi(
        _PARAMS_DOC,
        "16-bit PNG (round(v * 65535)), float32 NPY, half-float EXR (channel Y), float32 TIFF, JSON, or a colour "
        "preview",
    ),
)
async def depth(request: Request) -> Response:
    return await _handle(request, "predict", "depth")


@router.post(
    "/normals",
    summary="Surface normals of an image",
    responses=_ERRORS,
    openapi_extra=_openapi(
        _PARAMS_DOC,
        "8-bit RGB PNG ((n + 1) / 2 * 255), float32 NPY [H, W, 3], half-float EXR (R, G, B), float32 TIFF, or JSON",
    ),
)
async def normals(request: Request) -> Response:
    return await _handle(request, "predict", "normals")


@router.post(
    "/uncertainty",
    summary="Lotus-G multi-seed prediction and its uncertainty",
    responses=_ERRORS,
    openapi_extra=_openapi(
        _PARAMS_DOC | _UNC_DOC,
        "binary formats carry the uncertainty map (16-bit PNG of value / uncertainty_png_max, NPY, or colour); "
        "JSON carries prediction, uncertainty and optionally members",
    ),
)
async def uncertainty(request: Request) -> Response:
    return await _handle(request, "uncertainty", None)


async def _handle(request: Request, kind: JobKind, task: Task | None) -> Response:
    started = time.perf_counter()
    settings: Settings = request.app.state.settings
    broker: Broker = request.app.state.broker
    image, raw = await read_input(request, settings.max_upload_bytes)
    params: PredictParams = validate_params(UncertaintyParams if kind == "uncertainty" else PredictParams, raw)
    if isinstance(params, UncertaintyParams):
        task = params.task
        if params.seeds > settings.uncertainty_max_seeds:
            raise InvalidParameter(f"seeds: at most {settings.uncertainty_max_seeds}", field="seeds")
    assert task is not None
    choice = choose(params.format, request.headers.get("accept"), params.json_encoding)
    info = await resolve_model(
        broker, params.model, task, kind, request.app.state.expected_models, settings.scale_from_zero
    )
    if params.processing_res is not None and (
        params.processing_res % 8 or params.processing_res > settings.max_processing_res
    ):
        raise InvalidParameter(
            f"processing_res: must be 0 or a multiple of 8 up to {settings.max_processing_res}, "
            f"got {params.processing_res}",
            field="processing_res",
        )
    if params.timeout_ms is not None and params.timeout_ms > settings.max_timeout_ms:
        raise InvalidParameter(f"timeout_ms: at most {settings.max_timeout_ms}", field="timeout_ms")
    timeout_ms = params.timeout_ms or settings.default_timeout_ms
    await _probe(image, settings.max_pixels)

    with tracing.span("dense.request", request.state.traceparent, model=info.id, task=task, kind=kind) as tp:
        base_seed = params.seed if params.seed is not None else 0
        job = Job(
            kind=kind,
            model=info.id,
            task=task,
            deadline=time.time() + timeout_ms / 1000.0,
            image=image,
            request_id=request.state.request_id,
            traceparent=tp,
            params=JobParams(
                processing_res=params.processing_res,
                match_input_resolution=params.match_input_resolution,
                seed=params.seed,
                encoding=choice.encoding,
                seeds=[base_seed + i for i in range(params.seeds)] if isinstance(params, UncertaintyParams) else None,
                reduction=params.reduction if isinstance(params, UncertaintyParams) else "mean",
                return_members=isinstance(params, UncertaintyParams) and params.return_members and choice.as_json,
            ),
        )
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 255:
            raise InvalidParameter("Idempotency-Key must be 1 to 255 characters", field="Idempotency-Key")
        reply = await _submit_unless_disconnected(request, broker.submit(job, key))
        if reply.status != "ok":
            error = reply.error
            raise from_code(error.code if error else "internal", error.detail if error else f"job {reply.status}")
    total_ms = (time.perf_counter() - started) * 1000.0
    return _respond(request, reply, choice, "uncertainty" if kind == "uncertainty" else "prediction", total_ms)


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


async def _probe(image: bytes, max_pixels: int) -> None:
    """Reject at the edge what the worker would reject anyway: wrong format, too many pixels."""
    try:
        await run_in_threadpool(codec.probe_image, image, max_pixels)
    except codec.ImageTooLargeError as exc:
        raise PayloadTooLarge(str(exc), limit=max_pixels) from exc
    except codec.ImageDecodeError as exc:
        raise UnsupportedMedia(str(exc)) from exc


def _respond(request: Request, reply: Reply, choice: OutputChoice, main: str, total_ms: float) -> Response:
    timings = {**reply.timings, "total": total_ms}
    headers = {
        "Server-Timing": ", ".join(f"{name};dur={ms:.2f}" for name, ms in timings.items()),
        "X-Model": str(reply.metadata.get("model", "")),
        "X-Output-Kind": str(reply.metadata.get("kind", "")),
        "X-Batch-Size": str(reply.batch_size),
    }
    if reply.metadata.get("seed") is not None:
        headers["X-Seed"] = str(reply.metadata["seed"])
    if reply.metadata.get("worker"):
        headers["X-Worker"] = str(reply.metadata["worker"])
    if not choice.as_json:
        return Response(reply.outputs[main], media_type=choice.media_type, headers=headers)
    meta = {k: v for k, v in reply.metadata.items() if k not in ("height", "width")}
    outputs = {
        name: {
            "media_type": "application/x-npy" if name == "members" else MEDIA_TYPES[choice.encoding],
            "data": base64.b64encode(data).decode(),
        }
        for name, data in reply.outputs.items()
    }
    body = {
        **meta,
        "request_id": request.state.request_id,
        "batch_size": reply.batch_size,
        "timings": timings,
        "outputs": outputs,
    }
    return JSONResponse(body, headers=headers)
