"""What a prediction returns: a float32 map plus the metadata a client needs to interpret it.

Numpy only, so front-ends and encoders can use it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Family = Literal["lotus-g", "lotus-d", "e2e-ft"]
Task = Literal["depth", "normals"]
OutputKind = Literal["depth", "disparity", "normals"]

FAMILIES: tuple[Family, ...] = ("lotus-g", "lotus-d", "e2e-ft")
TASKS: tuple[Task, ...] = ("depth", "normals")
OUTPUT_KINDS: tuple[OutputKind, ...] = ("depth", "disparity", "normals")


def task_of(kind: OutputKind) -> Task:
    return "normals" if kind == "normals" else "depth"


@dataclass(frozen=True)
class PredictionMap:
    """One image's prediction at the input (or processing) resolution.

    `array` is float32: `[H, W]` for depth/disparity in [0, 1], `[H, W, 3]` unit vectors for normals.
    Depth and disparity are affine-invariant: only relative values are meaningful.
    """

    array: np.ndarray
    kind: OutputKind
    model_id: str
    processing_size: tuple[int, int]
    seed: int | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def affine_invariant(self) -> bool:
        return self.kind != "normals"

    @property
    def value_range(self) -> tuple[float, float]:
        return (-1.0, 1.0) if self.kind == "normals" else (0.0, 1.0)

    @property
    def near_is_high(self) -> bool:
        """Disparity grows towards the camera; depth shrinks."""
        return self.kind == "disparity"

    def metadata(self) -> dict[str, object]:
        h, w = self.array.shape[:2]
        return {
            "kind": self.kind,
            "shape": list(self.array.shape),
            "height": h,
            "width": w,
            "affine_invariant": self.affine_invariant,
            "range": list(self.value_range),
            "model": self.model_id,
            "processing_size": list(self.processing_size),
            "seed": self.seed,
            **self.extra,
        }
