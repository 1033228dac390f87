"""Build a predictor's modules from a local diffusers checkpoint folder (torch).

Its own module so that the loader (`models.loading`, which exports into the engine cache) and the exporter
(`models.export.exporter`, which traces the eager predictor) share it without importing each other. diffusers
and transformers are imported in the functions: importing them takes seconds, and this module is imported by
every worker and exporter before it knows whether it loads a checkpoint at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.detect import CheckpointConfig, ModelIdentity
from models.predictors import E2EFTPredictor, LotusPredictor, SingleStepPredictor

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel


def empty_prompt_embedding(path: Path) -> torch.Tensor:
    """Tokenise "" without padding (BOS, EOS) and encode it once, in fp32 on the CPU: `[1, 2, C]`."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(
        path / "text_encoder", torch_dtype=torch.float32, use_safetensors=True
    ).eval()
    ids = tokenizer(
        "", padding="do_not_pad", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.inference_mode():
        return encoder(ids)[0].clone()


def load_unet_vae(path: Path, dtype: torch.dtype) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """The frozen UNet and VAE with fused SDPA attention: what every served family runs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    # `path` is a local folder (a hub id is already the snapshot of its pinned revision: models.source), so no
    # revision here; use_safetensors=True: a pickle `.bin` is never a fallback.
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=True)
    for module in (unet, vae):
        module.set_attn_processor(AttnProcessor2_0())  # fused SDPA attention
        module.requires_grad_(False)
    return unet, vae


def build_core(
    path: Path, cfg: CheckpointConfig, ident: ModelIdentity, device: torch.device, dtype: torch.dtype
) -> SingleStepPredictor:
    """The eager single-step predictor (Lotus or E2E-FT) of a checkpoint, on `device` in `dtype`."""
    unet, vae = load_unet_vae(path, dtype)
    prompt = empty_prompt_embedding(path).to(dtype)
    core: SingleStepPredictor
    if ident.family == "e2e-ft":
        core = E2EFTPredictor(
            unet,
            vae,
            prompt,
            ident.output_kind,
            alpha_bar=E2EFTPredictor.alpha_bar_from_scheduler(cfg.scheduler),
            use_full_z_range=bool(cfg.model_index.get("use_full_z_range", True)),
        )
    else:
        core = LotusPredictor(unet, vae, prompt, ident.output_kind, generative=ident.family == "lotus-g")
    return core.to(device).eval()
