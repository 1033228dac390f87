"""Model specs: one small TOML file per served model, naming where the checkpoint is and how to run it."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.errors import SpecError
from models.outputs import Family, OutputKind, Task

SPECS_DIR = Path(__file__).parent / "specs"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_ID_AT = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)@(?P<revision>[\w./-]+)$")
DEFAULT_PROCESSING_RES = 768
BACKEND_CHOICES = ("auto", "torch", "onnxruntime", "tensorrt", "triton", "simulated")


class ModelSpec(BaseModel):
    """Everything needed to load and serve one model.

    `family`, `task` and `output_kind` are detected from the checkpoint where they are left out.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, pattern=r"^[\w.-]+$")
    source: str = Field(min_length=1, description="hub id (org/name) or a local diffusers folder")
    revision: str | None = Field(
        default=None,
        min_length=1,
        pattern=r"^[\w./-]+$",
        description="hub ids: the commit sha (or tag / branch, with a warning) to load; required for a hub id",
    )
    family: Family | None = None
    task: Task | None = None
    output_kind: OutputKind | None = None
    processing_res: int | None = Field(
        default=None, ge=0, description="default long edge; 0 = native; None = checkpoint default or 768"
    )
    steps: int | None = Field(
        default=None, ge=1, le=1000, description="multi-step families: default denoising steps (None = checkpoint's)"
    )
    auto_max_steps: int | None = Field(
        default=None, ge=1, le=1000, description="steps=auto: the most steps it may choose (None = the default steps)"
    )
    dtype: Literal["auto", "fp16", "fp32"] = "auto"
    device: str = "auto"
    seed: int = Field(default=0, ge=0, description="default Lotus-G noise seed")
    minmax_normalize: bool = Field(
        default=False, description="E2E-FT repo behaviour: min-max normalise each depth map (off = diffusers)"
    )
    backend: Literal["auto", "torch", "onnxruntime", "tensorrt", "triton", "simulated"] = Field(
        default="auto", description="auto: torch for a checkpoint, the export's own backend for an export folder"
    )
    compile: bool = Field(default=False, description="torch backend: torch.compile the graphs")
    engine_cache: str | None = Field(
        default=None, description="where exported backends keep exports of checkpoints (default .cache/engines)"
    )
    export_resolutions: list[int] | None = Field(
        default=None, description="resolution buckets an automatic export is built for (default processing_res)"
    )
    triton_url: str | None = Field(default=None, description="backend triton: the server's gRPC address")
    simulated_batch_ms: float = Field(
        default=100.0, ge=0, description="backend simulated (benchmarks): what each batch sleeps instead of computing"
    )
    max_batch_size: int | None = Field(default=None, ge=1, description="serving: largest batch (None = global)")
    max_queue_delay_ms: float | None = Field(
        default=None, ge=0, description="serving: longest wait to fill a batch (None = global)"
    )

    @field_validator("processing_res")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"processing_res must be 0 or a multiple of 8, got {v}")
        return v

    @property
    def is_local(self) -> bool:
        return Path(self.source).is_dir()


def load_spec_file(path: str | Path) -> ModelSpec:
    """Read a spec TOML; a relative `source` that exists next to the file is resolved against it."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"{path}: cannot read model spec: {exc}") from exc
    data.setdefault("id", path.stem)
    source = data.get("source")
    if isinstance(source, str) and not Path(source).is_absolute() and (path.parent / source).is_dir():
        data["source"] = str((path.parent / source).resolve())
    try:
        return ModelSpec(**data)
    except ValidationError as exc:
        raise SpecError(f"{path}: invalid model spec: {exc}") from exc


def shipped_specs() -> dict[str, ModelSpec]:
    """The documented default models (real hub ids), keyed by id."""
    return {p.stem: load_spec_file(p) for p in sorted(SPECS_DIR.glob("*.toml"))}


def resolve_spec(arg: str, **overrides: object) -> ModelSpec:
    """Turn a `--model` argument into a spec: a spec file, a local folder, a shipped id, or a hub id (`ORG/NAME`,
    or `ORG/NAME@REVISION` to pin it: loading an unpinned hub id is refused)."""
    path = Path(arg)
    if path.suffix == ".toml" and path.is_file():
        spec = load_spec_file(path)
    elif path.is_dir():
        spec = ModelSpec(id=_export_id(path) or _safe_id(path.resolve().name), source=str(path.resolve()))
    elif arg in (shipped := shipped_specs()):
        spec = shipped[arg]
    elif m := HUB_ID_AT.match(arg):
        spec = ModelSpec(id=_safe_id(m["repo"].split("/")[-1]), source=m["repo"], revision=m["revision"])
    elif arg.startswith(("/", ".", "~")) or arg.count("/") > 1 or path.suffix == ".toml":
        raise SpecError(f"model path '{arg}' does not exist (expected a diffusers folder or a spec .toml file)")
    elif HUB_ID.match(arg):
        spec = ModelSpec(id=_safe_id(arg.split("/")[-1]), source=arg)
    else:
        raise SpecError(
            f"unknown model '{arg}': give a spec .toml file, a local diffusers folder, a hub id (org/name@revision), "
            f"or one of: {', '.join(shipped)}"
        )
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return spec
    try:
        return ModelSpec(**{**spec.model_dump(), **given})
    except ValidationError as exc:
        raise SpecError(f"invalid override for model '{arg}': {exc}") from exc


def _export_id(path: Path) -> str | None:
    """An export folder serves under the id it was exported with, not its folder name."""
    try:
        return _safe_id(str(json.loads((path / "manifest.json").read_text())["model_id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _safe_id(name: str) -> str:
    return re.sub(r"[^\w.-]", "-", name) or "model"
