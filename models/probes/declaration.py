"""What a front-end reads of a probe folder: the public part of `probe.toml` (id, task, base model, classes or
the depth heads), without torch, so `dense-serve api --probe DIR` can accept the probe's jobs before any worker
announced it.

The full manifest (`models.probes.artifact.ProbeManifest`: taps, hash, MLP shape) lives beside the weights and
imports torch; this reads the same file and ignores what only a worker needs.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.errors import ModelLoadError

MANIFEST = "probe.toml"
#: A depth probe's heads (DAG): the strong MLP on many taps, the weak one on a single block.
Head = Literal["strong", "weak"]
HEADS: tuple[Head, ...] = ("strong", "weak")


class ProbeDeclaration(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1, pattern=r"^[\w.-]+$")
    task: Literal["segment", "depth"] = "segment"
    base_model: str = Field(min_length=1)
    family: str = Field(description="the base model's family")
    processing_res: int = Field(gt=0)
    classes: list[str] = Field(default_factory=list)
    output_kind: Literal["depth", "disparity"] = "depth"
    weak_blocks: list[int] = Field(default_factory=list)
    serve_head: Head = "strong"

    @model_validator(mode="after")
    def _segment_has_classes(self) -> ProbeDeclaration:
        if self.task == "segment" and not self.classes:
            raise ValueError("a segmentation probe names its classes")
        return self

    def served_ids(self) -> dict[str, Head | None]:
        """Model id -> depth head: a segmentation probe is its id; a depth probe's id serves `serve_head` and,
        when a weak MLP was trained, `<id>.<other head>` the other one (a request picks a head by model id)."""
        if self.task == "segment":
            return {self.id: None}
        ids: dict[str, Head | None] = {self.id: self.serve_head}
        if self.weak_blocks:
            other = next(h for h in HEADS if h != self.serve_head)
            ids[f"{self.id}.{other}"] = other
        return ids

    @classmethod
    def read(cls, folder: Path) -> ProbeDeclaration:
        path = folder / MANIFEST
        try:
            return cls.model_validate(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ModelLoadError(f"{path}: not a readable probe manifest: {exc}") from exc
