"""E2E-FT: a Marigold / Stable Diffusion UNet fine-tuned end to end for one step from a zero latent.

The UNet predicts v; with z_t = 0 the clean latent is x0 = -sqrt(1 - abar_999) * v.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from models.outputs import OutputKind
from models.predictors.base import TIMESTEP, SingleStepPredictor
from models.predictors.processing import normalize_vectors


class E2EFTPredictor(SingleStepPredictor):
    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        prompt_embeds: torch.Tensor,
        output_kind: OutputKind,
        alpha_bar: float,
        use_full_z_range: bool = True,
    ) -> None:
        super().__init__(unet, vae, prompt_embeds, output_kind)
        self.alpha_bar = alpha_bar
        self.v_to_x0 = -math.sqrt(1.0 - alpha_bar)
        self.use_full_z_range = use_full_z_range

    @staticmethod
    def alpha_bar_from_scheduler(config: dict) -> float:
        """abar at t = 999 from the checkpoint's own beta schedule (never hard-coded)."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(config)
        return float(scheduler.alphas_cumprod[TIMESTEP])

    def predict_latent(
        self, image_latent: torch.Tensor, noise: torch.Tensor | None = None, timestep: int = TIMESTEP
    ) -> torch.Tensor:
        v = self.unet_step(torch.cat([image_latent, torch.zeros_like(image_latent)], dim=1), timestep=timestep)
        return v * self.v_to_x0

    def postprocess(self, decoded: torch.Tensor) -> torch.Tensor:
        x = decoded.float()
        if self.output_kind == "normals":
            x = x.clamp(-1.0, 1.0)
            if not self.use_full_z_range:
                x = torch.cat([x[:, :2], x[:, 2:] * 0.5 + 0.5], dim=1)
            return normalize_vectors(x, dim=1)
        return (x.mean(dim=1, keepdim=True).clamp(-1.0, 1.0) + 1.0) / 2.0
