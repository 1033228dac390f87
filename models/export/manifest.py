"""`manifest.json`: what an export contains, what it came from, and how close it is to the PyTorch predictor.

The serving side reads only the manifest to know family, task and output kind of an exported model, so an
export folder can be served without the original checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import ModelLoadError
from models.outputs import Family, OutputKind, Task

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ExportFormat = Literal["onnx", "tensorrt", "triton"]
ExportDtype = Literal["fp32", "fp16"]
#: Largest max-abs difference from the fp32 PyTorch predictor an export may have (maps lie in [0, 1]; normals
#: are unit vectors). fp16 rounds every activation to 11 bits, so it gets a looser bound.
TOLERANCE: dict[ExportDtype, float] = {"fp32": 1e-3, "fp16": 3e-2}


class Verification(BaseModel):
    runtime: str
    provider: str
    input: str = Field(description="the fixed input the error was measured on")
    max_abs_error: float | None
    tolerance: float
    passed: bool | None = Field(description="None when no runtime here could execute this precision")
    note: str = ""


class Profile(BaseModel):
    """A shape range a TensorRT engine (or an ONNX graph) is built for: batch and padded image size."""

    min_batch: int = 1
    opt_batch: int
    max_batch: int
    min_hw: tuple[int, int]
    opt_hw: tuple[int, int]
    max_hw: tuple[int, int]


class GraphFile(BaseModel):
    file: str
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    engines: dict[str, str] = Field(default_factory=dict, description="TensorRT: cache key -> engine file")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    format: ExportFormat
    model_id: str
    model_hash: str
    source: str
    family: Family
    task: Task
    output_kind: OutputKind
    generative: bool
    processing_res: int
    default_seed: int = 0
    minmax_normalize: bool = False
    dtype: ExportDtype
    opset: int
    max_batch: int
    resolutions: list[int]
    profiles: list[Profile]
    graphs: dict[str, GraphFile]
    versions: dict[str, str]
    verification: Verification | None = None
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        try:
            return cls.model_validate_json(path.read_text())
        except (OSError, ValidationError) as exc:
            raise ModelLoadError(f"{path}: not a readable dense-serve export manifest: {exc}") from exc


def is_export(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def checkpoint_hash(path: Path) -> str:
    """sha256 over the config and weight files that define the computation (not the tokenizer's vocabulary).

    Keys the engine cache: a changed checkpoint never reuses a stale export.
    """
    digest = hashlib.sha256()
    files = [path / "model_index.json"]
    for comp in ("unet", "vae", "text_encoder", "scheduler"):
        files += sorted(p for p in (path / comp).glob("*") if p.suffix in (".json", ".safetensors", ".bin"))
    for file in files:
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "diffusers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
