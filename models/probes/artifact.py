"""A trained probe on disk: `probe.toml` (what it reads and predicts), `probe.safetensors` (the MLPs), and
`eval.json` (how well it did on held-out images).

The probe is only valid on the exact base checkpoint its features came from: `base_hash` is the sha256 of that
checkpoint (`models.export.manifest.checkpoint_hash`), checked whenever the probe is attached to a model.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import ModelLoadError
from models.probes.features import TapConfig
from models.probes.mlp import PixelEnsemble

MANIFEST = "probe.toml"
WEIGHTS = "probe.safetensors"
EVAL = "eval.json"


class ProbeManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, pattern=r"^[\w.-]+$", description="the id /v1/models lists and requests name")
    task: str = Field(default="segment", pattern="^(segment|depth)$", description="segment: classes; depth: a map")
    base_model: str = Field(description="id of the served model whose UNet the features come from")
    base_source: str = Field(description="the base checkpoint's folder when trained (informative)")
    base_spec: str = Field(default="", description="the `base` the config named (a spec .toml, folder or id)")
    base_hash: str = Field(min_length=64, max_length=64, description="sha256 of the base checkpoint")
    family: str
    blocks: list[int]
    timesteps: list[int]
    stride: int
    noise_seed: int = 0
    processing_res: int = Field(description="the processing resolution the probe was trained at (its default)")
    classes: list[str] = Field(default_factory=list, description="segment: the class names; depth: none")
    feature_dim: int
    members: int
    hidden: list[int]
    # depth only (DAG's probe, models/probes/depth.py): one MLP for every timestep through a time embedding
    output_kind: str = Field(default="depth", pattern="^(depth|disparity)$", description="depth: what it regresses")
    time_dims: int = Field(default=0, ge=0, description="depth: sinusoidal time-embedding dims fed to the MLP")
    serve_timesteps: list[int] = Field(default_factory=list, description="depth: timesteps averaged at serving")
    weak_blocks: list[int] = Field(default_factory=list, description="depth: the weak MLP's blocks (none: no weak)")
    serve_head: str = Field(default="strong", pattern="^(strong|weak)$", description="depth: the head the id serves")

    @property
    def taps(self) -> TapConfig:
        return TapConfig(tuple(self.blocks), tuple(self.timesteps), self.stride, self.noise_seed)

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["# Written by dense-serve probe train. Serve with: dense-serve serve --probe THIS_FOLDER"]
        for key, value in self.model_dump().items():
            lines.append(f"{key} = {json.dumps(value)}")  # JSON strings, ints and lists are valid TOML
        path = folder / MANIFEST
        path.write_text("\n".join(lines) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> ProbeManifest:
        path = folder / MANIFEST
        try:
            return cls.model_validate(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ModelLoadError(f"{path}: not a readable probe manifest: {exc}") from exc


def save_probe(folder: Path, manifest: ProbeManifest, ensemble: PixelEnsemble) -> None:
    from safetensors.torch import save_file

    manifest.write(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in ensemble.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"probe": manifest.id, "base_hash": manifest.base_hash})


def load_probe(folder: Path, device: torch.device | str = "cpu") -> tuple[ProbeManifest, PixelEnsemble]:
    from safetensors.torch import load_file

    manifest = ProbeManifest.read(folder)
    if manifest.task != "segment":
        raise ModelLoadError(f"{folder}: a {manifest.task} probe, not a segmentation probe (see depth_probe.py)")
    ensemble = PixelEnsemble(manifest.feature_dim, len(manifest.classes), manifest.members, tuple(manifest.hidden))  # type: ignore[arg-type]
    try:
        ensemble.load_state_dict(load_file(str(folder / WEIGHTS)))
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"{folder / WEIGHTS}: weights do not match {MANIFEST}: {exc}") from exc
    return manifest, ensemble.to(device).eval()


def check_base(manifest: ProbeManifest, base_id: str, base_hash: str) -> None:
    """Refuse a base checkpoint other than the one the probe was trained on: its features mean nothing there."""
    if base_hash != manifest.base_hash:
        raise ModelLoadError(
            f"probe '{manifest.id}' was trained on the features of checkpoint {manifest.base_hash[:16]}... "
            f"({manifest.base_model}), but model '{base_id}' is checkpoint {base_hash[:16]}...: a probe only "
            "works on the exact base it was trained on; retrain it with `dense-serve probe train` on this model"
        )
