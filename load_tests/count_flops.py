"""FLOPs of one prediction on the Stable Diffusion 2 architecture, per stage: the figures of docs/performance.md.

    .venv/bin/python -m load_tests.count_flops [--res 512 768]          (about 2 s on one CPU core)

The real diffusers classes with SD2's configuration (`models.tiny.SD2_UNET`, `SD2_VAE`: an 865.9 M parameter
UNet, the 128/256/512/512 VAE) are built on torch's `meta` device, so no weights are allocated and nothing is
computed: `torch.utils.flop_counter.FlopCounterMode` counts each matmul and convolution from its shapes alone
(one multiply-add = 2 FLOPs; normalisations, activations and element-wise operations are not counted). The
same counter runs on the real model in `load_tests/gpu_check.py` (`count_flops`), whose totals agree.

Stages: the VAE encoder (image to latent), one UNet call with 8 input channels (Lotus-G, E2E-FT and each Marigold
step) and with 4 (Lotus-D, whose UNet also has the task-switcher class embedding), and the VAE decoder. A
single-step prediction is encoder + one UNet call + decoder; a multi-step one is encoder + steps x members UNet
calls + members decoder calls (the image is encoded once). On `meta`, attention runs as two batched matmuls
(`bmm`): that row is what fused attention (SDPA) computes, and what an unfused one materialises.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.tiny import SD2_UNET, SD2_VAE

#: The empty prompt: 2 tokens (BOS, EOS) of SD2's 1024-wide text encoder.
PROMPT_TOKENS, PROMPT_WIDTH = 2, 1024


@dataclass(frozen=True)
class Count:
    res: int
    encoder: float
    unet8: float
    unet4: float
    decoder: float
    unet_attention: float  # of unet8: the attention matmuls (bmm)

    @property
    def single_step(self) -> float:
        return self.encoder + self.unet8 + self.decoder


def build() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """SD2's UNet (8 and 4 input channels) and VAE on the meta device: shapes only, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet8 = UNet2DConditionModel(in_channels=8, out_channels=4, **SD2_UNET)
        unet4 = UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            **SD2_UNET,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=4,
        )
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **SD2_VAE)
    return unet8, unet4, vae


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count(res: int, unet8: torch.nn.Module, unet4: torch.nn.Module, vae: torch.nn.Module) -> Count:
    """FLOPs of one `res` x `res` image through each stage."""
    meta = torch.device("meta")
    h = res // 8
    prompt = torch.zeros((1, PROMPT_TOKENS, PROMPT_WIDTH), device=meta)
    t = torch.full((1,), 999, dtype=torch.long, device=meta)

    def flops(fn) -> tuple[float, dict[str, float]]:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        by_op = {str(op).split(".")[-1]: float(v) for op, v in counter.get_flop_counts()["Global"].items()}
        return float(counter.get_total_flops()), by_op

    encoder, _ = flops(lambda: vae.encode(torch.zeros((1, 3, res, res), device=meta)).latent_dist.mode())
    u8, u8_ops = flops(lambda: unet8(torch.zeros((1, 8, h, h), device=meta), t, encoder_hidden_states=prompt))
    u4, _ = flops(
        lambda: unet4(
            torch.zeros((1, 4, h, h), device=meta),
            t,
            encoder_hidden_states=prompt,
            class_labels=torch.zeros((1, 4), device=meta),
        )
    )
    decoder, _ = flops(lambda: vae.decode(torch.zeros((1, 4, h, h), device=meta)))
    return Count(res, encoder, u8, u4, decoder, u8_ops.get("bmm", 0.0))


def tflop(v: float) -> str:
    return f"{v / 1e12:.2f}"


def table(counts: list[Count]) -> str:
    """The Markdown table docs/performance.md carries (tests/test_count_flops.py compares the two)."""
    head = "| stage (TFLOP per image) | " + " | ".join(f"{c.res} px (latent {c.res // 8}x{c.res // 8})" for c in counts)
    rows = [
        head + " |",
        "|---|" + "---:|" * len(counts),
        "| VAE encoder | " + " | ".join(tflop(c.encoder) for c in counts) + " |",
        "| UNet, one call, 8 input channels (Lotus-G, E2E-FT, a Marigold step) | "
        + " | ".join(tflop(c.unet8) for c in counts)
        + " |",
        "| of which attention matmuls | " + " | ".join(tflop(c.unet_attention) for c in counts) + " |",
        "| UNet, one call, 4 input channels (Lotus-D) | " + " | ".join(tflop(c.unet4) for c in counts) + " |",
        "| VAE decoder | " + " | ".join(tflop(c.decoder) for c in counts) + " |",
        "| single-step prediction (encoder + UNet + decoder) | "
        + " | ".join(tflop(c.single_step) for c in counts)
        + " |",
        "| share: encoder / UNet / decoder | "
        + " | ".join(
            f"{c.encoder / c.single_step:.0%} / {c.unet8 / c.single_step:.0%} / {c.decoder / c.single_step:.0%}"
            for c in counts
        )
        + " |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=int, nargs="+", default=[512, 768], help="square sizes, multiples of 8")
    args = parser.parse_args(argv)
    if any(r <= 0 or r % 8 for r in args.res):
        parser.error("--res takes positive multiples of 8")
    unet8, unet4, vae = build()
    print(
        f"SD2 architecture on the meta device: UNet {params(unet8) / 1e6:.1f} M parameters (8 input channels), "
        f"VAE encoder {params(vae.encoder) / 1e6:.1f} M, decoder {params(vae.decoder) / 1e6:.1f} M; "
        "FlopCounterMode, 1 multiply-add = 2 FLOPs\n"
    )
    print(table([count(r, unet8, unet4, vae) for r in args.res]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
