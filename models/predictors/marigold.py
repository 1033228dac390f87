"""Marigold (multi-step): the UNet refines a prediction latent from noise over several denoising steps,
conditioned on the image latent, with the checkpoint's own scheduler (DDIM or LCM, read from its config).

The stages are separate so the serving loop can encode each image once, run one UNet call per step over
every job in flight (each at its own timestep), and decode only what it needs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from models.outputs import OutputKind
from models.predictors.processing import normalize_vectors


def scheduler_from_config(config: dict[str, Any]) -> Any:
    """The scheduler class the checkpoint names, built from its config: spacing, prediction type and betas
    are the checkpoint's, never assumed."""
    import diffusers

    name = config.get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise ValueError(f"unknown scheduler class {name!r} in the checkpoint's scheduler config")
    return cls.from_config(config)


class MarigoldCore(torch.nn.Module):
    """Batch-first tensors in, tensors out, on one device and dtype."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        prompt_embeds: torch.Tensor,
        output_kind: OutputKind,
        scheduler_config: dict[str, Any],
        use_full_z_range: bool = True,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.output_kind = output_kind
        self.scaling_factor = float(vae.config.scaling_factor)
        self.use_full_z_range = use_full_z_range
        self._scheduler = scheduler_from_config(scheduler_config)
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def scheduler_name(self) -> str:
        return type(self._scheduler).__name__

    @property
    def draws_step_noise(self) -> bool:
        """LCM re-noises between steps from the request's generator; DDIM (eta 0) draws nothing."""
        return self.scheduler_name == "LCMScheduler"

    def new_scheduler(self, steps: int) -> Any:
        """A scheduler of its own for one trajectory: LCM keeps a step index, DDIM its step count."""
        scheduler = copy.deepcopy(self._scheduler)
        scheduler.set_timesteps(steps, device=torch.device("cpu"))
        return scheduler

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior mode times the scaling factor, as diffusers' Marigold `prepare_latents`."""
        return self.vae.encode(images.to(self.device, self.dtype)).latent_dist.mode() * self.scaling_factor

    def denoise(self, image_latent: torch.Tensor, latent: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """One UNet call over `[image latent, current latent]`, each row at its own timestep."""
        sample = torch.cat([image_latent, latent], dim=1).to(self.dtype)
        hidden = self.prompt_embeds.to(self.dtype).expand(sample.shape[0], -1, -1)
        return self.unet(sample, timesteps.to(self.device), encoder_hidden_states=hidden).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 maps `[B, C, H, W]` as diffusers' `decode_prediction`: depth = channel mean,
        clipped, to [0, 1]; normals = clipped, unit length."""
        x = self.vae.decode(latents.to(self.dtype) / self.scaling_factor).sample.float()
        if self.output_kind == "normals":
            x = x.clamp(-1.0, 1.0)
            if not self.use_full_z_range:
                x = torch.cat([x[:, :2], x[:, 2:] * 0.5 + 0.5], dim=1)
            return normalize_vectors(x, dim=1)
        return (x.mean(dim=1, keepdim=True).clamp(-1.0, 1.0) + 1.0) / 2.0
