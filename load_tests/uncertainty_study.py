"""Does the step-change uncertainty point at the errors? A small trained Marigold on synthetic scenes.

    .venv/bin/python -m load_tests.uncertainty_study [--train-steps 600] [--scenes 96] [--held-out 16]

Trains a tiny Marigold (the tiny UNet from scratch, the demo model's fitted VAE and text encoder, Marigold
v1-1's DDIM v-prediction schedule) with Marigold's objective on procedural scenes (`models.training.synthetic`,
exact depth): depth normalised per image between its 2 % and 98 % quantiles to [-1, 1], encoded by the VAE,
noised at a uniform timestep; the UNet sees `[image latent, noisy depth latent]` and predicts v. Then, on
held-out scenes, serves it through the serving code (`MultiStepPredictor`) and compares, per image, the
correlation with the actual error (|prediction - ground truth| after a least-squares scale/shift fit on valid
pixels) of:

- `steps`: the step-change uncertainty of ONE run (k + 1 extra decodes, no extra UNet call);
- `seeds`: the multi-seed ensemble's standard deviation (K runs, K x the UNet calls);

reporting Pearson and Spearman correlations (mean over images) and each method's UNet calls. A sketch of the
comparison the DDP paper makes, at toy scale: small numbers of a small model, not a property of Marigold.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo" / "model"
RES = 64


def _normalise(depth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    lo, hi = np.quantile(depth[valid], [0.02, 0.98]) if valid.any() else (0.0, 1.0)
    return np.clip((depth - lo) / max(hi - lo, 1e-6) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


def _scenes(first: int, count: int):
    from models.training.synthetic import generate

    return [generate(first + i, RES, RES) for i in range(count)]


def build(out: Path) -> Path:
    """A Marigold folder: the demo's VAE, text encoder and tokenizer, a fresh tiny UNet, v1-1's scheduler."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from models.tiny import TINY_UNET, write_model_index

    out.mkdir(parents=True)
    for part in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(DEMO / part, out / part)
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=RES // 8, in_channels=8, out_channels=4, **TINY_UNET).save_pretrained(out / "unet")
    DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    ).save_pretrained(out / "scheduler")
    write_model_index(out, "marigold", "depth", processing_res=RES, steps=10)
    return out


def train(folder: Path, scenes, steps: int, batch: int, lr: float) -> list[float]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from models.build import empty_prompt_embedding

    vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True).train()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    prompt = empty_prompt_embedding(folder)
    scale = float(vae.config.scaling_factor)
    with torch.no_grad():
        rgb = torch.stack([torch.from_numpy(s.rgb).permute(2, 0, 1) for s in scenes]) * 2 - 1
        depth = torch.stack([torch.from_numpy(_normalise(s.depth, s.valid)) for s in scenes])[:, None].repeat(
            1, 3, 1, 1
        )
        image_latents = vae.encode(rgb).latent_dist.mode() * scale
        depth_latents = vae.encode(depth).latent_dist.mode() * scale
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(scenes), (batch,), generator=rng)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=rng)
        noise = torch.randn(depth_latents[idx].shape, generator=rng)
        noisy = scheduler.add_noise(depth_latents[idx], noise, t)
        target = scheduler.get_velocity(depth_latents[idx], noise, t)
        out = unet(torch.cat([image_latents[idx], noisy], 1), t, encoder_hidden_states=prompt.expand(batch, -1, -1))
        loss = torch.nn.functional.mse_loss(out.sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if len(losses) % 25 == 0:
            print(f"step {len(losses)}: loss {np.mean(losses[-25:]):.4f}", file=sys.stderr, flush=True)
    unet.eval().save_pretrained(folder / "unet")
    return losses


def _fit_error(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """|prediction - ground truth| after the least-squares scale and shift of the prediction onto the
    normalised ground truth, on valid pixels."""
    a = np.stack([pred[valid], np.ones(valid.sum())], 1)
    s, t = np.linalg.lstsq(a, gt[valid], rcond=None)[0]
    return np.abs(pred * s + t - gt)


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def _corr(u: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    if u.std() == 0 or e.std() == 0:
        return 0.0, 0.0
    return float(np.corrcoef(u, e)[0, 1]), float(np.corrcoef(_ranks(u), _ranks(e))[0, 1])


def evaluate(folder: Path, scenes, steps: int, seeds: int) -> dict[str, object]:
    from models.inference import BatchItem
    from models.loading import load_model
    from models.spec import ModelSpec

    model = load_model(ModelSpec(id="study", source=str(folder), processing_res=RES, device="cpu"))
    rows: dict[str, list[tuple[float, float]]] = {"steps": [], "seeds": []}
    errors = []
    for i, scene in enumerate(scenes):
        gt = _normalise(scene.depth, scene.valid)
        item = BatchItem(scene.rgb.astype(np.float32), model.plan(scene.rgb), i, True, "float32", steps)
        by_steps = model.predict_uncertainty(item, [i], method="steps")
        by_seeds = model.predict_uncertainty(item, [i + k for k in range(seeds)], method="seeds")
        pred = by_steps.prediction.array * 2 - 1
        err = _fit_error(pred, gt, scene.valid)
        errors.append(float(err[scene.valid].mean()))
        for name, result in (("steps", by_steps), ("seeds", by_seeds)):
            rows[name].append(_corr(result.uncertainty[scene.valid], err[scene.valid]))
    return {
        "mean_abs_error": float(np.mean(errors)),
        **{
            name: {
                "pearson": float(np.mean([r[0] for r in vals])),
                "spearman": float(np.mean([r[1] for r in vals])),
                "unet_calls": steps * (seeds if name == "seeds" else 1),
            }
            for name, vals in rows.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=96)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps at evaluation")
    parser.add_argument("--seeds", type=int, default=8, help="members of the multi-seed ensemble")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_scenes = _scenes(0, args.scenes)
    held_out = _scenes(10_000, args.held_out)
    print(f"scenes rendered in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp) / "marigold")
        losses = train(folder, train_scenes, args.train_steps, args.batch, args.lr)
        print(f"trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        report = evaluate(folder, held_out, args.steps, args.seeds)
    report |= {
        "train_loss_first_50": float(np.mean(losses[:50])),
        "train_loss_last_50": float(np.mean(losses[-50:])),
        "seconds": time.perf_counter() - start,
        "args": vars(args),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
