"""The shape every family shares: VAE encoder -> one UNet call at t = 999 -> VAE decoder -> map."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from models.outputs import OutputKind

TIMESTEP = 999


class SingleStepPredictor(torch.nn.Module, ABC):
    """Batch-first, device-agnostic core: `[B, 3, H, W]` in [-1, 1] -> `[B, C, H, W]` float32 maps.

    Stages are separate methods so exporters and the multi-seed path can call them one by one
    (for example: encode once, repeat the latent, run the rest per seed).
    """

    #: Whether the UNet input carries seeded noise (Lotus-G only).
    generative: bool = False

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        prompt_embeds: torch.Tensor,
        output_kind: OutputKind,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.output_kind = output_kind
        self.scaling_factor = float(vae.config.scaling_factor)
        # The empty prompt (BOS, EOS) is computed once at load time: `[1, 2, C]`.
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def out_channels(self) -> int:
        return 3 if self.output_kind == "normals" else 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior mean, not a sample: a service must be deterministic."""
        return self.vae.encode(images).latent_dist.mode() * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample

    def unet_step(
        self, sample: torch.Tensor, class_labels: torch.Tensor | None = None, timestep: int = TIMESTEP
    ) -> torch.Tensor:
        """One UNet call; `timestep` is 999 for every served prediction (probes tap other t too)."""
        batch = sample.shape[0]
        timesteps = torch.full((batch,), timestep, dtype=torch.long, device=sample.device)
        hidden = self.prompt_embeds.to(sample.dtype).expand(batch, -1, -1)
        return self.unet(sample, timesteps, encoder_hidden_states=hidden, class_labels=class_labels).sample

    def make_noise(self, seeds: Sequence[int], latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """Seeded noise for generative families, on this core's device and dtype."""
        if not self.generative:
            return None
        return seeded_noise(seeds, latent_hw).to(self.device, self.dtype)

    @abstractmethod
    def predict_latent(
        self, image_latent: torch.Tensor, noise: torch.Tensor | None = None, timestep: int = TIMESTEP
    ) -> torch.Tensor:
        """One UNet call, returning the predicted clean latent x0 (meaningful at t = 999 only)."""

    @abstractmethod
    def postprocess(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoded RGB `[B, 3, H, W]` -> float32 map in the output kind's range."""

    def head(self, image_latent: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Everything after the encoder: UNet, decoder, post-processing (the multi-seed path repeats only this)."""
        return self.postprocess(self.decode(self.predict_latent(image_latent, noise)))

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encode(images), noise)


def seeded_noise(seeds: Sequence[int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Lotus-G noise `[B, 4, h, w]` float32, one latent per seed, drawn on the CPU so that every device and
    backend gets the same numbers for the same seed."""
    return torch.cat(
        [torch.randn((1, 4, *latent_hw), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    )
