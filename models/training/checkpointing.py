"""Resumable training checkpoints and the final export to a servable diffusers folder plus model spec.

A checkpoint is a folder `OUTPUT/checkpoints/step-NNNNNNN/` holding everything that decides the next steps:
the trained UNet weights (safetensors, exact bits), the optimizer, LR scheduler and grad-scaler states, the
RNG states of every process, the step and the data position (micro-batches consumed). It is written to a
temporary folder and renamed at the end, so a crash mid-write never leaves a checkpoint that looks complete.

Nothing in it is a pickle (`models.training.state_io`): tensors are safetensors, the rest JSON. A checkpoint of
the earlier format (`optimizer.pt`, `rng-0.pt`, ... written with `torch.save`) is refused, never unpickled.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models import tiny
from models.errors import UnsafeFormatError
from models.outputs import Family, OutputKind, task_of
from models.training.state_io import has_state, load_state, save_state

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
UNET_FILE = "unet.safetensors"
FORMAT = 2  # 1 (unmarked): optimizer, scheduler, scaler and RNG states as torch.save pickles
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class TrainerState:
    """Where the loop stands: optimizer steps done and micro-batches consumed (per process)."""

    step: int
    micro_index: int
    fingerprint: str
    world_size: int


# --- RNG ------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Every global RNG a step might touch, so a resumed process continues the same random streams."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- checkpoints ----------------------------------------------------------------------------------


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a state file), oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = list_checkpoints(output_dir)
    return done[-1] if done else None


def staging_dir(output_dir: Path, step: int) -> Path:
    """The temporary folder a checkpoint is written into by every process before `commit_checkpoint`."""
    folder = output_dir / CHECKPOINTS / f".tmp-step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_rng(folder: Path, rank: int) -> None:
    save_state(folder, f"rng-{rank}", capture_rng())


def save_training_state(
    folder: Path,
    state: TrainerState,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Main process: weights and optimizer-side state (identical on every process under DDP)."""
    weights = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    save_file(weights, str(folder / UNET_FILE))
    save_state(folder, "optimizer", optimizer.state_dict())
    save_state(folder, "scheduler", scheduler.state_dict())
    if scaler is not None:
        save_state(folder, "scaler", scaler.state_dict())
    (folder / STATE_FILE).write_text(json.dumps({"format": FORMAT, **state.__dict__}, indent=2) + "\n")


def commit_checkpoint(output_dir: Path, step: int, keep: int) -> Path:
    """Main process, after every process wrote its part: rename into place, then drop the oldest extras."""
    staged = output_dir / CHECKPOINTS / f".tmp-step-{step:07d}"
    final = checkpoint_dir(output_dir, step)
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def read_state(folder: Path) -> TrainerState:
    """The checkpoint's position; refuses a checkpoint that holds pickles or predates this format."""
    data = json.loads((folder / STATE_FILE).read_text())
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles or data.pop("format", None) != FORMAT:
        found = f"pickle files {', '.join(pickles)}" if pickles else "no format marker"
        raise UnsafeFormatError(
            f"checkpoint {folder} is in the old training-state format ({found}); it is not loaded, since "
            "unpickling can run code. Start the run again in a new output_dir (or move "
            f"{folder.parent} away); to keep its weights, its {UNET_FILE} is safe to read"
        )
    return TrainerState(**data)


def load_training_state(
    folder: Path,
    rank: int,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> TrainerState:
    """Load a checkpoint into live objects, including this process's RNG state."""
    state = read_state(folder)
    device = next(unet.parameters()).device
    unet.load_state_dict(load_file(str(folder / UNET_FILE), device=str(device)))
    # On the CPU: load_state_dict moves each state to its parameter's device and keeps AdamW's `step` where
    # the optimizer made it (the CPU), as the uninterrupted run has it.
    optimizer.load_state_dict(load_state(folder, "optimizer"))
    scheduler.load_state_dict(load_state(folder, "scheduler"))
    if scaler is not None and has_state(folder, "scaler"):
        scaler.load_state_dict(load_state(folder, "scaler"))
    if has_state(folder, f"rng-{rank}"):
        restore_rng(load_state(folder, f"rng-{rank}"))
    return state


# --- export ---------------------------------------------------------------------------------------


def write_scheduler(base: Path, out: Path, family: Family) -> None:
    """DDIM with the base's beta schedule, trailing spacing (t = 999 for one step) and the family's target."""
    from diffusers import DDIMScheduler

    config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    scheduler = DDIMScheduler.from_config(
        config,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        prediction_type="v_prediction" if family == "e2e-ft" else "sample",
    )
    scheduler.save_pretrained(out / "scheduler")


def write_model_index(out: Path, family: Family, output_kind: OutputKind, processing_res: int) -> None:
    """The pipeline class the hub checkpoints of this family carry, so family and task detection work."""
    tiny.write_model_index(out, family, task_of(output_kind), processing_res)


def write_spec(path: Path, model_id: str, source: str, family: Family, output_kind: OutputKind, res: int) -> None:
    """A model spec next to the checkpoint; `source` is relative to the spec's folder so both move together."""
    lines = [
        "# Written by dense-serve finetune; source is relative to this file. Serve with: serve --model THIS.toml",
        f'id = "{model_id}"',
        f'source = "{source}"',
        f'family = "{family}"',
        f'output_kind = "{output_kind}"',
        f"processing_res = {res}",
    ]
    path.write_text("\n".join(lines) + "\n")


def export_model(
    base: Path,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    output_dir: Path,
    model_id: str,
    family: Family,
    output_kind: OutputKind,
    processing_res: int,
) -> tuple[Path, Path]:
    """Write `OUTPUT/model/` (a complete diffusers folder) and `OUTPUT/MODEL_ID.toml`; returns both paths.

    The UNet and VAE are saved in fp32 from the live modules; text encoder and tokenizer are copied from the
    starting checkpoint (they are never trained: the prompt is always empty).
    """
    staged = output_dir / ".tmp-model"
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    unet.save_pretrained(staged / "unet", safe_serialization=True)
    vae.save_pretrained(staged / "vae", safe_serialization=True)
    for component in ("text_encoder", "tokenizer"):
        shutil.copytree(base / component, staged / component)
    write_scheduler(base, staged, family)
    write_model_index(staged, family, output_kind, processing_res)
    model_dir = output_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    staged.rename(model_dir)
    spec = output_dir / f"{model_id}.toml"
    write_spec(spec, model_id, model_dir.name, family, output_kind, processing_res)
    return model_dir, spec
