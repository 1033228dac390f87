"""The job that travels from a front-end through the queue to a worker, and the reply that comes back.

Plain pydantic models, serialisable as they are (the Redis queue sends them as JSON + bytes).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from models.outputs import OutputKind, Task

JobKind = Literal["predict", "uncertainty"]
Encoding = Literal["png16", "npy", "color", "raw16", "raw32", "exr", "tiff"]


class JobParams(BaseModel):
    processing_res: int | None = None
    match_input_resolution: bool = True
    seed: int | None = None
    encoding: Encoding = "png16"
    # uncertainty only
    seeds: list[int] | None = None
    reduction: Literal["mean", "median"] = "mean"
    return_members: bool = False


class Job(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: JobKind = "predict"
    model: str
    task: Task
    params: JobParams = Field(default_factory=JobParams)
    deadline: float = Field(description="absolute epoch seconds")
    reply_to: str = ""
    traceparent: str | None = None
    request_id: str = ""
    image: bytes
    raw_shape: list[int] | None = Field(default=None, description="[H, W] when `image` is raw uint8 RGB")
    keep_result: bool = Field(default=False, description="store the reply for Idempotency-Key retries")
    enqueued_at: float = Field(default_factory=time.time)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.deadline


class ErrorInfo(BaseModel):
    code: str
    detail: str


class Reply(BaseModel):
    """`outputs` maps a name (prediction, uncertainty, members) to bytes in the job's encoding."""

    id: str
    status: Literal["ok", "error", "expired", "dropped"]
    error: ErrorInfo | None = None
    outputs: dict[str, bytes] = Field(default_factory=dict)
    metadata: dict[str, object] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict, description="milliseconds: queue, compute, ...")
    batch_size: int = 0


class ModelInfo(BaseModel):
    """What a worker serves, as the front-ends see it (no torch)."""

    id: str
    family: str
    task: Task
    output_kind: OutputKind
    generative: bool
    processing_res: int
    backend: str = "torch"
    device: str
    dtype: str
    max_batch_size: int
    max_queue_delay_ms: float
