"""`StreamClient`: camera frames in, maps out, in frame order, over the gRPC bidirectional stream.

Needs the `grpc` extra (`pip install 'dense-serve-client[grpc]'`): grpcio and protobuf, plus the stubs this
package ships (generated from the server's `proto/dense/v1/dense.proto`).

Flow control is the server's: without `drop_stale` it stops reading while `max_in_flight` frames are queued,
so the frame iterator is simply not advanced (the robot is slowed down and nothing is lost); with
`drop_stale` a newer frame supersedes every older one still waiting (latest frame wins), which bounds latency
when the camera is faster than the model.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dense_serve_client.errors import APIError, TransportError, error_class
from dense_serve_client.images import ImageInput, pixels_of

try:
    import grpc

    from dense_serve_client._proto import dense_pb2 as pb
    from dense_serve_client._proto import dense_pb2_grpc
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("StreamClient needs gRPC: pip install 'dense-serve-client[grpc]'") from exc

StreamEncoding = Literal["raw16", "raw32"]
_ENCODINGS = {"raw16": pb.OUTPUT_ENCODING_RAW_FLOAT16, "raw32": pb.OUTPUT_ENCODING_RAW_FLOAT32}
_TASKS = {"depth": pb.TASK_DEPTH, "normals": pb.TASK_NORMALS}
#: gRPC status -> the HTTP status of the same problem (what `APIError.status` says).
_HTTP_OF = {
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "INVALID_ARGUMENT": 422,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True, eq=False)
class StreamFrame:
    """One answer. Unpacks as `(frame_id, array)`; `array` is float32 `[H, W]` or `[H, W, 3]`, or None for a
    dropped or failed frame (`status` says which; `error` is the failure)."""

    frame_id: int
    array: np.ndarray | None
    status: Literal["ok", "dropped", "error"] = "ok"
    kind: str = ""
    model: str = ""
    timestamp_ns: int = 0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    total_ms: float = 0.0
    #: Denoising steps the frame ran (multi-step models; with `steps="auto"` what its deadline allowed).
    steps: int = 1
    #: With `uncertainty="steps"`: float32 `[H, W]`, how much the map still changed over the run's last steps.
    uncertainty: np.ndarray | None = field(default=None, repr=False)
    error: APIError | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.frame_id, self.array))


class StreamClient:
    """A gRPC channel to dense-serve (`host:port`). `api_key` goes in the call metadata
    (`authorization: Bearer KEY`); `tls=True` uses TLS with the system's roots, or `root_certificates` (PEM
    bytes or a path) for a private CA, plus `private_key` / `certificate_chain` for mutual TLS."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
        certificate_chain: bytes | str | Path | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.target = target
        opts = [("grpc.max_receive_message_length", 256 * 2**20), ("grpc.max_send_message_length", 256 * 2**20)]
        opts += options or []
        if tls or root_certificates is not None or private_key is not None or certificate_chain is not None:
            creds = grpc.ssl_channel_credentials(_pem(root_certificates), _pem(private_key), _pem(certificate_chain))
            self._channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._stub = dense_pb2_grpc.DenseServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def stream(
        self,
        frames: Iterable[ImageInput | tuple[int, ImageInput]],
        *,
        task: Literal["depth", "normals"] = "depth",
        model: str | None = None,
        processing_res: int | None = None,
        match_input_resolution: bool | None = None,
        seed: int | None = None,
        steps: int | Literal["auto"] | None = None,
        ensemble_size: int | None = None,
        uncertainty: Literal["none", "steps"] | None = None,
        timeout_ms: int | None = None,
        encoding: StreamEncoding = "raw16",
        drop_stale: bool = False,
        max_in_flight: int | None = None,
        dropped: Literal["skip", "yield"] = "skip",
        errors: Literal["raise", "yield"] = "raise",
        timeout: float | None = None,
    ) -> FrameStream:
        """Send `frames` (uint8 `[H, W, 3]` arrays or PIL images go raw, without encoding; bytes or paths go
        as encoded files; a `(frame_id, image)` pair sets the id, else ids count from 0) and iterate the answers
        in frame order. Parameters are the REST API's; `encoding` is the wire format (`raw16`, half the bytes,
        or `raw32`), both returned as float32. `steps="auto"` (multi-step models) lets each frame run the most
        steps that fit its `timeout_ms` at the server's measured step time, so under load the stream loses
        quality instead of frames (`StreamFrame.steps` says how many ran); `uncertainty="steps"` adds each
        frame's step-change uncertainty (`StreamFrame.uncertainty`). Dropped frames are skipped unless
        `dropped="yield"`; a frame the server refuses raises its typed error unless `errors="yield"`.
        `timeout` bounds the whole call."""
        if task not in _TASKS:
            raise ValueError(f"task must be 'depth' or 'normals', got {task!r}")
        if encoding not in _ENCODINGS:
            raise ValueError(f"encoding must be 'raw16' or 'raw32', got {encoding!r}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        template = pb.PredictRequest(task=_TASKS[task], model=model or "", encoding=_ENCODINGS[encoding])
        if steps == "auto":
            template.steps_auto = True
        elif isinstance(steps, str):
            raise ValueError(f"steps must be a count or 'auto', got {steps!r}")
        if uncertainty not in (None, "none", "steps"):
            raise ValueError(f"uncertainty must be 'none' or 'steps', got {uncertainty!r}")
        if uncertainty == "steps":
            template.uncertainty = pb.ANSWER_UNCERTAINTY_STEPS
        for name, value in (
            ("processing_res", processing_res),
            ("match_input_resolution", match_input_resolution),
            ("seed", seed),
            ("steps", None if steps == "auto" else steps),
            ("ensemble_size", ensemble_size),
            ("timeout_ms", timeout_ms),
        ):
            if value is not None:
                setattr(template, name, value)
        config = pb.StreamConfig(max_in_flight=max_in_flight or 0, drop_stale=drop_stale)
        return FrameStream(self._stub, self._metadata, frames, template, config, dropped, errors, timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FrameStream:
    """The answers of one stream call, in frame order. `cancel()` (or `close()`, leaving a `with` block, or
    dropping the iterator, as `break` out of a `for` loop does) cancels the call: the server removes the
    stream's queued frames."""

    def __init__(
        self,
        stub: Any,
        metadata: tuple[tuple[str, str], ...],
        frames: Iterable[Any],
        template: Any,
        config: Any,
        dropped: str,
        errors: str,
        timeout: float | None,
    ) -> None:
        self._source_error: BaseException | None = None
        self._cancelled = threading.Event()
        self._dropped = dropped
        self._errors = errors
        self._call = stub.StreamPredict(
            self._requests(frames, template, config), metadata=metadata or None, timeout=timeout
        )
        self._answers = iter(self._call)

    def _requests(self, frames: Iterable[Any], template: Any, config: Any) -> Iterator[Any]:
        yield pb.StreamRequest(config=config)
        counter = itertools.count()
        try:
            for item in frames:
                if self._cancelled.is_set():
                    return
                frame_id, image = item if isinstance(item, tuple) else (next(counter), item)
                req = pb.PredictRequest()
                req.CopyFrom(template)
                req.frame_id = frame_id
                req.timestamp_ns = time.time_ns()
                pixels = pixels_of(image)
                if pixels is not None:
                    req.raw.height, req.raw.width = pixels.shape[0], pixels.shape[1]
                    req.raw.data = np.ascontiguousarray(pixels).tobytes()
                else:
                    from dense_serve_client.images import image_bytes

                    req.encoded = image_bytes(image)
                yield pb.StreamRequest(frame=req)
        except Exception as exc:  # the caller's frame source failed: end the call and raise it to the reader
            self._source_error = exc
            self._call.cancel()

    def __iter__(self) -> FrameStream:
        return self

    def __next__(self) -> StreamFrame:
        while True:
            try:
                resp = next(self._answers)
            except StopIteration:
                raise
            except grpc.RpcError as exc:
                if self._source_error is not None:
                    raise self._source_error from None
                if self._cancelled.is_set() and exc.code() == grpc.StatusCode.CANCELLED:
                    raise StopIteration from None
                raise rpc_error(exc) from exc
            frame = _frame(resp)
            if frame.status == "dropped" and self._dropped == "skip":
                continue
            if frame.status == "error" and self._errors == "raise":
                self.cancel()
                assert frame.error is not None
                raise frame.error
            return frame

    def cancel(self) -> None:
        self._cancelled.set()
        self._call.cancel()

    close = cancel

    def __del__(self) -> None:  # a loop left with `break` drops the last reference: end the call with it
        with contextlib.suppress(Exception):
            self.cancel()

    def __enter__(self) -> FrameStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


def _frame(resp: Any) -> StreamFrame:
    common = {
        "frame_id": resp.frame_id,
        "kind": resp.kind,
        "model": resp.model,
        "timestamp_ns": resp.timestamp_ns,
        "queue_ms": resp.queue_ms,
        "compute_ms": resp.compute_ms,
        "total_ms": resp.total_ms,
    }
    if resp.status == pb.FRAME_STATUS_DROPPED:
        return StreamFrame(array=None, status="dropped", **common)
    if resp.status == pb.FRAME_STATUS_ERROR:
        code = _CODE_BY_VALUE.get(resp.error_code)
        cls = error_class(resp.error_type or None, _HTTP_OF.get(code.name) if code else None)
        error = cls(
            resp.error_message or "frame failed",
            status=cls.http_status if cls is not APIError else _HTTP_OF.get(code.name, 500) if code else 500,
            field=resp.error_field or None,
        )
        return StreamFrame(array=None, status="error", error=error, **common)
    if resp.dtype not in ("float16", "float32"):
        raise APIError(f"unexpected stream answer dtype {resp.dtype!r}")
    dtype = np.dtype(resp.dtype).newbyteorder("<")
    array = np.frombuffer(resp.data, dtype=dtype).reshape(tuple(resp.shape))
    spread = None
    if resp.uncertainty_data:  # bare floats in the frame's encoding, [H, W]
        spread = np.frombuffer(resp.uncertainty_data, dtype=dtype).reshape(tuple(resp.shape[:2])).astype(np.float32)
    return StreamFrame(array=array.astype(np.float32), steps=resp.steps or 1, uncertainty=spread, **common)


def rpc_error(exc: grpc.RpcError) -> APIError | TransportError:
    """A failed call -> the same typed error REST would raise (the problem code travels in the trailers)."""
    code = exc.code()
    trailers = {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
    if code == grpc.StatusCode.UNAVAILABLE and "dense-error-type" not in trailers:
        return TransportError(f"gRPC {code.name}: {exc.details()}")
    cls = error_class(trailers.get("dense-error-type"), _HTTP_OF.get(code.name))
    return cls(
        exc.details() or code.name,
        status=_HTTP_OF.get(code.name, 500) if cls is APIError else cls.http_status,
        field=trailers.get("dense-error-field"),
    )


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()
