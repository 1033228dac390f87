"""What every probe job shares, segmentation (`models.probes.train`) and depth (`models.probes.depth_train`):
the config file, the frozen base model and the batching of images.

Its own module so that the segmentation trainer, which hands depth jobs to the depth trainer, and the depth
trainer, which reuses these pieces, do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.inference import DensePredictor
from models.predictors.base import TIMESTEP, SingleStepPredictor
from models.probes.artifact import ProbeManifest
from models.probes.segmenter import torch_core
from models.spec import ModelSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSource(_Strict):
    type: Literal["synthetic"]
    count: int = Field(ge=1, description="labelled scenes")
    height: int = Field(default=128, ge=8)
    width: int = Field(default=128, ge=8)
    seed: int = Field(default=0, description="scene i uses seed (seed, i): keep train and eval seeds apart")


class FolderSource(_Strict):
    type: Literal["folder"]
    path: str = Field(description="classes.json, rgb/, labels/ (depth probes: rgb/, depth/); models/probes/data.py")
    limit: int | None = Field(default=None, ge=1, description="use only the first N images (sorted by name)")


Source = Annotated[SyntheticSource | FolderSource, Field(discriminator="type")]


class FeatureConfig(_Strict):
    blocks: list[int] = Field(min_length=1, description="decoder layer indices (models/probes/features.py)")
    timesteps: list[int] = Field(default=[TIMESTEP], min_length=1, description="999 shares the depth pass")
    stride: int = Field(default=2, description="feature grid: 1/stride of the processing size (1, 2, 4, 8)")
    noise_seed: int = Field(default=0, ge=0, description="Lotus-G: the fixed noise seed of the probe's input")
    processing_res: int | None = Field(default=None, ge=0, description="default: the base model's")


class TrainSettings(_Strict):
    members: int = Field(default=10, ge=1, le=64, description="MLPs in the majority-vote ensemble (segment only)")
    hidden: tuple[int, int] = Field(default=(256, 32), description="hidden widths of each MLP")
    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=1024, ge=1, description="pixels per step")
    lr: float = Field(default=1e-3, gt=0)
    pixels_per_image: int | None = Field(
        default=1024, ge=1, description="labelled cells sampled per image (None: all); bounds CPU training time"
    )
    seed: int = 0
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default: torch's)")


class DepthSettings(_Strict):
    """Depth probes only (DAG): the time embedding, the serving timesteps and the optional weak head."""

    space: Literal["depth", "disparity"] = Field(
        default="depth", description="what the MLP regresses (normalised per image): depth (DAG) or 1 / depth"
    )
    time_dims: int = Field(default=32, ge=0, le=1024, description="sinusoidal embedding of t fed to the MLP")
    serve_timesteps: list[int] | None = Field(default=None, description="averaged at serving (default: all)")
    weak_blocks: list[int] = Field(default=[], description="the weak MLP's blocks (DAG: 6 alone); [] = none")
    serve_head: Literal["strong", "weak"] = Field(default="strong", description="the head the probe's id serves")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay of both heads")


class ProbeConfig(_Strict):
    id: str = Field(pattern=r"^[\w.-]+$", description="the probe's model id in /v1/models")
    task: Literal["segment", "depth"] = Field(default="segment", description="class map or depth map")
    base: str = Field(description="the base model: spec .toml, diffusers folder or shipped id (as --model)")
    features: FeatureConfig
    train_data: Source
    eval_data: Source
    train: TrainSettings = TrainSettings()
    depth: DepthSettings = DepthSettings()
    output_dir: str = Field(description="where probe.toml, probe.safetensors and eval.json go (--out overrides)")


def load_config(path: str | Path) -> ProbeConfig:
    path = Path(path)
    try:
        return ProbeConfig.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the probe config: {exc}") from exc
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid probe config:\n{exc}") from exc


BATCH = 8  # images per forward pass in training and evaluation


class _Image(Protocol):
    @property
    def rgb(self) -> np.ndarray: ...


ImageT = TypeVar("ImageT", bound=_Image)


def same_size_chunks(images: list[ImageT], size: int) -> list[list[ImageT]]:
    """Consecutive images of one size, at most `size` at a time (a forward pass takes one shape); labelled and
    depth images alike."""
    chunks: list[list[ImageT]] = []
    for img in images:
        if chunks and len(chunks[-1]) < size and chunks[-1][0].rgb.shape == img.rgb.shape:
            chunks[-1].append(img)
        else:
            chunks.append([img])
    return chunks


@dataclass(frozen=True)
class ProbeBase:
    """The frozen base model a probe job trains on (segmentation and depth alike): loaded once on the CPU in
    fp32, and described the same way in every manifest (its id, checkpoint folder and hash, family)."""

    spec: ModelSpec
    path: Path
    predictor: DensePredictor
    core: SingleStepPredictor
    processing_res: int

    @classmethod
    def load(cls, cfg: ProbeConfig) -> ProbeBase:
        from models.loading import load_model, resolve_source
        from models.spec import resolve_spec

        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        spec = resolve_spec(cfg.base, backend="torch", device="cpu", dtype="fp32")
        path = resolve_source(spec)
        predictor = load_model(spec)
        res = cfg.features.processing_res
        return cls(spec, path, predictor, torch_core(predictor), predictor.processing_res if res is None else res)

    def manifest(self, cfg: ProbeConfig, **task_fields: Any) -> ProbeManifest:
        """The probe's manifest: the base and taps as this job trained them, plus the task's own fields."""
        from models.export.manifest import checkpoint_hash

        f = cfg.features
        return ProbeManifest(
            id=cfg.id,
            base_model=self.spec.id,
            base_source=str(self.path),
            base_spec=cfg.base,
            base_hash=checkpoint_hash(self.path),
            family=self.predictor.family,
            blocks=list(f.blocks),
            timesteps=list(f.timesteps),
            stride=f.stride,
            noise_seed=f.noise_seed,
            processing_res=self.processing_res,
            hidden=list(cfg.train.hidden),
            **task_fields,
        )
