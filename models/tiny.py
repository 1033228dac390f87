"""Tiny random-weight checkpoints with the real component classes and config keys.

They let tests and newcomers exercise the whole path offline. Same seed, same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from models.detect import RANDOM_WEIGHTS_KEY
from models.outputs import Family, Task

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TINY_PROCESSING_RES = 64
PIPELINE_CLASS: dict[tuple[Family, Task], str] = {
    ("lotus-g", "depth"): "DirectDiffusionY0Pipeline",
    ("lotus-g", "normals"): "DirectDiffusionY0Pipeline",
    ("lotus-d", "depth"): "DirectRegressionPipeline",
    ("lotus-d", "normals"): "DirectRegressionPipeline",
    ("e2e-ft", "depth"): "MarigoldDepthPipeline",
    ("e2e-ft", "normals"): "MarigoldNormalsPipeline",
    ("marigold", "depth"): "MarigoldDepthPipeline",
    ("marigold", "normals"): "MarigoldNormalsPipeline",
}
#: Recommended steps written into a tiny Marigold checkpoint (prs-eth/marigold-depth-v1-1 says 4; LCM says 1).
TINY_MARIGOLD_STEPS = {"ddim": 4, "lcm": 1}


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of CLIP's BPE: printable bytes map to themselves, the rest are shifted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tokenizer(out: Path) -> int:
    """A CLIP BPE tokenizer over single bytes (no merges), in the files real checkpoints ship; returns its size."""
    chars = list(_bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate([*chars, *(c + "</w>" for c in chars), BOS, EOS])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return len(vocab)


#: Stable Diffusion 2's architecture (865.9 M UNet parameters, the 128/256/512/512 VAE): random weights at the
#: real cost, for speed measurements (`load_tests/gpu_check.py`). 3.6 GB on disk.
SD2_UNET = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    norm_num_groups=32,
    use_linear_projection=True,
)
SD2_VAE = dict(
    layers_per_block=2,
    norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
)
TINY_UNET = dict(
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
    use_linear_projection=True,
)
TINY_VAE = dict(
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
)


def make_tiny(
    out: str | Path, family: Family, task: Task, seed: int = 0, arch: str = "tiny", scheduler: str = "ddim"
) -> Path:
    """Write a diffusers-format checkpoint (tiny: well under 5 MB; sd2: the real SD2 architecture) to `out`.

    `scheduler` (marigold only): "ddim" like prs-eth/marigold-*-v1-1, or "lcm" like marigold-depth-lcm-v1-0.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lotus = family.startswith("lotus")
    vocab_size = write_tokenizer(out / "tokenizer")

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32 if arch == "tiny" else 1024,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32 if arch == "tiny" else 1024,
            hidden_act="gelu",
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        **(TINY_VAE if arch == "tiny" else SD2_VAE),
        sample_size=TINY_PROCESSING_RES,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=TINY_PROCESSING_RES // 8,
        in_channels=4 if family == "lotus-d" else 8,
        out_channels=4,
        **(TINY_UNET if arch == "tiny" else SD2_UNET),
        class_embed_type="projection" if lotus else None,
        projection_class_embeddings_input_dim=4 if lotus else None,
    )
    if scheduler not in TINY_MARIGOLD_STEPS:
        raise ValueError(f"scheduler must be one of {', '.join(TINY_MARIGOLD_STEPS)}, got {scheduler!r}")
    betas = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched: DDIMScheduler | LCMScheduler
    if family == "marigold" and scheduler == "lcm":
        sched = LCMScheduler(
            **betas,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            original_inference_steps=50,
            timestep_spacing="leading",
            prediction_type="v_prediction",
        )
    else:
        # Marigold v1-1's own config: "previous sample" at the last step, not alpha 1 (E2E-FT sets it).
        sched = DDIMScheduler(
            **betas,
            clip_sample=False,
            set_alpha_to_one=family != "marigold",
            steps_offset=1,
            timestep_spacing="trailing",
            prediction_type="sample" if lotus else "v_prediction",
        )
    _condition_like_trained(vae, task)
    for name, module in (("text_encoder", text_encoder), ("vae", vae), ("unet", unet)):
        module.save_pretrained(out / name, safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    steps = TINY_MARIGOLD_STEPS[scheduler] if family == "marigold" else 1
    write_model_index(out, family, task, steps=steps, random_weights=True)
    return out


def _condition_like_trained(vae: torch.nn.Module, task: Task) -> None:
    """Give random weights a trained model's output statistics: moderate decoded amplitude, and normals
    that face the camera on average. Pure random decoders emit many near-zero vectors, whose normalisation
    amplifies float rounding a hundredfold and would make every parity check ill-conditioned."""
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.2)
        vae.decoder.conv_out.bias.zero_()
        if task == "normals":
            vae.decoder.conv_out.bias[2] = 0.9


def write_model_index(
    out: Path,
    family: Family,
    task: Task,
    processing_res: int = TINY_PROCESSING_RES,
    steps: int = 1,
    random_weights: bool = False,
) -> None:
    """The pipeline class and keys the hub checkpoints of this family carry, so detection works on ours too.

    `random_weights` (make_tiny's checkpoints) writes `RANDOM_WEIGHTS_KEY`, so whoever serves the folder, by
    any id, can say its maps are noise; a fine-tuned export rewrites the index without it."""
    import diffusers

    scheduler_file = out / "scheduler" / "scheduler_config.json"
    scheduler_class = "DDIMScheduler"
    if scheduler_file.is_file():
        scheduler_class = json.loads(scheduler_file.read_text())["_class_name"]

    index: dict[str, object] = {
        "_class_name": PIPELINE_CLASS[(family, task)],
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if family in ("e2e-ft", "marigold"):
        index |= {
            "prediction_type": task,
            "default_denoising_steps": steps,
            "default_processing_resolution": processing_res,
        }
        index |= {"use_full_z_range": True} if task == "normals" else {"scale_invariant": True, "shift_invariant": True}
    if random_weights:
        index[RANDOM_WEIGHTS_KEY] = True
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
