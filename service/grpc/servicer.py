"""The DenseService implementation: the same jobs as REST, over unary calls and ordered bidirectional
streams with a per-stream in-flight window and latest-frame-wins dropping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from service import codec, logs, metrics
from service.config import Settings
from service.errors import InvalidParameter, PayloadTooLarge, ServiceError, UnsupportedMedia
from service.frontend import make_job, resolve_model
from service.grpc.stubs import dense_pb2 as pb
from service.grpc.stubs import dense_pb2_grpc
from service.queue.base import Broker
from service.request import AnswerUncertainty, Format, Limits, PredictionRequest, parse_request

log = logging.getLogger(__name__)

#: The proto's encodings are the request vocabulary's formats, one to one.
FORMATS: dict[int, Format] = {
    pb.OUTPUT_ENCODING_UNSPECIFIED: "raw16",
    pb.OUTPUT_ENCODING_RAW_FLOAT16: "raw16",
    pb.OUTPUT_ENCODING_RAW_FLOAT32: "raw32",
    pb.OUTPUT_ENCODING_PNG16: "png",
    pb.OUTPUT_ENCODING_EXR: "exr",
    pb.OUTPUT_ENCODING_TIFF: "tiff",
    pb.OUTPUT_ENCODING_NPY: "npy",
    pb.OUTPUT_ENCODING_COLOR: "color",
}
DTYPES: dict[Format, str] = {"raw16": "float16", "raw32": "float32", "color": "png"}
TASKS: dict[int, str] = {pb.TASK_NORMALS: "normals", pb.TASK_SEGMENT: "segment"}
UNCERTAINTY: dict[int, AnswerUncertainty] = {
    pb.ANSWER_UNCERTAINTY_NONE: "none",
    pb.ANSWER_UNCERTAINTY_STEPS: "steps",
}


def status_of(exc: ServiceError) -> grpc.StatusCode:
    return grpc.StatusCode[exc.grpc_status]


def trailers_of(exc: ServiceError) -> tuple[tuple[str, str], ...]:
    """The problem's code and field beside the status, as REST's problem+json carries them."""
    field_at_fault = (("dense-error-field", exc.field),) if exc.field else ()
    return (("dense-error-type", exc.code), *field_at_fault)


async def abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    """The call's status with our sentence, or for an internal failure a generic one and the request id (the
    log keeps the detail); the id also travels as `x-request-id` in the trailers."""
    request_id = logs.REQUEST_ID.get()
    log_internal(exc, request_id)
    trailers = (*trailers_of(exc), *((("x-request-id", request_id),) if request_id else ()))
    await context.abort(status_of(exc), exc.client_detail(request_id), trailing_metadata=trailers)


def log_internal(exc: ServiceError, request_id: str | None) -> None:
    """What the client is not told (a 500's detail, an unexpected exception's traceback) goes to the log."""
    if not exc.public:
        log.error("%s (request %s): %s", exc.code, request_id, exc.detail, exc_info=exc.__cause__)


def unexpected(exc: Exception) -> ServiceError:
    """An exception no code meant to raise, as a generic INTERNAL (left alone, gRPC would send the client its
    type and text); the original rides along as the cause, for the log."""
    error = ServiceError(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def request_of(req: pb.PredictRequest, limits: Limits, deadline_s: float | None = None) -> PredictionRequest:
    """The proto's fields, by their REST names, into the one request model (validated there)."""
    fields: dict[str, object] = {
        "model": req.model or None,
        "task": TASKS.get(req.task, "depth"),
        "format": FORMATS.get(req.encoding, "raw16"),
        "match_input_resolution": req.match_input_resolution
        if req.HasField("match_input_resolution")
        else not req.native_size,
    }
    for name in ("processing_res", "seed", "steps", "ensemble_size"):
        if req.HasField(name):
            fields[name] = getattr(req, name)
    if req.uncertainty:
        fields["uncertainty"] = UNCERTAINTY.get(req.uncertainty, str(req.uncertainty))
    if req.steps_auto:
        if req.HasField("steps"):
            raise InvalidParameter("set steps or steps_auto, not both", field="steps")
        fields["steps"] = "auto"
    timeout_ms = req.timeout_ms or None
    if deadline_s is not None:  # the call's own deadline bounds the job's
        timeout_ms = max(1, min(timeout_ms or limits.max_timeout_ms, int(deadline_s * 1000)))
    if timeout_ms is not None:
        fields["timeout_ms"] = min(timeout_ms, limits.max_timeout_ms) if deadline_s is not None else timeout_ms
    if fields["task"] == "segment" and req.encoding == pb.OUTPUT_ENCODING_UNSPECIFIED:
        fields["format"] = "png"  # a class map's default: 8-bit index PNG (float encodings do not apply)
    return parse_request(fields, limits)


@dataclass
class _Frame:
    request: pb.PredictRequest
    task: asyncio.Task[pb.PredictResponse] | None = None  # None: waiting here, not yet submitted
    dropped: bool = field(default=False)


@dataclass
class _Window:
    """A stream's flow control, changed by its `StreamConfig` messages."""

    max_in_flight: int
    drop_stale: bool = False
    steps_auto: bool = False  # frames without steps run steps=auto


class DenseServicer(dense_pb2_grpc.DenseServiceServicer):
    def __init__(self, broker: Broker, settings: Settings, expected_models: Sequence[str] = ()) -> None:
        self.broker = broker
        self.settings = settings
        self.limits = Limits.of(settings)
        self.expected = list(expected_models)

    # ------------------------------------------------------------------ unary

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        with _log_context(context):
            try:
                return await self._measured(request, time.perf_counter(), "Predict", context.time_remaining())
            except ServiceError as exc:
                await abort(context, exc)
                raise  # unreachable: abort raises
            except Exception as exc:
                await abort(context, unexpected(exc))
                raise

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        with _log_context(context):
            try:
                catalog = await self.broker.catalog()
            except ServiceError as exc:
                await abort(context, exc)
                raise
            except Exception as exc:
                await abort(context, unexpected(exc))
                raise
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    id=m.id,
                    family=m.family,
                    task=m.task,
                    output_kind=m.output_kind,
                    processing_res=m.processing_res,
                    backend=m.backend,
                    device=m.device,
                    dtype=m.dtype,
                    max_batch_size=m.max_batch_size,
                    generative=m.generative,
                    multi_step=m.multi_step,
                    default_steps=m.default_steps,
                    classes=m.classes or [],
                    base_model=m.base_model or "",
                    normals_convention=m.normals_convention or "",
                    random_weights=m.random_weights,  # None: unset (no worker has loaded it yet)
                )
                for m in catalog
            ]
        )

    async def _measured(
        self, req: pb.PredictRequest, started: float, route: str, deadline_s: float | None = None
    ) -> pb.PredictResponse:
        """`_predict` with the request metrics: one observation per call or stream frame, by gRPC status."""
        status, model, size = "UNKNOWN", req.model, 0
        try:
            with metrics.in_flight("grpc"):
                response = await self._predict(req, started, deadline_s)
            status, model, size = "OK", response.model, len(response.data)
            return response
        except ServiceError as exc:
            status = status_of(exc).name
            raise
        finally:
            task = TASKS.get(req.task, "depth")
            bytes_in = len(req.raw.data) if req.WhichOneof("image") == "raw" else len(req.encoded)
            elapsed = time.perf_counter() - started
            metrics.observe_request("grpc", route, model, task, status, elapsed, bytes_in, size)

    async def _predict(
        self, req: pb.PredictRequest, started: float, deadline_s: float | None = None
    ) -> pb.PredictResponse:
        s = self.settings
        request = request_of(req, self.limits, deadline_s)
        info = await resolve_model(
            self.broker, request.model, request.task, "predict", self.expected, s.scale_from_zero
        )
        image, raw_shape, size = await self._image(req)
        job = make_job(
            request,
            info,
            image,
            default_timeout_ms=s.default_timeout_ms,
            request_id=logs.REQUEST_ID.get() or uuid.uuid4().hex,
            traceparent=logs.TRACEPARENT.get(),
            image_size=size,
            max_answer_bytes=s.max_answer_bytes,
            raw_shape=raw_shape,
        )
        reply = (await self.broker.submit(job)).raise_for_status()
        meta = reply.metadata
        assert meta is not None
        return pb.PredictResponse(
            frame_id=req.frame_id,
            timestamp_ns=req.timestamp_ns,
            status=pb.FRAME_STATUS_OK,
            data=reply.outputs["prediction"],
            shape=meta.shape,
            dtype=DTYPES.get(request.format, request.format),
            kind=meta.kind,
            encoding=req.encoding
            or (pb.OUTPUT_ENCODING_PNG16 if request.task == "segment" else pb.OUTPUT_ENCODING_RAW_FLOAT16),
            model=meta.model,
            seed=meta.seed,
            steps=meta.steps,
            normals_convention=meta.normals_convention or "",
            affine_invariant=meta.affine_invariant,
            queue_ms=reply.timings.get("queue", 0.0),
            compute_ms=reply.timings.get("compute", 0.0),
            total_ms=(time.perf_counter() - started) * 1000.0,
            classes=meta.classes or [],
            class_pixels=meta.class_pixels or {},
            uncertainty_data=reply.outputs.get("uncertainty", b""),
            uncertainty_method=meta.uncertainty_method or "",
            step_window=meta.step_window or 0,
            uncertainty_decodes=meta.uncertainty_decodes or 0,
            uncertainty_unit=meta.uncertainty_unit or "",
            uncertainty_measure=meta.uncertainty_measure or "",
            uncertainty_png_max=meta.uncertainty_png_max or 0.0,
            uncertainty_max=meta.uncertainty_max or 0.0,
        )

    async def _image(self, req: pb.PredictRequest) -> tuple[bytes, list[int] | None, tuple[int, int]]:
        """The image, its raw shape (raw RGB only) and its (width, height), checked against the limits."""
        s = self.settings
        which = req.WhichOneof("image")
        try:
            if which == "raw":
                raw = req.raw
                codec.check_raw_rgb(len(raw.data), raw.height, raw.width, s.max_pixels)
                return raw.data, [raw.height, raw.width], (raw.width, raw.height)
            if which == "encoded":
                if len(req.encoded) > s.max_upload_bytes:
                    raise PayloadTooLarge(
                        f"image of {len(req.encoded)} bytes exceeds the upload limit of {s.max_upload_bytes} bytes"
                    )
                _, width, height = await asyncio.to_thread(codec.probe_image, req.encoded, s.max_pixels)
                return req.encoded, None, (width, height)
        except codec.ImageTooLargeError as exc:
            raise PayloadTooLarge(str(exc)) from exc
        except codec.ImageDecodeError as exc:
            raise UnsupportedMedia(str(exc)) from exc
        raise InvalidParameter("the request carries no image (set encoded or raw)", field="image")

    # ------------------------------------------------------------------ streaming

    async def StreamPredict(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictResponse]:
        """Answers in frame order. At most `max_in_flight` frames are submitted at once. Without drop_stale,
        reading pauses while the window is full (the client's sends back up). With drop_stale, reading goes
        on and frames wait here; a newer frame drops every older one still waiting, so a dropped frame is
        never submitted, let alone computed."""
        cap = self.settings.grpc_max_in_flight
        window = _Window(min(self.settings.grpc_default_in_flight, cap))
        frames: deque[_Frame] = deque()
        changed = asyncio.Condition()
        reading_done = False

        def submitted_live() -> int:
            return sum(f.task is not None and not f.task.done() for f in frames)

        def pump() -> None:
            """Submit waiting frames, oldest first, while the window has room (call with the lock held)."""
            for frame in frames:
                if submitted_live() >= window.max_in_flight:
                    break
                if frame.task is None and not frame.dropped:
                    frame.task = asyncio.create_task(self._frame(frame.request))
                    frame.task.add_done_callback(lambda _t: asyncio.get_running_loop().create_task(settle()))

        async def settle() -> None:
            async with changed:
                pump()
                changed.notify_all()

        async def read() -> None:
            nonlocal reading_done
            try:
                async for message in request_iterator:
                    if message.HasField("config"):
                        if message.config.max_in_flight:
                            window.max_in_flight = max(1, min(int(message.config.max_in_flight), cap))
                        window.drop_stale = bool(message.config.drop_stale)
                        window.steps_auto = bool(message.config.steps_auto)
                        continue
                    if window.steps_auto and not message.frame.HasField("steps"):
                        message.frame.steps_auto = True
                    async with changed:
                        if window.drop_stale:
                            for older in frames:
                                if older.task is None:
                                    older.dropped = True
                        else:
                            await changed.wait_for(lambda: submitted_live() < window.max_in_flight)
                        frames.append(_Frame(message.frame))
                        pump()
                        changed.notify_all()
            finally:
                async with changed:
                    reading_done = True
                    changed.notify_all()

        def head_ready() -> bool:
            if not frames:
                return reading_done
            head = frames[0]
            return head.dropped or (head.task is not None and head.task.done())

        reader = asyncio.create_task(read())
        try:
            while True:
                async with changed:
                    await changed.wait_for(head_ready)
                    if not frames:
                        break
                    head = frames.popleft()
                    pump()
                    changed.notify_all()
                if head.dropped:
                    metrics.FRAMES_DROPPED_STALE.labels(head.request.model).inc()
                    yield pb.PredictResponse(
                        frame_id=head.request.frame_id,
                        timestamp_ns=head.request.timestamp_ns,
                        status=pb.FRAME_STATUS_DROPPED,
                    )
                else:
                    assert head.task is not None
                    yield head.task.result()
            await reader
        finally:
            # Client cancel or disconnect: nothing of this stream stays queued.
            reader.cancel()
            for frame in frames:
                if frame.task is not None:
                    frame.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _frame(self, req: pb.PredictRequest) -> pb.PredictResponse:
        """One frame; a bad frame becomes an ERROR response and the stream goes on."""
        started = time.perf_counter()
        request_id = uuid.uuid4().hex  # each frame is its own job: its own id in the logs and in a 500's message
        with logs.context(request_id, logs.TRACEPARENT.get()):
            try:
                return await self._measured(req, started, "StreamPredict")
            except ServiceError as exc:
                error = exc
            except Exception as exc:
                error = unexpected(exc)
            log_internal(error, request_id)
        return self._error_frame(req, error, request_id, started)

    @staticmethod
    def _error_frame(req: pb.PredictRequest, exc: ServiceError, request_id: str, started: float) -> pb.PredictResponse:
        return pb.PredictResponse(
            frame_id=req.frame_id,
            timestamp_ns=req.timestamp_ns,
            status=pb.FRAME_STATUS_ERROR,
            error_code=status_of(exc).value[0],
            error_message=exc.client_detail(request_id),
            error_type=exc.code,
            error_field=exc.field or "",
            total_ms=(time.perf_counter() - started) * 1000.0,
        )


def _log_context(context: grpc.aio.ServicerContext) -> contextlib.AbstractContextManager[None]:
    """The call's `x-request-id` and `traceparent` metadata (or new ones) for the logs and the job."""
    meta = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    return logs.context(*logs.request_identity(meta.get("x-request-id"), meta.get("traceparent")))
