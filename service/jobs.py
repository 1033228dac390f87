"""The job that travels from a front-end through the queue to a worker, and the reply that comes back.

Plain pydantic models, serialisable as they are (the Redis queue sends them as JSON + bytes).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from models.outputs import ServedKind, ServedTask
from models.probes.declaration import ProbeDeclaration
from service.errors import ErrorInfo
from service.request import AnswerUncertainty, PredictionRequest, Reduction, RequestKind, UncertaintyMethod

JobKind = RequestKind
#: What a worker writes: every answer format but `json`, which the front-end wraps around `png` or `npy`.
Encoding = Literal["png", "npy", "exr", "tiff", "color", "raw16", "raw32"]


class JobParams(BaseModel):
    """The worker's view of a validated `PredictionRequest`: it trusts these values."""

    processing_res: int | None = None
    match_input_resolution: bool = True
    seed: int | None = None
    encoding: Encoding = "png"
    steps: int | Literal["auto"] | None = None
    ensemble_size: int = 1
    uncertainty: AnswerUncertainty = "none"  # predict: the step-change uncertainty of the run, beside the map
    # uncertainty only
    seeds: list[int] | None = None
    reduction: Reduction = "mean"
    return_members: bool = False
    method: UncertaintyMethod = "seeds"
    # probes: the probe (the job runs on its base model's queue; segment or depth) and, segment only, the
    # combined depth answer
    probe: str | None = None
    with_depth: bool = False

    @classmethod
    def of(cls, request: PredictionRequest) -> JobParams:
        uncertainty = request.kind == "uncertainty"
        return cls(
            processing_res=request.processing_res,
            match_input_resolution=request.match_input_resolution,
            seed=request.seed,
            encoding=request.encoding,  # type: ignore[arg-type] - json is unwrapped by `encoding`
            steps=request.steps,
            ensemble_size=request.ensemble_size or 1,
            uncertainty=request.uncertainty,
            seeds=request.ensemble if uncertainty else None,
            method=request.method,
            reduction=request.reduction,
            return_members=uncertainty and request.return_members and request.format == "json",
            with_depth=request.with_depth,
        )


class Job(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: JobKind = "predict"
    model: str
    task: ServedTask
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


class MapMetadata(BaseModel):
    """What a client needs to read a map: its kind and shape, how its values are meant, who made it."""

    kind: ServedKind
    shape: list[int]
    height: int
    width: int
    affine_invariant: bool
    range: list[float]
    model: str
    processing_size: list[int]
    seed: int | None = None
    steps: int = 1
    normals_convention: str | None = None  # normals only: the camera-frame axes (models.outputs)
    ensemble_size: int | None = None
    # uncertainty answers
    uncertainty_method: UncertaintyMethod | None = None
    step_window: int | None = None
    uncertainty_decodes: int | None = Field(
        default=None, description="method=steps: the VAE decodes the uncertainty cost (it costs no UNet call)"
    )
    seeds: list[int] | None = None
    reduction: Reduction | None = None
    uncertainty_unit: str | None = None
    uncertainty_measure: str | None = None
    uncertainty_png_max: float | None = None
    uncertainty_max: float | None = None
    # segmentation answers
    classes: list[str] | None = None
    class_pixels: dict[str, int] | None = None
    depth_kind: str | None = Field(default=None, description="with_depth: the kind of the `depth` output")


class Reply(BaseModel):
    """`outputs` maps a name (prediction, uncertainty, members) to bytes in the job's encoding."""

    id: str
    status: Literal["ok", "error", "expired", "dropped"]
    error: ErrorInfo | None = None
    outputs: dict[str, bytes] = Field(default_factory=dict)
    metadata: MapMetadata | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="milliseconds: queue, compute, ...")
    batch_size: int = 0
    worker: str | None = None

    def raise_for_status(self) -> Reply:
        """The answer of an ok reply; else the error it carries, raised as the service error it was."""
        if self.status == "ok" and self.metadata is not None:
            return self
        raise (self.error or ErrorInfo(code="internal", detail=f"job {self.status}")).error()


class ModelInfo(BaseModel):
    """What a worker serves, as the front-ends see it (no torch)."""

    id: str
    family: str
    task: ServedTask
    output_kind: ServedKind
    generative: bool
    processing_res: int
    backend: str = "torch"
    device: str
    dtype: str
    max_batch_size: int
    max_queue_delay_ms: float
    multi_step: bool = False
    default_steps: int = 1
    classes: list[str] | None = Field(default=None, description="probes: the class names, by index")
    base_model: str | None = Field(default=None, description="probes: the model whose UNet pass they share")
    normals_convention: str | None = Field(
        default=None, description="normals models: the camera-frame axes of their vectors (their family's)"
    )
    random_weights: bool | None = Field(
        default=None,
        description="true: the checkpoint's weights were never trained (marked by `dense-serve make-tiny`), so "
        "its maps are noise; false: trained weights; null: no worker has loaded it yet",
    )

    def probe_entries(self, probe: ProbeDeclaration) -> list[ModelInfo]:
        """The catalog entries of a probe on this base model (its runtime, batching and queue are the base's):
        a segmentation probe is one entry; a depth probe one per served head (`ID`, and `ID.weak` or
        `ID.strong`). One rule for the worker that attached the probe and the front-end that declares it."""
        common = {
            "generative": False,
            "processing_res": probe.processing_res,
            "base_model": self.id,
            "normals_convention": None,
            "random_weights": False if self.random_weights is not None else None,  # a probe's head is trained
        }
        if probe.task == "segment":  # steps stay the base's: they reach a Marigold base's with_depth run
            update = {**common, "id": probe.id, "task": "segment", "output_kind": "segmentation"}
            return [self.model_copy(update={**update, "classes": probe.classes})]
        # a depth probe answers from one feature pass: no steps, whatever its base
        depth = {**common, "task": "depth", "output_kind": probe.output_kind, "multi_step": False, "default_steps": 1}
        return [self.model_copy(update={**depth, "id": model_id}) for model_id in probe.served_ids()]
