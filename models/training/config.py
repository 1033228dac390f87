"""The configuration of one fine-tune run, read from YAML.

Every knob is a field with a description, so `TrainConfig.model_json_schema()` is the reference and a typo in a
YAML file is an error rather than a silently ignored key. Relative paths are taken relative to the current
working directory (the one `dense-serve finetune` runs in), not to the YAML file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.outputs import Family, OutputKind, Task, task_of

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
E2EFTDepthLoss = Literal["upstream", "normalized"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScratchConfig(_Strict):
    """A random-weight starting checkpoint written by `models.tiny.make_tiny` (no pretrained model needed)."""

    arch: Literal["tiny"] = Field(default="tiny", description="make_tiny architecture (tiny: about 4 MB)")
    seed: int = Field(default=0, ge=0, description="seed of the random initial weights")


class ModelConfig(_Strict):
    """What is trained: the starting checkpoint and the protocol (family) and output it is trained for."""

    source: str | None = Field(
        default=None,
        description="starting checkpoint: a local diffusers folder or a hub id (org/name); exactly one of "
        "source and scratch",
    )
    revision: str | None = Field(default=None, description="hub revision of `source`")
    scratch: ScratchConfig | None = Field(
        default=None, description="start from a random tiny checkpoint instead of `source`"
    )
    family: Family = Field(
        description="training protocol and served family: lotus-g (x0 in latent space, noise input), lotus-d "
        "(x0, no noise) or e2e-ft (one step from a zero latent, loss after the frozen VAE decoder)"
    )
    output_kind: OutputKind = Field(
        description="depth (affine-invariant depth), disparity (Lotus only: affine-invariant 1/depth) or normals"
    )

    @property
    def task(self) -> Task:
        return task_of(self.output_kind)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if (self.source is None) == (self.scratch is None):
            raise ValueError("give exactly one of model.source and model.scratch")
        if self.family == "e2e-ft" and self.output_kind == "disparity":
            raise ValueError("e2e-ft is trained for depth or normals, not disparity")
        return self


class VaeFitConfig(_Strict):
    """Autoencoder pre-training of the VAE before the main run, for scratch checkpoints and small self-trained ones.

    Real checkpoints keep Stable Diffusion's VAE frozen (both recipes): leave `steps` at 0 for them. A random VAE
    cannot reconstruct, so a Lotus target latent would decode to noise: this stage teaches it to reconstruct the
    training images and target maps first (L1 + kl_weight * KL). A warm start from a tiny model fitted on other
    data (the 64 px disparity demo, started for normals at 128 px) refits its VAE the same way, on a copy in
    OUTPUT/base. It is deterministic, so an interrupted fit is simply redone.
    """

    steps: int = Field(default=0, ge=0, description="optimizer steps of the VAE fit (0 = keep the VAE as it is)")
    lr: float = Field(default=1e-3, gt=0, description="AdamW learning rate of the VAE fit")
    batch_size: int = Field(default=8, ge=1, description="images per step (each also contributes its target map)")
    kl_weight: float = Field(default=1e-4, ge=0, description="weight of the KL term (keeps the latent well scaled)")


class Augment(_Strict):
    """Geometry changes applied per sample: resize, random crop, random horizontal flip (in this order)."""

    resize: tuple[int, int] | None = Field(default=None, description="[height, width] to resize to first")
    crop: tuple[int, int] | None = Field(default=None, description="[height, width] of a random crop")
    hflip: float = Field(default=0.0, ge=0.0, le=1.0, description="probability of a horizontal flip")


class _Source(_Strict):
    ratio: float = Field(default=1.0, ge=0.0, description="relative sampling weight when several sources are mixed")
    augment: Augment | None = Field(default=None, description="overrides data.augment for this source")


class FolderSource(_Source):
    """A dataset in the generic folder format (models/training/folder_format.py)."""

    type: Literal["folder"] = "folder"
    root: Path = Field(description="folder with dataset.json, rgb/, depth/ (and mask/, normals/)")
    depth_range: tuple[float, float] | None = Field(
        default=None, description="valid depth range in metres (default: dataset.json's)"
    )


class HypersimSource(_Source):
    """Apple's Hypersim as unpacked from its scene zips."""

    type: Literal["hypersim"] = "hypersim"
    root: Path = Field(description="folder holding the ai_VVV_NNN scene folders")
    split_csv: Path | None = Field(
        default=None, description="metadata_images_split_scene_v1.csv (default: every frame found)"
    )
    split: str = Field(default="train", description="split partition read from split_csv")


class VirtualKitti2Source(_Source):
    """Virtual KITTI 2 as unpacked from its rgb and depth tars (depth only, no normals)."""

    type: Literal["vkitti2"] = "vkitti2"
    root: Path = Field(description="folder holding the SceneXX folders")
    scenes: list[str] | None = Field(default=None, description="scenes to use (default all)")
    variations: list[str] | None = Field(default=None, description="variations to use (default all)")


class SyntheticScenes(_Strict):
    """A set of procedural scenes from models/training/synthetic.py."""

    count: int = Field(ge=1, description="number of distinct scenes (scene i uses the seed (seed, i))")
    height: int = Field(default=64, ge=8, description="render height in pixels")
    width: int = Field(default=64, ge=8, description="render width in pixels")
    seed: int = Field(default=0, ge=0, description="scene seed; use another one for held-out scenes")
    variety: Literal["base", "varied"] = Field(
        default="base",
        description="scene distribution: base (the 64 px demo's rooms) or varied (more shapes, palettes, textures, "
        "lights, fog and camera poses)",
    )


class SyntheticSource(_Source, SyntheticScenes):
    """Procedural training scenes, rendered on first use and kept in memory."""

    type: Literal["synthetic"] = "synthetic"


Source = Annotated[FolderSource | HypersimSource | VirtualKitti2Source | SyntheticSource, Field(discriminator="type")]


class DataConfig(_Strict):
    """Training data: one or more sources, mixed by ratio (Hypersim : Virtual KITTI = 9 : 1 in both recipes)."""

    sources: list[Source] = Field(min_length=1, description="the training datasets")
    samples_per_epoch: int | None = Field(
        default=None, ge=1, description="items per epoch when mixing sources (default: the sources' total size)"
    )
    augment: Augment = Field(default_factory=Augment, description="default augmentation of every source")
    batch_size: int = Field(default=2, ge=1, description="samples per micro-batch on each process")
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes (0 = load in the loop)")
    shuffle: bool = Field(default=True, description="a fresh seeded permutation each epoch")


class OptimConfig(_Strict):
    """AdamW, learning-rate schedule, accumulation and clipping."""

    lr: float = Field(default=3e-5, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas")
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay")
    schedule: Literal["constant", "exponential"] = Field(
        default="constant",
        description="constant (Lotus) or exponential decay to final_lr_ratio at decay_steps (E2E-FT); both after "
        "the linear warm-up",
    )
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up from 0 to lr over this many steps")
    decay_steps: int = Field(default=20000, ge=1, description="step at which the exponential decay reaches its end")
    final_lr_ratio: float = Field(default=0.01, gt=0, le=1, description="lr multiplier reached at decay_steps")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches accumulated per optimizer step")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="clip the gradient norm (null = no clip)")


class ObjectiveConfig(_Strict):
    """Protocol details beyond the family."""

    reconstruction_weight: float = Field(
        default=1.0, ge=0, description="Lotus detail preserver: weight of the reconstruction branch (0 = off)"
    )
    quantile_low: float = Field(default=0.02, ge=0, lt=0.5, description="target normalisation: low quantile -> -1")
    quantile_high: float = Field(default=0.98, gt=0.5, le=1, description="target normalisation: high quantile -> 1")
    e2eft_depth_loss: E2EFTDepthLoss = Field(
        default="upstream",
        description="E2E-FT depth only. upstream (diffusion-e2e-ft train.py): L1 to METRIC depth clipped to the "
        "quantiles, prediction clamped to [-1, 1] before the per-sample scale/shift fit, one mean over all valid "
        "pixels of the batch. normalized (this project's first version): L1 to depth normalised to [-1, 1] "
        "between the quantiles, no clamp, the mean of per-sample means",
    )


class TrainLoopConfig(_Strict):
    """Length, precision, memory and bookkeeping of the loop."""

    steps: int = Field(ge=1, description="optimizer steps of the whole run")
    mixed_precision: MixedPrecision = Field(
        default="auto", description="auto: bf16 on GPUs that support it, else fp16 on GPUs, fp32 (no) on the CPU"
    )
    gradient_checkpointing: bool = Field(default=False, description="recompute activations (UNet, and VAE decoder)")
    checkpoint_every: int = Field(default=500, ge=1, description="write a resumable checkpoint every N steps")
    keep_checkpoints: int = Field(default=2, ge=1, description="how many recent checkpoints to keep")
    log_every: int = Field(default=10, ge=1, description="TensorBoard scalars every N steps")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: the GPU when there is one; under accelerate launch each process gets its own"
    )
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default: torch's choice)")


class ValidationConfig(_Strict):
    """Held-out evaluation during and after training, through the same predictor the service uses."""

    data: list[Path] = Field(default_factory=list, description="folder-format datasets to evaluate on")
    synthetic: SyntheticScenes | None = Field(
        default=None, description="held-out synthetic scenes (written to OUTPUT/validation-synthetic)"
    )
    every: int | None = Field(default=None, ge=1, description="also evaluate every N steps (default: start and end)")
    processing_res: int | None = Field(
        default=None, ge=0, description="long edge to predict at (default export.processing_res)"
    )
    limit: int | None = Field(default=None, ge=1, description="at most this many images per dataset")
    baselines: bool = Field(
        default=True,
        description="also score image-independent baselines (the training set's mean map, a vertical ramp, a "
        "constant) on each validation set once, so the table says what looking at the image is worth",
    )


class ExportConfig(_Strict):
    """The served result: a diffusers folder plus a model spec that `dense-serve serve --model` loads."""

    model_id: str = Field(pattern=r"^[\w.-]+$", description="id of the exported model (spec file name and id)")
    processing_res: int = Field(default=768, ge=0, description="default processing resolution written to the spec")


class RunConfig(_Strict):
    output_dir: Path = Field(description="where checkpoints, logs and the exported model are written")
    seed: int = Field(default=0, ge=0, description="seed of data order, augmentation and noise")


class TrainConfig(_Strict):
    """One fine-tune run."""

    run: RunConfig
    model: ModelConfig
    data: DataConfig
    train: TrainLoopConfig
    export: ExportConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    vae_fit: VaeFitConfig = Field(default_factory=VaeFitConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.export.processing_res % 8:
            raise ValueError("export.processing_res must be 0 or a multiple of 8")
        return self

    def fingerprint(self) -> str:
        """Hash of everything that decides the trained weights (not the loop's bookkeeping), to refuse a resume
        with a changed config."""
        data = self.model_dump(mode="json")
        for key in ("checkpoint_every", "keep_checkpoints", "log_every", "threads", "steps", "device"):
            data["train"].pop(key)
        data["train"].pop("gradient_checkpointing")
        data["data"].pop("num_workers")
        data["run"].pop("output_dir")  # a checkpoint may be resumed into another folder (--resume PATH)
        data.pop("validation")
        data.pop("export")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML run config; errors name the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the config: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid config: {exc}") from exc


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
