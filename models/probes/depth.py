"""DAG's depth probe: a shallow pixel MLP on decoder features with a time embedding, and its strong/weak pair.

One MLP serves every timestep: the per-pixel features of ONE timestep (its blocks concatenated) are
batch-normalised and concatenated with a sinusoidal embedding of t before the first layer, so the MLP is
trained on features drawn at random configured timesteps and predicts from any of them (serving averages the
predictions of its serving timesteps). It regresses depth normalised per image to [0, 1] (affine-invariant:
evaluation aligns it by least squares); L1 loss.

The "strong" MLP reads the configured blocks; the optional "weak" one reads its own (DAG: block 6 alone of the
SD UNet) and is trained beside it on the same pixels. Both live in one `DepthHeads` module (one safetensors).
Taps are the decoder layers of features.py plus one more, the UNet's output (`tap_channels`).
Feature layout: `extract_depth_features` with the union of both heads' blocks returns `[B, T * C, h, w]`,
timestep-major; `head_channels` says which channels of one timestep's slice each head reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.predictors.base import TIMESTEP, SingleStepPredictor
from models.probes.features import TapConfig, assemble, decoder_layers, layer_channels, tapped


def tap_channels(unet: nn.Module) -> list[int]:
    """Channels of every tap a depth probe may name: the decoder layers (features.py's numbering), then one
    more, the UNet's OUTPUT (its predicted latent at that timestep): block `len(decoder_layers)`."""
    return [*layer_channels(unet), int(unet.config.out_channels)]  # type: ignore[union-attr]


def check_taps(unet: nn.Module, blocks: Sequence[int]) -> None:
    n = len(decoder_layers(unet))
    bad = [b for b in blocks if not 0 <= b <= n]
    if bad:
        raise ValueError(f"blocks {bad} do not exist: this UNet's decoder has layers 0..{n - 1}, and {n} is its output")


def extract_depth_features(
    core: SingleStepPredictor, latent: torch.Tensor, taps: TapConfig, noise: torch.Tensor | None
) -> torch.Tensor:
    """`features.extract` with the output tap: `[B, T * sum(channels), h, w]`, timestep-major, bilinear."""
    return depth_taps(core, latent, taps, noise)[0]


def depth_taps(
    core: SingleStepPredictor, latent: torch.Tensor, taps: TapConfig, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The features, and the UNet output of the t = 999 pass (None when 999 is not among the timesteps): the
    predicted latent the base model's own map decodes (the ONNX export answers both from one pass)."""
    check_taps(core.unet, taps.blocks)
    n = len(decoder_layers(core.unet))
    layers = [b for b in taps.blocks if b < n]
    per_t: list[dict[int, torch.Tensor]] = []
    x0: torch.Tensor | None = None
    for t in taps.timesteps:
        with tapped(core.unet, layers) as captured:
            out = core.predict_latent(latent, noise, timestep=t)
        per_t.append({**captured, n: out})
        if t == TIMESTEP:
            x0 = out
    return assemble(per_t, taps, (latent.shape[-2] * 8, latent.shape[-1] * 8)), x0


def timestep_embedding(t: torch.Tensor, dims: int) -> torch.Tensor:
    """`[N]` timesteps -> `[N, dims]` sin/cos features at geometric frequencies (the UNet's own scheme)."""
    half = dims // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1))
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1) if dims % 2 else emb


class DepthMLP(nn.Module):
    """`[N, D]` pixel features + `[N]` timesteps -> `[N]` normalised depth."""

    def __init__(self, in_dim: int, hidden: tuple[int, int], time_dims: int) -> None:
        super().__init__()
        h1, h2 = hidden
        self.time_dims = time_dims
        self.norm = nn.BatchNorm1d(in_dim)  # UNet activations differ in scale by orders of magnitude per layer
        self.body = nn.Sequential(
            nn.Linear(in_dim + time_dims, h1),
            nn.ReLU(),
            nn.BatchNorm1d(h1),
            nn.Linear(h1, h2),
            nn.ReLU(),
            nn.BatchNorm1d(h2),
            nn.Linear(h2, 1),
        )

    def forward(self, rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.norm(rows)
        if self.time_dims:
            x = torch.cat([x, timestep_embedding(t, self.time_dims).to(x.dtype)], dim=1)
        return self.body(x)[:, 0]

    def at(self, rows: torch.Tensor, t: int) -> torch.Tensor:
        """`forward` with every row at one timestep: its embedding is computed once and broadcast (the same
        numbers; in a traced graph it is a constant, the time embedding baked in)."""
        x = self.norm(rows)
        if self.time_dims:
            emb = timestep_embedding(torch.tensor([t], device=rows.device), self.time_dims).to(x.dtype)
            x = torch.cat([x, emb.expand(x.shape[0], -1)], dim=1)
        return self.body(x)[:, 0]


def tap_blocks(strong: Sequence[int], weak: Sequence[int]) -> tuple[int, ...]:
    """The blocks to tap: the strong head's, then the weak head's that are not among them."""
    return tuple(strong) + tuple(b for b in weak if b not in strong)


def head_channels(channels: Sequence[int], taps: Sequence[int], blocks: Sequence[int]) -> torch.Tensor:
    """Indices, within one timestep's `sum(channels[b] for b in taps)` feature channels, of `blocks`' channels."""
    offsets, start = {}, 0
    for b in taps:
        offsets[b] = start
        start += channels[b]
    return torch.cat([torch.arange(offsets[b], offsets[b] + channels[b]) for b in blocks])


class DepthHeads(nn.Module):
    """The strong MLP and the optional weak one; `forward` maps one timestep's feature map to a depth map."""

    def __init__(
        self,
        channels: Sequence[int],
        blocks: Sequence[int],
        weak_blocks: Sequence[int],
        hidden: tuple[int, int],
        time_dims: int,
    ) -> None:
        super().__init__()
        self.taps = tap_blocks(blocks, weak_blocks)
        self.step_dim = sum(channels[b] for b in self.taps)
        self.register_buffer("strong_index", head_channels(channels, self.taps, blocks), persistent=False)
        self.strong = DepthMLP(len(self.strong_index), hidden, time_dims)
        self.weak: DepthMLP | None = None
        if weak_blocks:
            self.register_buffer("weak_index", head_channels(channels, self.taps, weak_blocks), persistent=False)
            self.weak = DepthMLP(len(self.weak_index), hidden, time_dims)

    def head(self, name: str) -> tuple[DepthMLP, torch.Tensor]:
        if name == "weak":
            if self.weak is None:
                raise ValueError("this depth probe was trained without a weak head")
            return self.weak, self.weak_index
        return self.strong, self.strong_index

    def forward(self, features: torch.Tensor, t: int, head: str = "strong") -> torch.Tensor:
        """`[B, step_dim, h, w]` features of timestep `t` -> `[B, 1, h, w]` normalised depth."""
        mlp, index = self.head(head)
        b, _, h, w = features.shape
        rows = features.index_select(1, index).permute(0, 2, 3, 1).reshape(b * h * w, -1)
        return mlp.at(rows, t).reshape(b, 1, h, w)

    def averaged(self, features: torch.Tensor, timesteps: Sequence[int], head: str = "strong") -> torch.Tensor:
        """`[B, 1, h, w]`: the head's mean over `timesteps` of `extract_depth_features`' output (serving)."""
        grids = [self(f, t, head) for f, t in zip(self.per_step(features, timesteps), timesteps, strict=True)]
        total = grids[0]
        for grid in grids[1:]:
            total = total + grid
        # No `/ 1` for one timestep: an ONNX optimizer drops such a no-op and with it a graph output's name.
        return total / len(grids) if len(grids) > 1 else total

    def per_step(self, features: torch.Tensor, timesteps: Sequence[int]) -> list[torch.Tensor]:
        """Split `extract_depth_features`' timestep-major `[B, T * step_dim, h, w]` into one slice per timestep."""
        if features.shape[1] != len(timesteps) * self.step_dim:
            raise ValueError(f"expected {len(timesteps)} x {self.step_dim} feature channels, got {features.shape[1]}")
        return list(features.split(self.step_dim, dim=1))
