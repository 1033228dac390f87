"""An independent reference of each family's math, written from docs/model-semantics.md.

It uses only diffusers/transformers components and torch, never the code under test, and processes one
image at a time without batching, exactly as the document describes.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@lru_cache(maxsize=8)
def _components(ckpt: str) -> tuple[UNet2DConditionModel, AutoencoderKL, torch.Tensor, DDIMScheduler]:
    path = Path(ckpt)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True)
    ids = tokenizer("", padding="do_not_pad", return_tensors="pt").input_ids
    assert ids.shape == (1, 2), "empty prompt must tokenise to BOS, EOS"
    with torch.no_grad():
        prompt = text_encoder(ids)[0]
    unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True).eval()
    vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True).eval()
    scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
    return unet, vae, prompt, scheduler


@torch.no_grad()
def reference_map(
    ckpt: Path, family: str, kind: str, image: np.ndarray, processing_res: int, seed: int = 0
) -> np.ndarray:
    unet, vae, prompt, scheduler = _components(str(ckpt))
    sf = vae.config.scaling_factor
    H, W = image.shape[:2]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    if processing_res:
        long = max(H, W)
        h, w = max(1, H * processing_res // long), max(1, W * processing_res // long)
        x = F.interpolate(x, (h, w), mode="bilinear", antialias=True)
    else:
        h, w = H, W
    ph, pw = (8 - h % 8) % 8, (8 - w % 8) % 8
    x = F.pad(x, (0, pw, 0, ph), mode="replicate") * 2 - 1
    z = vae.encode(x).latent_dist.mean * sf
    t = torch.tensor([999], dtype=torch.long)

    if family.startswith("lotus"):
        switch = torch.tensor([[math.sin(1), math.sin(0), math.cos(1), math.cos(0)]])
        if family == "lotus-g":
            g = torch.Generator("cpu").manual_seed(seed)
            unet_in = torch.cat([z, torch.randn(z.shape, generator=g)], dim=1)
        else:
            unet_in = z
        x0 = unet(unet_in, t, encoder_hidden_states=prompt, class_labels=switch).sample
    else:
        abar = scheduler.alphas_cumprod[999]
        z_t = torch.zeros_like(z)
        v = unet(torch.cat([z, z_t], dim=1), t, encoder_hidden_states=prompt).sample
        x0 = abar.sqrt() * z_t - (1 - abar).sqrt() * v

    dec = vae.decode(x0 / sf).sample
    if family.startswith("lotus"):
        y = torch.clamp(dec / 2 + 0.5, 0, 1)
        out = y.mean(dim=1, keepdim=True) if kind != "normals" else y * 2 - 1
    elif kind == "normals":
        out = dec.clamp(-1, 1)
    else:
        out = (dec.mean(dim=1, keepdim=True).clamp(-1, 1) + 1) / 2
    if kind == "normals":
        out = out / out.norm(dim=1, keepdim=True).clamp(min=1e-6)
    out = out[:, :, :h, :w]
    if (h, w) != (H, W):
        out = F.interpolate(out, (H, W), mode="bilinear", align_corners=False)
    if kind == "normals":
        out = out / out.norm(dim=1, keepdim=True).clamp(min=1e-6)
        return out[0].permute(1, 2, 0).numpy()
    return out[0, 0].numpy()
