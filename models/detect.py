"""Family and task detection from a diffusers checkpoint's configs, and the check that a spec fits it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import ModelLoadError
from models.outputs import Family, OutputKind, Task
from models.spec import DEFAULT_PROCESSING_RES, ModelSpec

LOTUS_PIPELINES: dict[str, Family] = {
    "DirectDiffusionY0Pipeline": "lotus-g",
    "DirectRegressionPipeline": "lotus-d",
}
MARIGOLD_TASKS: dict[str, Task] = {
    "MarigoldDepthPipeline": "depth",
    "MarigoldNormalsPipeline": "normals",
}
#: Older Marigold checkpoints (the LCM ones, normals v0-1) name the generic pipeline; their keys say the task.
MARIGOLD_PIPELINES = (*MARIGOLD_TASKS, "MarigoldPipeline")
#: The schedulers diffusers' Marigold pipelines run (DDIM with eta 0, or LCM, which draws noise per step).
MARIGOLD_SCHEDULERS = ("DDIMScheduler", "LCMScheduler")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: model_index.json key of a checkpoint whose weights were never trained (models.tiny.make_tiny writes it): its
#: maps are noise. diffusers ignores keys that start with "_", so the folder still loads as any other.
RANDOM_WEIGHTS_KEY = "_dense_serve_random_weights"


@dataclass(frozen=True)
class CheckpointConfig:
    """The config files of a diffusers folder that decide what the checkpoint computes."""

    path: Path
    model_index: dict[str, Any]
    unet: dict[str, Any]
    scheduler: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> CheckpointConfig:
        missing = [c for c in COMPONENTS if not (path / c).is_dir()]
        if not (path / "model_index.json").is_file() or missing:
            what = ", ".join(["model_index.json", *missing] if not (path / "model_index.json").is_file() else missing)
            raise ModelLoadError(f"{path} is not a complete diffusers checkpoint folder (missing: {what})")
        try:
            return cls(
                path=path,
                model_index=_read_json(path / "model_index.json"),
                unet=_read_json(path / "unet" / "config.json"),
                scheduler=_read_json(path / "scheduler" / "scheduler_config.json"),
            )
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: unreadable checkpoint config: {exc}") from exc

    @property
    def default_steps(self) -> int | None:
        """The checkpoint's recommended denoising steps (`default_denoising_steps` in model_index.json)."""
        value = self.model_index.get("default_denoising_steps")
        return int(value) if isinstance(value, int) and value >= 1 else None

    @property
    def is_multi_step(self) -> bool:
        """A Marigold checkpoint meant for several steps from noise: an LCM scheduler, or more than one
        recommended step. (E2E-FT checkpoints are Marigold pipelines too, but run one step from zeros.)"""
        if self.model_index.get("_class_name") not in MARIGOLD_PIPELINES:
            return False
        return self.scheduler.get("_class_name") == "LCMScheduler" or (self.default_steps or 1) > 1

    @property
    def random_weights(self) -> bool:
        """Untrained weights (`RANDOM_WEIGHTS_KEY` in model_index.json): served, but their maps are noise."""
        return self.model_index.get(RANDOM_WEIGHTS_KEY) is True

    @property
    def is_lotus_unet(self) -> bool:
        return (
            self.unet.get("class_embed_type") == "projection"
            and self.unet.get("projection_class_embeddings_input_dim") == 4
        )


@dataclass(frozen=True)
class ModelIdentity:
    """What a loaded checkpoint is, after detection and the spec's overrides."""

    family: Family
    task: Task
    output_kind: OutputKind
    processing_res: int
    default_steps: int = 1  # denoising steps when a request does not say (multi-step families only above 1)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def has_random_weights(folder: Path) -> bool:
    """Whether the folder's model_index.json marks untrained weights; False without a readable one (an export
    folder, a foreign layout): only the marker makes a model random-weight, never its id."""
    try:
        index = _read_json(folder / "model_index.json")
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get(RANDOM_WEIGHTS_KEY) is True


def detect_family(cfg: CheckpointConfig) -> Family | None:
    by_index = LOTUS_PIPELINES.get(cfg.model_index.get("_class_name", ""))
    if by_index:
        return by_index
    in_ch = cfg.unet.get("in_channels")
    if cfg.is_lotus_unet:
        return {8: "lotus-g", 4: "lotus-d"}.get(in_ch)
    if in_ch == 8 and cfg.is_multi_step:
        return "marigold"
    if in_ch == 8 and cfg.scheduler.get("prediction_type") == "v_prediction":
        return "e2e-ft"
    return None


def detect_kind(cfg: CheckpointConfig, name: str) -> OutputKind | None:
    """Marigold pipelines name their task; Lotus checkpoints only say it in their name."""
    marigold = MARIGOLD_TASKS.get(cfg.model_index.get("_class_name", ""))
    if marigold:
        return marigold
    if cfg.model_index.get("_class_name") == "MarigoldPipeline":
        declared = cfg.model_index.get("prediction_type")
        if declared in ("depth", "normals"):
            return declared
        if "use_full_z_range" in cfg.model_index:
            return "normals"
    name = name.lower()
    if "normal" in name:
        return "normals"
    if "disparity" in name:
        return "disparity"
    if "depth" in name:
        return "depth"
    return None


def check_family(family: Family, cfg: CheckpointConfig) -> None:
    """Refuse a checkpoint whose UNet cannot compute what the family needs."""
    in_ch = cfg.unet.get("in_channels")
    problems: list[str] = []
    if family.startswith("lotus"):
        if not cfg.is_lotus_unet:
            problems.append(
                "a Lotus UNet needs class_embed_type='projection' with projection_class_embeddings_input_dim=4 "
                f"(got {cfg.unet.get('class_embed_type')!r}, "
                f"{cfg.unet.get('projection_class_embeddings_input_dim')!r})"
            )
        want = 8 if family == "lotus-g" else 4
        if in_ch != want:
            problems.append(f"{family} needs a UNet with in_channels={want}, this one has {in_ch}")
    elif family == "marigold":
        if in_ch != 8:
            problems.append(f"marigold needs a UNet with in_channels=8 (image + prediction latent), not {in_ch}")
        scheduler = cfg.scheduler.get("_class_name")
        if scheduler not in MARIGOLD_SCHEDULERS:
            problems.append(f"marigold runs a DDIMScheduler or LCMScheduler, this checkpoint names {scheduler!r}")
        if cfg.is_lotus_unet:
            problems.append("this UNet has the Lotus task-switcher class embedding")
    else:
        if in_ch != 8:
            problems.append(f"e2e-ft needs a UNet with in_channels=8, this one has {in_ch}")
        if cfg.scheduler.get("prediction_type") != "v_prediction":
            problems.append(
                f"e2e-ft needs scheduler prediction_type='v_prediction', got {cfg.scheduler.get('prediction_type')!r}"
            )
        if cfg.is_lotus_unet:
            problems.append("this UNet has the Lotus task-switcher class embedding")
    if problems:
        raise ModelLoadError(f"{cfg.path}: checkpoint does not match family {family}: " + "; ".join(problems))


def identify(spec: ModelSpec, cfg: CheckpointConfig) -> ModelIdentity:
    """Combine detection with the spec: the spec wins, but must fit the UNet it names."""
    family = spec.family or detect_family(cfg)
    if family is None:
        raise ModelLoadError(
            f"model '{spec.id}': cannot detect the family of {cfg.path} "
            f"(model_index _class_name={cfg.model_index.get('_class_name')!r}, "
            f"UNet in_channels={cfg.unet.get('in_channels')}); set family in the model spec"
        )
    check_family(family, cfg)

    detected = detect_kind(cfg, f"{spec.source} {spec.id}")
    kind: OutputKind | None = spec.output_kind
    if kind is None and spec.task is not None:
        kind = "normals" if spec.task == "normals" else (detected if detected in ("depth", "disparity") else "depth")
    kind = kind or detected
    if kind is None:
        raise ModelLoadError(
            f"model '{spec.id}': cannot detect the task of {cfg.path}; set task (depth|normals) in the model spec"
        )
    task: Task = "normals" if kind == "normals" else "depth"
    if spec.task is not None and spec.task != task:
        raise ModelLoadError(f"model '{spec.id}': task={spec.task} contradicts output_kind={kind}")
    if family in ("e2e-ft", "marigold") and kind == "disparity":
        raise ModelLoadError(f"model '{spec.id}': {family} predicts depth or normals, not disparity")

    res = spec.processing_res
    if res is None:
        res = int(cfg.model_index.get("default_processing_resolution") or DEFAULT_PROCESSING_RES)
    steps = 1
    if family == "marigold":
        steps = spec.steps or cfg.default_steps or 1
    elif spec.steps not in (None, 1):
        raise ModelLoadError(f"model '{spec.id}': {family} is a single-step family; steps must be 1, got {spec.steps}")
    return ModelIdentity(family=family, task=task, output_kind=kind, processing_res=res, default_steps=steps)
