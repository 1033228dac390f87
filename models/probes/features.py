"""Diffusion features for pixel probes: forward hooks on chosen UNet decoder layers (DDPM-segmentation).

A "block" is an index into the UNet decoder's layers, flattened in execution order: up block 0's layers, then
up block 1's, ... where a layer is a resnet followed by its attention when the up block has one (so the tap
sees what the next layer sees). The SD2 UNet has 12 such layers (4 up blocks x 3); the tiny one 4.

Features are taken at one or more timesteps. t = 999 with the family's own UNet input is the pass that
predicts depth, so a probe at t = 999 alone shares that pass with the depth answer. Other timesteps cost one
more UNet call each (the input is the same: the image latent, plus the fixed-seed noise for Lotus-G).
Each tap is upsampled (bilinear) to 1/`stride` of the padded processing size and all are concatenated along
channels, timestep-major: memory grows with 1/stride^2, which is why the probe runs at a reduced stride and
upsamples its logits instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.predictors.base import TIMESTEP, SingleStepPredictor


@dataclass(frozen=True)
class TapConfig:
    """Where features come from: decoder layers, timesteps, the stride of the feature grid, the noise seed."""

    blocks: tuple[int, ...]
    timesteps: tuple[int, ...] = (TIMESTEP,)
    stride: int = 2
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if not self.blocks or len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"blocks must be distinct decoder layer indices, got {list(self.blocks)}")
        if not self.timesteps or any(not 0 <= t <= TIMESTEP for t in self.timesteps):
            raise ValueError(f"timesteps must lie in 0..{TIMESTEP}, got {list(self.timesteps)}")
        if self.stride not in (1, 2, 4, 8):
            raise ValueError(f"stride must be 1, 2, 4 or 8 (pixels of the processing image), got {self.stride}")


def decoder_layers(unet: nn.Module) -> list[nn.Module]:
    """The UNet decoder's layers in execution order (see the module docstring for the numbering)."""
    layers: list[nn.Module] = []
    for block in unet.up_blocks:  # type: ignore[union-attr]
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            layers.append(attentions[j] if attentions is not None else resnet)
    return layers


def layer_channels(unet: nn.Module) -> list[int]:
    """Output channels of every decoder layer (from the config: no forward pass needed)."""
    out = list(reversed(unet.config.block_out_channels))  # type: ignore[union-attr]
    per_block = unet.config.layers_per_block + 1  # type: ignore[union-attr]
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    return [c for c in out for _ in range(per_block)]


def feature_dim(unet: nn.Module, taps: TapConfig) -> int:
    channels = layer_channels(unet)
    check_blocks(unet, taps.blocks)
    return len(taps.timesteps) * sum(channels[b] for b in taps.blocks)


def check_blocks(unet: nn.Module, blocks: Sequence[int]) -> None:
    n = len(decoder_layers(unet))
    bad = [b for b in blocks if not 0 <= b < n]
    if bad:
        raise ValueError(f"decoder blocks {bad} do not exist: this UNet's decoder has layers 0..{n - 1}")


@contextmanager
def tapped(unet: nn.Module, blocks: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks on `blocks`: inside the context, every UNet call writes their outputs into the dict."""
    check_blocks(unet, blocks)
    layers = decoder_layers(unet)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for b in blocks:

        def hook(_module: nn.Module, _args: object, output: object, b: int = b) -> None:
            captured[b] = _tensor(output)

        handles.append(layers[b].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def _tensor(output: object) -> torch.Tensor:
    """Resnets return a tensor; attention layers a tuple or an output object whose first field is the map."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample  # type: ignore[attr-defined]


def assemble(captured: Sequence[dict[int, torch.Tensor]], taps: TapConfig, padded_hw: tuple[int, int]) -> torch.Tensor:
    """Taps of every timestep -> `[B, D, PH / stride, PW / stride]` float32, bilinear, concatenated."""
    size = (padded_hw[0] // taps.stride, padded_hw[1] // taps.stride)
    maps = [
        F.interpolate(per_t[b].float(), size=size, mode="bilinear", align_corners=False)
        for per_t in captured
        for b in taps.blocks
    ]
    return torch.cat(maps, dim=1)


def unet_input_noise(core: SingleStepPredictor, latent: torch.Tensor, seed: int) -> torch.Tensor | None:
    """Lotus-G's noise input: one fixed-seed latent for the whole batch (so an image's features do not
    depend on its batch neighbours), None for deterministic families."""
    if not core.generative:
        return None
    noise = core.make_noise([seed], tuple(latent.shape[-2:]))  # type: ignore[arg-type]
    assert noise is not None
    return noise.expand(latent.shape[0], -1, -1, -1).contiguous()


def extract(
    core: SingleStepPredictor,
    latent: torch.Tensor,
    taps: TapConfig,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features of a batch of image latents, and the predicted x0 latent of the t = 999 pass (None when 999 is
    not among the timesteps): the caller decodes it for a combined depth answer without a second UNet call.

    `noise` is the Lotus-G noise the depth answer uses; by default the probe's fixed seed (as in training).
    Callers choose the grad mode (serving runs under inference_mode; the ONNX export traces it).
    """
    if noise is None:
        noise = unet_input_noise(core, latent, taps.noise_seed)
    per_t: list[dict[int, torch.Tensor]] = []
    x0: torch.Tensor | None = None
    for t in taps.timesteps:
        with tapped(core.unet, taps.blocks) as captured:
            out = core.predict_latent(latent, noise, timestep=t)
        per_t.append(dict(captured))
        if t == TIMESTEP:
            x0 = out
    padded_hw = (latent.shape[-2] * 8, latent.shape[-1] * 8)
    return assemble(per_t, taps, padded_hw), x0
