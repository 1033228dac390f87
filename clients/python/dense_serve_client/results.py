"""Typed answers: the map as a float32 array, with what the server said about it."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

OutputKind = Literal["depth", "disparity", "normals"]

# ColorBrewer "Spectral" (11 classes): the server's colour preview uses the same control points and the same
# 16-bit lookup, so `colorize()` gives the bytes of a `format=color` answer.
_SPECTRAL = np.array(
    [
        [0.619608, 0.003922, 0.258824],
        [0.835294, 0.243137, 0.309804],
        [0.956863, 0.427451, 0.262745],
        [0.992157, 0.682353, 0.380392],
        [0.996078, 0.878431, 0.545098],
        [1.000000, 1.000000, 0.749020],
        [0.901961, 0.960784, 0.596078],
        [0.670588, 0.866667, 0.643137],
        [0.400000, 0.760784, 0.647059],
        [0.196078, 0.533333, 0.741176],
        [0.368627, 0.309804, 0.635294],
    ]
)


@cache
def _spectral_lut() -> np.ndarray:
    v = np.arange(65536, dtype=np.float64) / 65535.0 * (len(_SPECTRAL) - 1)
    lo = np.floor(v).astype(np.int64).clip(0, len(_SPECTRAL) - 2)
    t = (v - lo)[..., None]
    lut = np.round((_SPECTRAL[lo] * (1.0 - t) + _SPECTRAL[lo + 1] * t) * 255.0).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def quantize_unit(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint16 `round(v * 65535)`: the server's 16-bit PNG values."""
    return np.round(np.clip(values, 0.0, 1.0) * 65535.0).astype(np.uint16)


def quantize_normals(normals: np.ndarray) -> np.ndarray:
    """Unit vectors -> uint8 `round((n + 1) / 2 * 255)`: the server's normals PNG values."""
    return np.round((np.clip(normals, -1.0, 1.0) + 1.0) / 2.0 * 255.0).astype(np.uint8)


def colorize(array: np.ndarray, kind: OutputKind = "depth") -> np.ndarray:
    """A uint8 `[H, W, 3]` preview: Spectral with near in red (depth: low values; disparity: high values);
    normals as their RGB image. Scalar maps are expected in [0, 1], as the models' maps are."""
    if kind == "normals":
        return quantize_normals(array)
    values = 1.0 - array if kind == "disparity" else array
    return _spectral_lut()[quantize_unit(values)]


@dataclass(frozen=True, eq=False)
class Prediction:
    """One map. `array` is float32 `[H, W]` (depth or disparity in [0, 1], affine-invariant) or `[H, W, 3]`
    (unit normals); `timings` are the server's stages in ms (`Server-Timing`); `attempts` counts retries."""

    array: np.ndarray
    kind: OutputKind
    model: str
    seed: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    request_id: str | None = None
    attempts: int = 1

    @property
    def task(self) -> Literal["depth", "normals"]:
        return "normals" if self.kind == "normals" else "depth"

    def colorize(self) -> np.ndarray:
        """uint8 `[H, W, 3]`: what `format=color` would have answered."""
        return colorize(self.array, self.kind)

    def to_png(self, path: str | Path) -> Path:
        """Write the server's PNG encoding: 16-bit gray `round(v * 65535)`, or normals as 8-bit RGB."""
        from PIL import Image

        path = Path(path)
        pixels = quantize_normals(self.array) if self.kind == "normals" else quantize_unit(self.array)
        Image.fromarray(pixels).save(path, format="PNG")
        return path


@dataclass(frozen=True, eq=False)
class UncertaintyPrediction(Prediction):
    """A map and its per-pixel uncertainty: for a multi-seed ensemble `array` is its reduced prediction and
    `uncertainty` the spread (std or MAD for depth, degrees for normals: `uncertainty_unit`), `members` every
    member (`[K, H, W(, 3)]`) when asked for with `return_members=True`; for `method == "steps"` the mean change
    of the map over the run's last steps."""

    uncertainty: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    members: np.ndarray | None = None
    seeds: list[int] | None = None
    reduction: str | None = None
    uncertainty_unit: str | None = None
    #: `seeds` (a multi-seed ensemble), `steps` (how much the map still changed over the run's last
    #: `step_window` steps: Marigold, also in a depth / normals answer on request) or `diffusers`.
    method: str | None = None
    step_window: int | None = None

    def colorize_uncertainty(self) -> np.ndarray:
        """uint8 `[H, W, 3]`: the spread scaled to its maximum, Spectral with the largest spread in violet."""
        top = float(np.nanmax(self.uncertainty)) if self.uncertainty.size else 0.0
        return colorize(self.uncertainty / top if top > 0 else self.uncertainty, "depth")


@dataclass(frozen=True)
class ModelInfo:
    """One row of `GET /v1/models`; fields the server adds later land in `extra`."""

    id: str
    family: str
    task: str
    output_kind: str
    generative: bool
    processing_res: int
    backend: str
    device: str
    dtype: str
    max_batch_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> ModelInfo:
        known = {k: row[k] for k in cls.__dataclass_fields__ if k != "extra" and k in row}
        return cls(**known, extra={k: v for k, v in row.items() if k not in known})


@dataclass(frozen=True)
class Health:
    """`/healthz` and `/readyz`: `alive` the process answers, `ready` every model is loaded and warmed up."""

    alive: bool
    ready: bool
    models: dict[str, bool] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_png_map(data: bytes, kind: str) -> np.ndarray:
    """The server's PNG answers back to floats: 16-bit `v / 65535`, or normals `n / 255 * 2 - 1`."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if kind == "normals":
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 * 2.0 - 1.0
    return (np.asarray(img, dtype=np.float64) / 65535.0).astype(np.float32)
