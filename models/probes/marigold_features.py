"""Probe features from a Marigold UNet (a generative, multi-step family), as DDPM-segmentation takes them: the
image latent noised to t with a fixed seed.

Marigold's UNet reads `[image latent, x_t]` (8 channels) and denoises the second half toward the depth latent.
For the taps, x_t = the checkpoint scheduler's `add_noise(image latent, noise, t)` with the probe's fixed-seed
noise (one latent for the whole batch, so an image's features never depend on its batch neighbours), and the
condition is the clean image latent: the UNet sees the image twice, clean and noised to t, which is the input
DDPM-segmentation feeds its UNet (the noised image) with Marigold's conditioning on top. A noised *depth*
latent would need the depth first (a full multi-step run per image), and a pure-noise x_t (the first denoising
step's input) carries no image at small t; the noised image is the only choice whose features are set by the
image alone at every t.

`MarigoldFeatureCore` presents this as the single-step core the probe code taps (`predict_latent(latent,
noise, timestep=t)` = one UNet call at t with forward hooks): extraction, training and serving reuse it
unchanged. Its output is the UNet's raw prediction, not a depth latent: the depth answer of a Marigold base is
its own multi-step run (`Probe.segment` asks the base model for it).
"""

from __future__ import annotations

import torch

from models.predictors.base import TIMESTEP, SingleStepPredictor
from models.predictors.marigold import MarigoldCore


class MarigoldFeatureCore(SingleStepPredictor):
    """The Marigold core's modules (shared, not copied) behind the single-step interface the taps use."""

    generative = True  # the UNet input holds the probe's fixed-seed noise

    def __init__(self, core: MarigoldCore) -> None:
        super().__init__(core.unet, core.vae, core.prompt_embeds, core.output_kind)
        self.marigold = core
        self.scheduler = core.new_scheduler(1)  # add_noise reads the training schedule only (alphas_cumprod)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.marigold.encode(images)

    def noised(self, image_latent: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        """x_t of the image latent under the checkpoint's own noise schedule."""
        t = torch.full((image_latent.shape[0],), timestep, dtype=torch.long, device=image_latent.device)
        # fp32 on the latent's own device: the scheduler moves its schedule there once (no host round trip)
        x_t = self.scheduler.add_noise(image_latent.float(), noise.float(), t)
        return x_t.to(image_latent.dtype)

    def predict_latent(
        self, image_latent: torch.Tensor, noise: torch.Tensor | None = None, timestep: int = TIMESTEP
    ) -> torch.Tensor:
        """One UNet call on `[image latent, x_t]` at `timestep`: what the hooks read (the output is the UNet's
        raw prediction, not a map)."""
        if noise is None:
            raise ValueError("Marigold features need the probe's fixed-seed noise")
        x_t = self.noised(image_latent, noise, timestep)
        t = torch.full((image_latent.shape[0],), timestep, dtype=torch.long, device=image_latent.device)
        return self.marigold.denoise(image_latent, x_t, t)

    def postprocess(self, decoded: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a Marigold map takes the base model's multi-step run, not one UNet call")
