"""The one request vocabulary: what a prediction asks for, with the same names and meanings whether it comes
from REST (query, form or JSON fields), gRPC (the `PredictRequest` fields) or the CLI (flags).

Validated once, here; the settings' limits come in through the validation context, and the worker trusts what
it receives. No torch: every front-end imports this.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from models.outputs import ServedTask
from service.errors import InvalidParameter

#: One spelling per answer format, everywhere. `png` is 16-bit gray (depth, disparity) or 8-bit RGB (normals);
#: `raw16` / `raw32` are bare little-endian floats (gRPC's default answer); `json` wraps a png or npy map.
Format = Literal["png", "npy", "exr", "tiff", "color", "json", "raw16", "raw32"]
FORMATS: tuple[Format, ...] = get_args(Format)
#: What a class map can be answered as: 8-bit index PNG, uint8 NPY, colour overlay, or JSON (class names and
#: per-class pixel counts, the map inside).
SEGMENT_FORMATS: tuple[Format, ...] = ("png", "npy", "color", "json")
JsonEncoding = Literal["png", "npy"]
Reduction = Literal["mean", "median"]
RequestKind = Literal["predict", "uncertainty"]
#: How `/v1/uncertainty` measures: `seeds` (ours: members seed, seed + 1, ... aligned to member 0 by least
#: squares, population std), `diffusers` (Marigold's own ensembling: joint BFGS alignment, MAD or sample std
#: over the range; normals: mean angle / pi), `steps` (how much the x0 prediction still changes over the last
#: denoising steps of one run). `diffusers` and `steps` are for multi-step (Marigold) models.
UncertaintyMethod = Literal["seeds", "diffusers", "steps"]
#: What a plain depth/normals answer carries beside its map: `none`, or `steps`: the step-change uncertainty
#: (`/v1/uncertainty?method=steps`'s numbers) of the same run, for VAE decodes only (no extra UNet call).
AnswerUncertainty = Literal["none", "steps"]
#: REST answers that can carry a second map; a binary answer carries one (gRPC and the CLI have their own field
#: and file for it).
TWO_MAP_FORMATS: tuple[Format, ...] = ("json",)
STEPS_CAP = 1000


def _whole_number(value: Any) -> Any:
    """pydantic's lax int reads the text "8.0" as 8; a query or form value the schema calls an integer is written
    without a fraction. (A JSON 8.0 stays valid: JSON Schema counts it as an integer.)"""
    if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
        raise ValueError(f"must be a whole number written without a fraction, got {value!r}")
    return value


#: On every integer parameter, from every front-end: what the OpenAPI schema calls an integer, and nothing else.
WHOLE = BeforeValidator(_whole_number)


def _one_steps_error(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One message for `steps` instead of one per branch of its union."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"must be a whole number of steps from 1 to {STEPS_CAP}, or auto; got {value!r}") from None


#: Denoising steps: N, or `auto` (the most that fit the deadline).
Steps = Annotated[Annotated[int, Field(ge=1, le=STEPS_CAP), WHOLE] | Literal["auto"], WrapValidator(_one_steps_error)]
SEED_MAX = 2**31 - 1
SEEDS_CAP = 32  # the hard cap of `seeds`; `uncertainty_max_seeds` may set a lower one
PROCESSING_RES_CAP = 16384


@dataclass(frozen=True)
class Limits:
    """The settings a request is checked against (passed as pydantic's validation context)."""

    max_processing_res: int = 2048
    max_timeout_ms: int = 300_000
    max_seeds: int = SEEDS_CAP

    @classmethod
    def of(cls, settings: Any) -> Limits:
        return cls(settings.max_processing_res, settings.max_timeout_ms, settings.uncertainty_max_seeds)


class PredictionRequest(BaseModel):
    """Every parameter of a prediction. `None` means "the model's (or the server's) default"."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None, min_length=1, max_length=200, description="model id (default: the first model serving the task)"
    )
    task: ServedTask = Field(default="depth", description="depth, normals or segment (REST: the path says it)")
    kind: RequestKind = Field(default="predict", description="predict, or uncertainty (a multi-seed ensemble)")
    processing_res: Annotated[int, WHOLE] | None = Field(  # its range: _processing_res, with the server's limit
        default=None,
        description="long edge the model sees, a multiple of 8; 0 = the input's native size; default: the model's",
    )
    match_input_resolution: bool = Field(default=True, description="resize the map back to the input size")
    seed: Annotated[int, Field(ge=0, le=SEED_MAX), WHOLE] | None = Field(
        default=None, description="Lotus-G noise seed (default 0); deterministic families ignore it"
    )
    seeds: Annotated[int, Field(ge=2, le=SEEDS_CAP), WHOLE] | None = Field(
        default=None, description="uncertainty: ensemble size (default 8); member i uses seed + i (mod 2^31)"
    )
    reduction: Reduction = Field(default="mean", description="uncertainty: mean (std) or median (MAD)")
    return_members: bool = Field(default=False, description="uncertainty: every member too (JSON answers, as NPY)")
    steps: Steps | None = Field(
        default=None,
        description="denoising steps (default: the model's); `auto`: the most that fit the deadline at the "
        "worker's measured time per step; single-step families (Lotus, E2E-FT) run 1 and refuse any other "
        "number; the answer's `steps` says what ran",
    )
    ensemble_size: Annotated[int, Field(ge=1, le=SEEDS_CAP), WHOLE] | None = Field(
        default=None, description="multi-step families: members ensembled as diffusers' Marigold does (default 1)"
    )
    method: UncertaintyMethod = Field(
        default="seeds", description="uncertainty: seeds (ours), diffusers (Marigold's ensembling) or steps"
    )
    uncertainty: AnswerUncertainty = Field(
        default="none",
        description="depth/normals answers: also the step-change uncertainty of the same run (`steps`: the "
        "numbers of /v1/uncertainty?method=steps; multi-step models, steps >= 2, REST format=json; VAE decodes "
        "only, no extra UNet call)",
    )
    format: Format = Field(default="png", description="answer format")
    json_encoding: JsonEncoding = Field(default="png", description="how maps are encoded inside a JSON answer")
    timeout_ms: Annotated[int, Field(ge=1), WHOLE] | None = Field(
        default=None, description="deadline; past it the answer is an error and the job is never computed"
    )
    with_depth: bool = Field(
        default=False,
        description="segment: also the base model's map from the same UNet pass (JSON answers: output `depth`)",
    )

    @model_validator(mode="after")
    def _segment(self) -> PredictionRequest:
        if self.task == "segment":
            if self.format not in SEGMENT_FORMATS:
                raise ValueError(f"format: a class map is answered as {', '.join(SEGMENT_FORMATS)}, not {self.format}")
            if self.kind != "predict":
                raise ValueError("kind: segmentation has no multi-seed uncertainty")
            if self.with_depth and self.format != "json":
                raise ValueError("with_depth: two maps need format=json (outputs `prediction` and `depth`)")
        elif self.with_depth:
            raise ValueError("with_depth: only a segment request adds the depth map of its pass")
        if self.uncertainty != "none" and (self.kind != "predict" or self.task == "segment"):
            raise ValueError(
                "uncertainty: only a depth or normals answer carries the step-change uncertainty of its run "
                "(/v1/uncertainty chooses its measure with method)"
            )
        return self

    @field_validator("processing_res")
    @classmethod
    def _processing_res(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        limit = min(_limits(info).max_processing_res, PROCESSING_RES_CAP)
        try:
            _processing_res_range(limit).validate_python(value)
        except ValidationError as exc:
            # pydantic's own error, raised as itself: no "Value error, " prefix on the message.
            first = exc.errors()[0]
            raise PydanticCustomError(first["type"], first["msg"]) from None
        return value

    @field_validator("timeout_ms")
    @classmethod
    def _timeout(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_timeout_ms
        if value is not None and value > limit:
            raise ValueError(f"at most {limit}")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_seeds
        if value is not None and value > limit:
            raise ValueError(f"at most {limit}")
        return value

    @property
    def encoding(self) -> Format:
        """What the worker writes: the format itself, or the map inside a JSON answer."""
        return self.json_encoding if self.format == "json" else self.format

    @property
    def ensemble(self) -> list[int]:
        """The seeds of an uncertainty ensemble: `seed`, `seed + 1`, ... (8 members by default), wrapping past
        SEED_MAX to 0 so that every seed the schema allows is a valid start."""
        base = self.seed or 0
        return [(base + i) % (SEED_MAX + 1) for i in range(self.seeds or 8)]


def check_for_model(request: PredictionRequest, model: str, family: str, multi_step: bool, default_steps: int) -> None:
    """What only the chosen model decides: a single-step family runs exactly one step, has no ensemble, and
    no step-change uncertainty; a 422 that says why, naming the field."""
    if not multi_step:
        if isinstance(request.steps, int) and request.steps != 1:
            raise InvalidParameter(
                f"model '{model}' ({family}) is a single-step family: it computes its map in one UNet call, so "
                f"steps must be 1 (or left out, or auto), got {request.steps}; multi-step models (marigold) take N",
                field="steps",
            )
        if (request.ensemble_size or 1) != 1:
            raise InvalidParameter(
                f"model '{model}' ({family}) has no ensemble_size (a multi-step family's option); "
                "for a Lotus-G ensemble use /v1/uncertainty with seeds",
                field="ensemble_size",
            )
        if request.kind == "uncertainty" and request.method != "seeds":
            raise InvalidParameter(
                f"method={request.method} needs a multi-step model; model '{model}' ({family}) has only method=seeds",
                field="method",
            )
        if request.uncertainty != "none":
            raise InvalidParameter(
                f"uncertainty={request.uncertainty} is the change between denoising steps, and model '{model}' "
                f"({family}) computes its map in one UNet call; multi-step models (marigold) offer it",
                field="uncertainty",
            )
        return
    if request.kind == "uncertainty" and request.method == "steps":
        _check_step_change(request, model, default_steps, "method=steps")
    if request.uncertainty == "steps":
        _check_step_change(request, model, default_steps, "uncertainty=steps")


def _check_step_change(request: PredictionRequest, model: str, default_steps: int, name: str) -> None:
    """The step-change uncertainty follows one run of at least two steps."""
    steps = request.steps if isinstance(request.steps, int) else default_steps
    if request.steps != "auto" and 0 < steps < 2:  # 0: not known before a worker loaded the checkpoint
        raise InvalidParameter(
            f"{name} measures the change between denoising steps, so it needs steps >= 2 "
            f"(model '{model}' would run {steps}); pass steps",
            field="steps",
        )
    if (request.ensemble_size or 1) != 1:
        raise InvalidParameter(f"{name} follows one run: ensemble_size must be 1", field="ensemble_size")


def check_answer_format(request: PredictionRequest, fmt: Format) -> None:
    """REST: a binary answer carries one map, so the map and its uncertainty need a JSON answer."""
    if request.uncertainty != "none" and fmt not in TWO_MAP_FORMATS:
        raise InvalidParameter(
            f"uncertainty={request.uncertainty} adds a second map, which a {fmt} answer cannot carry: use "
            "format=json (outputs `prediction` and `uncertainty`), or gRPC (PredictResponse.uncertainty_data)",
            field="uncertainty",
        )


@lru_cache(maxsize=8)
def _processing_res_range(limit: int) -> TypeAdapter[int]:
    """The constraint REST's parameter model puts on processing_res (0 or a multiple of 8 up to the server's
    limit), so that gRPC, the CLI and REST's JSON/form fields refuse a value in the same words as the query
    string: "Input should be less than or equal to 2048" names the configured limit, not the hard cap."""
    return TypeAdapter(Annotated[int, Field(ge=0, le=limit, multiple_of=8)])


def _limits(info: ValidationInfo) -> Limits:
    context = info.context or {}
    limits = context.get("limits") if isinstance(context, dict) else None
    return limits if isinstance(limits, Limits) else Limits()


def parse_request(data: dict[str, Any], limits: Limits) -> PredictionRequest:
    """Validate once; a bad value is an InvalidParameter that names the field (a 422 / INVALID_ARGUMENT)."""
    try:
        return PredictionRequest.model_validate(data, context={"limits": limits})
    except ValidationError as exc:
        raise invalid_parameter(exc) from exc


def invalid_parameter(exc: ValidationError) -> InvalidParameter:
    """pydantic's errors as one InvalidParameter: every field named, the first one as `field`."""
    errors = [{"field": ".".join(str(p) for p in e["loc"]) or "request", "message": e["msg"]} for e in exc.errors()]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return InvalidParameter(detail, field=errors[0]["field"], errors=errors)
