"""One training step's loss for each protocol, and the UNet surgery the recipes need before training.

- E2E-FT: the image latent and a zero latent go into the UNet at t = 999; its v-prediction becomes
  x0 = -sqrt(1 - abar_999) * v, which is decoded through the frozen VAE. Depth: the channel mean, clamped to
  [-1, 1], is scored with the affine-invariant L1 (least-squares scale/shift per sample on valid pixels, fit in
  fp32) against metric depth clipped to its 2 / 98 % quantiles, one mean over the batch's valid pixels, as
  upstream (`objective.e2eft_depth_loss: normalized` keeps this project's first version). Normals: mean
  angular error of the decoded vectors.
- Lotus: x0-prediction MSE in latent space against the VAE latent of the normalised target map (annotation
  switch), plus the detail preserver (the same UNet with the reconstruction switch must return the image
  latent). Lotus-G concatenates the target latent noised to t = 999 (pure noise at inference), Lotus-D feeds
  the image latent alone. The latent loss counts only latent cells whose 8 x 8 pixels are all valid.

Latents are the posterior mean (as the service encodes), not a sample: training stays deterministic given its
seeds, which exact resume relies on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from models.outputs import Family, OutputKind
from models.predictors import E2EFTPredictor, LotusPredictor, SingleStepPredictor
from models.predictors.base import TIMESTEP
from models.predictors.lotus import ANNOTATION_SWITCH, RECONSTRUCTION_SWITCH
from models.training import losses
from models.training.config import E2EFTDepthLoss

LATENT_STRIDE = 8
UNET_IN_CHANNELS: dict[Family, int] = {"lotus-g": 8, "lotus-d": 4, "e2e-ft": 8}
# Fill values of invalid target pixels before encoding: depth at the far end (+1), disparity at the far end
# (-1), normals facing the camera. Those latent cells are masked out of the loss; the fill only keeps the
# encoder's view of their valid neighbours plausible.
_FAR_DEPTH, _FAR_DISPARITY = 1.0, -1.0
_FACING_NORMAL = (0.0, 0.0, 1.0)


# --- UNet surgery ---------------------------------------------------------------------------------


#: What each family's upstream training code does to the bias when it widens conv_in (the weights are always
#: repeated and halved): E2E-FT `training/util/unet_prep.py` halves it too, Lotus `train_lotus_*.py` keeps it.
CONV_IN_BIAS_HALVED: dict[Family, bool] = {"lotus-g": False, "lotus-d": False, "e2e-ft": True}


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int, halve_bias: bool) -> bool:
    """Grow a 4-channel conv_in to 8: the weights repeated for the new channels and halved, so an input
    `[x, x]` gives the old response; the bias halved too when `halve_bias` (E2E-FT) or kept (Lotus). Returns
    whether anything changed."""
    conv = unet.conv_in
    if conv.in_channels == in_channels:
        return False
    if conv.in_channels * 2 != in_channels:
        raise ValueError(f"cannot turn a {conv.in_channels}-channel conv_in into {in_channels} channels")
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    ).to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight.repeat(1, 2, 1, 1) * 0.5)
        if conv.bias is not None:
            new.bias.copy_(conv.bias * 0.5 if halve_bias else conv.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return True


def add_task_switcher(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A Lotus UNet from a plain one: the same weights plus a projection class embedding of the 4-d switcher.

    The embedding's last layer starts at zero, so the new UNet computes exactly what the old one did until
    training moves it.
    """
    cfg = unet.config
    if cfg.class_embed_type == "projection" and cfg.projection_class_embeddings_input_dim == 4:
        return unet
    if cfg.class_embed_type is not None or cfg.num_class_embeds is not None:
        raise ValueError(f"the UNet already has a class embedding ({cfg.class_embed_type!r}); cannot add the switcher")
    config = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    config |= {"class_embed_type": "projection", "projection_class_embeddings_input_dim": 4}
    new = UNet2DConditionModel.from_config(config).to(unet.device, unet.dtype)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("class_embedding.") for k in missing):
        raise RuntimeError(f"switcher surgery mismatch: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        new.class_embedding.linear_2.weight.zero_()
        new.class_embedding.linear_2.bias.zero_()
    return new


def adapt_unet(unet: UNet2DConditionModel, family: Family) -> tuple[UNet2DConditionModel, list[str]]:
    """Bring a starting UNet to what `family` needs; returns the UNet and what was changed (for the log)."""
    changes: list[str] = []
    lotus = family.startswith("lotus")
    has_switch = unet.config.class_embed_type == "projection"
    if lotus and not has_switch:
        unet = add_task_switcher(unet)
        changes.append("added the Lotus task switcher (zero-initialised)")
    if not lotus and has_switch:
        raise ValueError("e2e-ft starts from a Stable Diffusion / Marigold UNet, not a Lotus one (task switcher)")
    want = UNET_IN_CHANNELS[family]
    have = unet.config.in_channels
    if have > want:
        raise ValueError(f"{family} needs a UNet with {want} input channels; the starting one has {have}")
    halve_bias = CONV_IN_BIAS_HALVED[family]
    if widen_conv_in(unet, want, halve_bias):
        bias = "weights and bias halved" if halve_bias else "weights halved, bias kept"
        changes.append(f"widened conv_in from {have} to {want} channels ({bias}, as upstream {family})")
    return unet, changes


def alpha_bar_999(scheduler_config: dict) -> float:
    """abar at t = 999 from the checkpoint's own beta schedule (the same number the E2E-FT predictor uses)."""
    return E2EFTPredictor.alpha_bar_from_scheduler(scheduler_config)


# --- targets --------------------------------------------------------------------------------------


def latent_mask(valid: torch.Tensor) -> torch.Tensor:
    """`[B, 1, H, W]` pixel validity -> `[B, 1, H/8, W/8]`: a latent cell counts when all its pixels are valid."""
    invalid = (~valid).float()
    return F.max_pool2d(invalid, LATENT_STRIDE, LATENT_STRIDE) < 0.5


def scalar_target(depth: torch.Tensor, valid: torch.Tensor, kind: OutputKind, low: float, high: float) -> torch.Tensor:
    """Depth or disparity normalised per sample between its `low` and `high` quantiles to [-1, 1] and clipped."""
    if kind == "disparity":
        x = torch.where(valid, 1.0 / depth.float().clamp(min=1e-8), torch.zeros_like(depth))
    else:
        x = depth.float()
    return losses.quantile_normalize(x, valid, low, high)


def target_image(batch: dict[str, torch.Tensor], kind: OutputKind, low: float, high: float) -> torch.Tensor:
    """The 3-channel map in [-1, 1] that the VAE encodes for Lotus (and that the VAE fit reconstructs)."""
    if kind == "normals":
        n, ok = batch["normals"], batch["normals_valid"]
        fill = torch.tensor(_FACING_NORMAL, dtype=n.dtype, device=n.device).view(1, 3, 1, 1)
        return torch.where(ok, n, fill)
    t = scalar_target(batch["depth"], batch["valid"], kind, low, high)
    far = _FAR_DISPARITY if kind == "disparity" else _FAR_DEPTH
    t = torch.where(batch["valid"], t, torch.full_like(t, far))
    return t.expand(-1, 3, -1, -1)


def target_valid(batch: dict[str, torch.Tensor], kind: OutputKind) -> torch.Tensor:
    return batch["normals_valid"] if kind == "normals" else batch["valid"]


def masked_latent_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the latent cells in `mask` (fp32); zero (with a graph) when none count."""
    m = mask.expand_as(pred).float()
    count = m.sum()
    err = (pred.float() - target.float()) ** 2
    return (err * m).sum() / count.clamp(min=1.0)


# --- the trained module ---------------------------------------------------------------------------


class TrainingCore(nn.Module):
    """UNet (trained) + VAE (frozen) + the cached empty-prompt embedding; `forward` returns a batch's loss.

    This is the module `accelerate` wraps (DDP); only the UNet has parameters that require gradients.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        prompt_embeds: torch.Tensor,
        family: Family,
        output_kind: OutputKind,
        alpha_bar: float,
        reconstruction_weight: float = 1.0,
        quantiles: tuple[float, float] = (0.02, 0.98),
        e2eft_depth_loss: E2EFTDepthLoss = "upstream",
    ) -> None:
        super().__init__()
        if family == "e2e-ft" and output_kind == "disparity":
            raise ValueError("e2e-ft is trained for depth or normals")
        self.unet = unet
        self.vae = vae.requires_grad_(False).eval()
        # A clone made here is a normal tensor even when the embedding was computed under inference_mode
        # (as the loader does); autograd may need to save it, e.g. under gradient checkpointing.
        self.register_buffer("prompt_embeds", prompt_embeds.detach().float().clone(), persistent=False)
        self.family: Family = family
        self.output_kind: OutputKind = output_kind
        self.alpha_bar = alpha_bar
        self.reconstruction_weight = reconstruction_weight
        self.quantiles = quantiles
        self.e2eft_depth_loss: E2EFTDepthLoss = e2eft_depth_loss
        self.scaling_factor = float(vae.config.scaling_factor)

    def train(self, mode: bool = True) -> TrainingCore:
        """Only the UNet switches mode; the frozen VAE always runs as at inference."""
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def generative(self) -> bool:
        return self.family == "lotus-g"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(x).latent_dist.mode() * self.scaling_factor

    def _unet(self, sample: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        batch = sample.shape[0]
        timestep = torch.full((batch,), TIMESTEP, dtype=torch.long, device=sample.device)
        hidden = self.prompt_embeds.to(sample.dtype).expand(batch, -1, -1)
        return self.unet(sample, timestep, encoder_hidden_states=hidden, class_labels=class_labels).sample

    def forward(
        self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached parts for logging). `noise` (Lotus-G only) is `[B, 4, h, w]` standard normal."""
        if self.family == "e2e-ft":
            return self._e2eft(batch)
        return self._lotus(batch, noise)

    def _e2eft(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_latent = self.encode(batch["image"])
        v = self._unet(torch.cat([image_latent, torch.zeros_like(image_latent)], dim=1), None)
        x0 = v * -math.sqrt(1.0 - self.alpha_bar)
        decoded = self.vae.decode(x0 / self.scaling_factor).sample
        if self.output_kind == "normals":
            loss = losses.normals_angular_loss(decoded, batch["normals"], batch["normals_valid"])
            return loss, {"angular_rad": loss.detach()}
        lo, hi = self.quantiles
        pred = decoded.mean(dim=1, keepdim=True)
        if self.e2eft_depth_loss == "upstream":
            target, valid = losses.clip_to_quantiles(batch["depth"], batch["valid"], lo, hi)
            loss = losses.affine_invariant_l1(pred.clamp(-1.0, 1.0), target, valid, reduction="pixel")
        else:
            target = scalar_target(batch["depth"], batch["valid"], "depth", lo, hi)
            loss = losses.affine_invariant_l1(pred, target, batch["valid"])
        return loss, {"affine_l1": loss.detach()}

    def _lotus(
        self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lo, hi = self.quantiles
        image_latent = self.encode(batch["image"])
        target_latent = self.encode(target_image(batch, self.output_kind, lo, hi).to(image_latent.dtype))
        mask = latent_mask(target_valid(batch, self.output_kind))
        b = image_latent.shape[0]
        detail = self.reconstruction_weight > 0
        dtype, device = image_latent.dtype, image_latent.device
        annotate = torch.tensor(ANNOTATION_SWITCH, dtype=dtype, device=device).expand(b, -1)
        reconstruct = torch.tensor(RECONSTRUCTION_SWITCH, dtype=dtype, device=device).expand(b, -1)
        if self.generative:
            if noise is None or noise.shape != image_latent.shape:
                raise ValueError("Lotus-G training needs standard-normal noise shaped like the image latent")
            a, s = math.sqrt(self.alpha_bar), math.sqrt(1.0 - self.alpha_bar)
            inputs = [torch.cat([image_latent, a * target_latent + s * noise], dim=1)]
            if detail:
                inputs.append(torch.cat([image_latent, a * image_latent + s * noise], dim=1))
        else:
            inputs = [image_latent, image_latent] if detail else [image_latent]
        switches = [annotate, reconstruct] if detail else [annotate]
        # Both branches in one UNet call: one batch of 2B, like upstream.
        out = self._unet(torch.cat(inputs), torch.cat(switches))
        annotation = masked_latent_mse(out[:b], target_latent, mask)
        parts = {"annotation_mse": annotation.detach()}
        loss = annotation
        if detail:
            rec = losses.latent_mse(out[b:], image_latent)
            parts["reconstruction_mse"] = rec.detach()
            loss = loss + self.reconstruction_weight * rec
        return loss, parts

    def predictor(self) -> SingleStepPredictor:
        """The serving predictor over these very modules (no copy), for validation during training."""
        prompt = self.prompt_embeds.to(self.unet.dtype)
        if self.family == "e2e-ft":
            core: SingleStepPredictor = E2EFTPredictor(self.unet, self.vae, prompt, self.output_kind, self.alpha_bar)
        else:
            core = LotusPredictor(self.unet, self.vae, prompt, self.output_kind, generative=self.generative)
        return core


# --- VAE fit (scratch checkpoints only) -----------------------------------------------------------


def vae_fit_loss(
    vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Autoencoder loss: L1 reconstruction of a latent sample (robust to the UNet's latent errors) + KL."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample
    l1 = (recon.float() - x.float()).abs().mean()
    kl = posterior.kl().mean() / x[0].numel()
    return l1 + kl_weight * kl, {"vae_l1": l1.detach(), "vae_kl": kl.detach()}
