"""The REST API's parameter and body models (also the OpenAPI schemas) and its response bodies.

The parameter models are built per app from `Limits`, so the schema a client reads states the limits the
server enforces (`processing_res` up to `max_processing_res`, ...); every value is validated again, once, by
`service.request.PredictionRequest`.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from models.outputs import ServedKind, Task
from service.jobs import ModelInfo
from service.request import (
    SEED_MAX,
    SEEDS_CAP,
    WHOLE,
    AnswerUncertainty,
    Format,
    JsonEncoding,
    Limits,
    Reduction,
    Steps,
    UncertaintyMethod,
)

ApiFormat = Literal["png", "npy", "exr", "tiff", "color", "json"]  # `raw16`/`raw32` are gRPC's bare floats


def _predict_fields(limits: Limits) -> dict[str, Any]:
    return {
        "model": (
            str | None,
            Field(default=None, min_length=1, max_length=200, description="model id; default: the first serving"),
        ),
        "processing_res": (
            Annotated[int, Field(ge=0, le=limits.max_processing_res, multiple_of=8), WHOLE] | None,
            Field(default=None, description="long edge the model sees (0 = native size); default: the model's"),
        ),
        "match_input_resolution": (bool, Field(default=True, description="resize the map back to the input size")),
        "seed": (
            Annotated[int, Field(ge=0, le=SEED_MAX), WHOLE] | None,
            Field(default=None, description="Lotus-G noise seed (default 0)"),
        ),
        "steps": (
            Steps | None,
            Field(
                default=None,
                description="denoising steps (default: the model's); auto = the most that fit the deadline; "
                "single-step families (Lotus, E2E-FT) take 1 and refuse other numbers",
            ),
        ),
        "ensemble_size": (
            Annotated[int, Field(ge=1, le=SEEDS_CAP), WHOLE] | None,
            Field(default=None, description="multi-step (Marigold): members ensembled as diffusers does"),
        ),
        "timeout_ms": (
            Annotated[int, Field(ge=1, le=limits.max_timeout_ms), WHOLE] | None,
            Field(default=None, description="deadline in ms (default: the server's)"),
        ),
        "format": (ApiFormat | None, Field(default=None, description="answer format; default: by Accept, else png")),
        "json_encoding": (JsonEncoding, Field(default="png", description="map encoding inside a JSON answer")),
    }


def _uncertainty_fields(limits: Limits) -> dict[str, Any]:
    return {
        "task": (Task, Field(default="depth", description="depth or normals")),
        "seeds": (
            Annotated[int, Field(ge=2, le=limits.max_seeds), WHOLE] | None,
            Field(default=None, description="ensemble size (default 8); member i uses seed + i (mod 2^31)"),
        ),
        "reduction": (Reduction, Field(default="mean", description="mean (std / mean angle) or median (MAD)")),
        "return_members": (bool, Field(default=False, description="every member too (JSON answers, as NPY)")),
        "method": (
            UncertaintyMethod,
            Field(
                default="seeds",
                description="seeds: ours (multi-seed, least squares to member 0, population std); diffusers: "
                "Marigold's ensembling (joint alignment, MAD or sample std over the range); steps: change of the "
                "x0 prediction over the last steps of one run (no extra UNet calls). The last two: Marigold",
            ),
        ),
    }


@cache
def segment_parameters(limits: Limits) -> type[BaseModel]:
    """`/v1/segment`: the prediction parameters, formats png (8-bit index), npy, color (overlay) or json, and
    `with_depth`."""
    fields = _predict_fields(limits)
    fields["format"] = (
        Literal["png", "npy", "color", "json"] | None,
        Field(default=None, description="8-bit index PNG, uint8 NPY, colour overlay, or JSON with counts"),
    )
    fields["with_depth"] = (
        bool,
        Field(default=False, description="also the base model's map from the same UNet pass (format=json)"),
    )
    return create_model("SegmentParams", __config__=ConfigDict(extra="forbid"), **fields)


@cache
def parameter_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    """The query/form/JSON parameters of `/v1/depth`, `/v1/normals` and of `/v1/uncertainty`."""
    config = ConfigDict(extra="forbid")
    answer_uncertainty = (
        AnswerUncertainty,
        Field(
            default="none",
            description="steps: also the step-change uncertainty of the same run (the numbers of "
            "/v1/uncertainty?method=steps) as output `uncertainty`; multi-step (Marigold) models, steps >= 2, "
            "format=json; VAE decodes only, no extra UNet call",
        ),
    )
    predict = create_model(
        "PredictParams", __config__=config, **_predict_fields(limits), uncertainty=answer_uncertainty
    )
    uncertainty = create_model(
        "UncertaintyParams", __config__=config, **_predict_fields(limits), **_uncertainty_fields(limits)
    )
    return predict, uncertainty


def request_body(params: type[BaseModel]) -> dict[str, Any]:
    """The three request shapes, for the OpenAPI document: a multipart upload, a raw image, or JSON with base64.
    Their fields are the parameter model's own (the same names and limits as the query string)."""
    fields = params.model_json_schema()["properties"]
    form = {name: _not_null(schema) for name, schema in fields.items()}  # a form field is absent, never null
    multipart = {"image": {"type": "string", "format": "binary", "description": "the image file"}, **form}
    json = {
        "image": {"type": "string", "format": "byte", "contentEncoding": "base64", "description": "the image, base64"},
        **fields,
    }
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "requestBody": {
            "required": True,
            "description": "the image (PNG, JPEG, WebP, BMP, TIFF, GIF, PPM) as a multipart `image` file, as the "
            "raw body, or base64 in JSON; parameters in the query string, form fields or JSON fields",
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": multipart,
                        "additionalProperties": False,
                    },
                    "encoding": {"image": {"contentType": "image/*, application/octet-stream"}},
                },
                **{media: binary for media in ("image/png", "image/jpeg", "image/webp", "application/octet-stream")},
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": json,
                        "additionalProperties": False,
                    }
                },
            },
        }
    }


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [T, null]` -> T, keeping the description and default."""
    options = [o for o in schema.get("anyOf", []) if o.get("type") != "null"]
    if len(options) != 1:
        return schema
    rest = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
    return {**options[0], **rest}


class Blob(BaseModel):
    media_type: str
    data: str = Field(description="base64")


class PredictionJSON(BaseModel):
    """`format=json`: the map's metadata, with the maps base64-encoded in `outputs`."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    model: str
    kind: ServedKind
    shape: list[int]
    affine_invariant: bool
    range: list[float]
    seed: int | None = None
    steps: int = Field(default=1, description="denoising steps that made the map")
    normals_convention: str | None = Field(
        default=None,
        description="normals only: the camera-frame axes of the vectors, the family's own (Lotus, E2E-FT: +x image "
        "left; Marigold: +x image right; +y up, +z towards the camera)",
    )
    ensemble_size: int | None = Field(default=None, description="multi-step: members ensembled (diffusers' way)")
    uncertainty_method: str | None = Field(default=None, description="uncertainty: seeds, diffusers or steps")
    step_window: int | None = Field(default=None, description="method=steps: step changes averaged")
    uncertainty_decodes: int | None = Field(
        default=None, description="method=steps: the extra VAE decodes it cost (no extra UNet call)"
    )
    processing_size: list[int]
    batch_size: int
    timings: dict[str, float] = Field(description="milliseconds per stage")
    outputs: dict[str, Blob] = Field(
        description="prediction; uncertainty (/v1/uncertainty, or uncertainty=steps); members (NPY)"
    )
    seeds: list[int] | None = None
    reduction: Reduction | None = None
    uncertainty_unit: str | None = None
    uncertainty_measure: str | None = None
    uncertainty_png_max: float | None = None
    uncertainty_max: float | None = None
    classes: list[str] | None = Field(default=None, description="segmentation: class names by index")
    class_pixels: dict[str, int] | None = Field(default=None, description="segmentation: pixels per class")
    depth_kind: str | None = Field(default=None, description="with_depth: the kind of output `depth`")


class Problem(BaseModel):
    """RFC 9457 problem details, with the request id and, for a bad parameter, the field."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    field: str | None = None


class ModelsOut(BaseModel):
    models: list[ModelInfo]


#: Answer media types by format (what `format=` or `Accept` selects).
MEDIA_TYPES: dict[Format, str] = {
    "png": "image/png",
    "color": "image/png",
    "npy": "application/x-npy",
    "exr": "image/x-exr",
    "tiff": "image/tiff",
    "json": "application/json",
}
