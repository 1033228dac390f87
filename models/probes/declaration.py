"""What a front-end reads of a probe folder: the public part of `probe.toml` (id, task, base model, classes),
without torch, so `dense-serve api --probe DIR` can accept the probe's jobs before any worker announced it.

The full manifest (`models.probes.artifact.ProbeManifest`: taps, hash, MLP shape) lives beside the weights and
imports torch; this reads the same file and ignores what only a worker needs.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import ModelLoadError

MANIFEST = "probe.toml"


class ProbeDeclaration(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1, pattern=r"^[\w.-]+$")
    task: str = "segment"
    base_model: str = Field(min_length=1)
    family: str = Field(description="the base model's family")
    processing_res: int = Field(gt=0)
    classes: list[str] = Field(min_length=1)

    @classmethod
    def read(cls, folder: Path) -> ProbeDeclaration:
        path = folder / MANIFEST
        try:
            return cls.model_validate(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ModelLoadError(f"{path}: not a readable probe manifest: {exc}") from exc
