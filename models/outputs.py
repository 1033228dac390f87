"""What a prediction returns: a float32 map plus the metadata a client needs to interpret it.

Numpy only, so front-ends and encoders can use it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Family = Literal["lotus-g", "lotus-d", "e2e-ft", "marigold"]
Task = Literal["depth", "normals"]
OutputKind = Literal["depth", "disparity", "normals"]
#: What the service answers: the predictors' tasks, plus `segment` from probes on their UNets (models/probes).
ServedTask = Literal["depth", "normals", "segment"]
ServedKind = Literal["depth", "disparity", "normals", "segmentation"]
#: What a map is when it leaves the runtime's device: float32 values, float16 values, quantised integers
#: (uint16 `round(v * 65535)` for [0, 1] maps, uint8 `round((n + 1) / 2 * 255)` for normals), or the 8-bit RGB
#: colour preview. Only the final form crosses to the CPU: a 1080p uint16 map is half the bytes of float32.
MapForm = Literal["float32", "float16", "quantized", "color"]

#: The camera-frame axes of served normals: the raw outputs of the released Lotus and E2E-FT normals checkpoints
#: (both training codes negate Hypersim's x, so +x points to the image's left). Training and evaluation convert
#: ground truth to it at load time; every normals answer states it.
NORMALS_CONVENTION = "+x image left, +y image up, +z towards the camera"

FAMILIES: tuple[Family, ...] = ("lotus-g", "lotus-d", "e2e-ft", "marigold")
#: Families that refine their map over several denoising steps (the others run one UNet call).
MULTI_STEP_FAMILIES: tuple[Family, ...] = ("marigold",)
TASKS: tuple[Task, ...] = ("depth", "normals")
OUTPUT_KINDS: tuple[OutputKind, ...] = ("depth", "disparity", "normals")


def task_of(kind: OutputKind) -> Task:
    return "normals" if kind == "normals" else "depth"


@dataclass(frozen=True)
class PredictionMap:
    """One image's prediction at the input (or processing) resolution.

    `array` is `[H, W]` for depth/disparity in [0, 1], `[H, W, 3]` unit vectors for normals, in `form`
    (float32 unless the caller asked the predictor for another). Depth and disparity are affine-invariant:
    only relative values are meaningful.
    """

    array: np.ndarray
    kind: OutputKind
    model_id: str
    processing_size: tuple[int, int]
    seed: int | None = None
    extra: dict[str, object] = field(default_factory=dict)
    form: MapForm = "float32"
    steps: int = 1  # denoising steps that made it (single-step families: always 1)
    uncertainty: np.ndarray | None = None  # `[H, W]` float32, on request (multi-step: the step change)

    def float_array(self) -> np.ndarray:
        """The values as float32 (quantised ones scaled back); the colour preview has none."""
        if self.form == "float32":
            return self.array
        if self.form == "float16":
            return self.array.astype(np.float32)
        if self.form == "quantized":
            if self.kind == "normals":
                return self.array.astype(np.float32) / 255.0 * 2.0 - 1.0
            return self.array.astype(np.float32) / 65535.0
        raise ValueError("a colour preview has no values to recover")

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
            "steps": self.steps,
            "normals_convention": NORMALS_CONVENTION if self.kind == "normals" else None,
            **self.extra,
        }
