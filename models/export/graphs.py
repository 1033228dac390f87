"""The two exported graphs, as modules over a predictor core, and the inputs they are traced with."""

from __future__ import annotations

import torch

from models.predictors.base import SingleStepPredictor

ENCODER = "encoder"
HEAD = "head"
GRAPHS = (ENCODER, HEAD)
#: Latent size the graphs are traced at. Odd on purpose: the UNet then takes its `upsample_size` path, which
#: follows the skip connections' shapes and so stays correct for every input size, not only multiples of 8.
TRACE_LATENT_HW = (13, 11)
TRACE_BATCH = 2


class EncoderGraph(torch.nn.Module):
    """`image [B, 3, H, W]` in [-1, 1] -> scaled posterior-mean latent `[B, 4, H/8, W/8]`."""

    def __init__(self, core: SingleStepPredictor) -> None:
        super().__init__()
        self.core = core

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.core.encode(image)


class HeadGraph(torch.nn.Module):
    """`latent` (+ `noise` for Lotus-G) -> float32 map; prompt, timestep and task switcher are constants."""

    def __init__(self, core: SingleStepPredictor) -> None:
        super().__init__()
        self.core = core

    def forward(self, latent: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.core.head(latent, noise)


def input_names(graph: str, generative: bool) -> list[str]:
    if graph == ENCODER:
        return ["image"]
    return ["latent", "noise"] if generative else ["latent"]


def output_name(graph: str) -> str:
    return "latent" if graph == ENCODER else "map"


def trace_inputs(graph: str, generative: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    lh, lw = TRACE_LATENT_HW
    gen = torch.Generator("cpu").manual_seed(0)
    if graph == ENCODER:
        return (torch.rand((TRACE_BATCH, 3, lh * 8, lw * 8), generator=gen).to(device) * 2 - 1,)
    latent = torch.randn((TRACE_BATCH, 4, lh, lw), generator=gen).to(device)
    return (latent, torch.randn_like(latent)) if generative else (latent,)
