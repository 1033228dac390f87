"""Lotus: the UNet predicts the clean annotation latent (x0) directly, steered by a task switcher.

Lotus-G concatenates seeded noise to the image latent; Lotus-D feeds the image latent alone.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from models.outputs import OutputKind
from models.predictors.base import TIMESTEP, SingleStepPredictor
from models.predictors.processing import normalize_vectors

# class_labels for the annotation branch: [sin 1, sin 0, cos 1, cos 0].
ANNOTATION_SWITCH = (math.sin(1.0), math.sin(0.0), math.cos(1.0), math.cos(0.0))
# The reconstruction branch (detail preserver), used only in training: [sin 0, sin 1, cos 0, cos 1].
RECONSTRUCTION_SWITCH = (math.sin(0.0), math.sin(1.0), math.cos(0.0), math.cos(1.0))


class LotusPredictor(SingleStepPredictor):
    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        prompt_embeds: torch.Tensor,
        output_kind: OutputKind,
        generative: bool,
    ) -> None:
        super().__init__(unet, vae, prompt_embeds, output_kind)
        self.generative = generative
        # Kept on the device with the weights: a tensor made from Python numbers inside the forward is a host
        # copy and a sync on CUDA, which CUDA graph capture refuses.
        annotation = torch.tensor(ANNOTATION_SWITCH, dtype=unet.dtype)
        self.register_buffer("annotation_switch", annotation, persistent=False)

    def task_switch(self, batch: int, switch: tuple[float, ...] = ANNOTATION_SWITCH) -> torch.Tensor:
        if switch == ANNOTATION_SWITCH:
            return self.annotation_switch.to(self.dtype).expand(batch, -1)
        return torch.tensor(switch, dtype=self.dtype, device=self.device).expand(batch, -1)

    def predict_latent(
        self, image_latent: torch.Tensor, noise: torch.Tensor | None = None, timestep: int = TIMESTEP
    ) -> torch.Tensor:
        if self.generative:
            if noise is None or noise.shape != image_latent.shape:
                raise ValueError("Lotus-G needs one noise latent per image, shaped like the image latent")
            sample = torch.cat([image_latent, noise], dim=1)
        else:
            sample = image_latent
        return self.unet_step(sample, self.task_switch(sample.shape[0]), timestep)

    def postprocess(self, decoded: torch.Tensor) -> torch.Tensor:
        # Clamp per channel first, then reduce: the order differs from Marigold on purpose.
        x = (decoded.float() / 2.0 + 0.5).clamp(0.0, 1.0)
        if self.output_kind == "normals":
            return normalize_vectors(x * 2.0 - 1.0, dim=1)
        return x.mean(dim=1, keepdim=True)
