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


@dataclass(frozen=True)
class NormalsAxes:
    """A camera frame for normals, as the sign of each axis against OpenGL's (+x image right, +y image up,
    +z towards the camera: Hypersim's `normal_cam`). Served normals are each checkpoint's raw outputs, so the
    axes are a property of the family that trained them."""

    x: Literal[1, -1] = 1
    y: Literal[1, -1] = 1
    z: Literal[1, -1] = 1

    @property
    def words(self) -> str:
        """What every normals answer states (`normals_convention`)."""
        return ", ".join(
            (
                f"+x image {'right' if self.x > 0 else 'left'}",
                f"+y image {'up' if self.y > 0 else 'down'}",
                f"+z {'towards' if self.z > 0 else 'away from'} the camera",
            )
        )

    def convert(self, normals: np.ndarray, to: NormalsAxes) -> np.ndarray:
        """`[..., 3]` vectors in these axes -> the same vectors in `to`'s (sign flips; its own inverse)."""
        signs = np.array([self.x * to.x, self.y * to.y, self.z * to.z], dtype=np.float32)
        return (np.asarray(normals, dtype=np.float32) * signs).astype(np.float32)


#: Lotus and E2E-FT: both training codes negate the x of Hypersim's normals (Lotus `utils/hypersim_dataset.py`,
#: E2E-FT `training/dataloaders/load.py`), so their checkpoints output +x = image LEFT. Training and evaluation
#: here use these axes for ground truth (models/training/folder_format.py).
LOTUS_AXES = NormalsAxes(x=-1)
#: Marigold: trained on Hypersim's `normal_cam` as it is (prs-eth/Marigold
#: `script/normals/dataset_preprocess/hypersim/preprocess_hypersim_normals.py` saves it after unit-normalising and
#: turning back-facing ones; `src/dataset/base_normals_dataset.py` loads it unchanged and negates x only for a
#: horizontal flip), and diffusers' `MarigoldImageProcessor.visualize_normals` documents the same frame ("Default
#: direction is right", "top", "facing the observer"): +x = image RIGHT.
OPENGL_AXES = NormalsAxes()
#: The axes of ground truth in training and evaluation, and of the Lotus / E2E-FT checkpoints.
NORMALS_CONVENTION = LOTUS_AXES.words

FAMILIES: tuple[Family, ...] = ("lotus-g", "lotus-d", "e2e-ft", "marigold")
#: Families that refine their map over several denoising steps (the others run one UNet call).
MULTI_STEP_FAMILIES: tuple[Family, ...] = ("marigold",)
TASKS: tuple[Task, ...] = ("depth", "normals")
#: The axes each family's normals checkpoints output (see `LOTUS_AXES`, `OPENGL_AXES` for the upstream code).
FAMILY_NORMALS_AXES: dict[Family, NormalsAxes] = {
    "lotus-g": LOTUS_AXES,
    "lotus-d": LOTUS_AXES,
    "e2e-ft": LOTUS_AXES,
    "marigold": OPENGL_AXES,
}
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
    normals_axes: NormalsAxes = LOTUS_AXES  # normals: the axes of the family that made them

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
            "normals_convention": self.normals_axes.words if self.kind == "normals" else None,
            **self.extra,
        }
