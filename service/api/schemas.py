"""Request parameters and response bodies of the REST API (pydantic; also the OpenAPI schemas)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.outputs import OutputKind, Task
from service.jobs import ModelInfo

Format = Literal["png", "png16", "npy", "json", "color", "exr", "tiff"]


class PredictParams(BaseModel):
    """Query parameters, form fields or JSON fields of `/v1/depth` and `/v1/normals`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="model id; default: the first model serving the task")
    processing_res: int | None = Field(
        default=None, ge=0, description="long edge to process at, a multiple of 8; 0 = native size"
    )
    match_input_resolution: bool = Field(default=True, description="resize the map back to the input size")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Lotus-G noise seed (default 0)")
    timeout_ms: int | None = Field(default=None, ge=1, description="deadline for this request")
    format: Format | None = Field(
        default=None, description="png (16-bit), npy, json, color, exr (half float), tiff (float32); else by Accept"
    )
    json_encoding: Literal["png", "npy"] = Field(default="png", description="map encoding inside JSON")


class UncertaintyParams(PredictParams):
    task: Task = "depth"
    seeds: int = Field(default=8, ge=2, le=32, description="ensemble size; member i uses seed + i")
    reduction: Literal["mean", "median"] = "mean"
    return_members: bool = Field(default=False, description="include every member (JSON only, as NPY)")


class Blob(BaseModel):
    media_type: str
    data: str = Field(description="base64")


class PredictionJSON(BaseModel):
    model_config = ConfigDict(extra="allow")

    request_id: str
    model: str
    kind: OutputKind
    shape: list[int]
    affine_invariant: bool
    range: list[float]
    seed: int | None = None
    processing_size: list[int]
    batch_size: int
    timings: dict[str, float] = Field(description="milliseconds")
    outputs: dict[str, Blob] = Field(description="prediction; uncertainty; members (NPY)")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None


class ModelsOut(BaseModel):
    models: list[ModelInfo]
