"""The fine-tune job: UNet surgery, protocol losses against the serving predictors, data order, exact resume,
learning on synthetic scenes, export + spec loading, evaluation tables, CLI, and the shipped demo model."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from models.predictors import SingleStepPredictor
from models.training import folder_format, losses, synthetic
from models.training.config import OptimConfig, TrainConfig, load_config
from models.training.datasets import SyntheticDataset
from models.training.evaluate import EvalResult
from models.training.objectives import (
    CONV_IN_BIAS_HALVED,
    TrainingCore,
    adapt_unet,
    add_task_switcher,
    alpha_bar_999,
    latent_mask,
    scalar_target,
    target_image,
    widen_conv_in,
)
from models.training.state_io import load_state
from models.training.trainer import BatchStream, finetune, lr_factor
from tests.conftest import REPO

DEMO = REPO / "models" / "demo"


def _config(out: Path, **sections: Any) -> TrainConfig:
    """A small scratch run at 32 px; `sections` replace or extend the defaults section by section."""
    raw: dict[str, Any] = {
        "run": {"output_dir": str(out), "seed": 0},
        "model": {"scratch": {"seed": 0}, "family": "lotus-d", "output_kind": "depth"},
        "data": {
            "sources": [{"type": "synthetic", "count": 10, "height": 32, "width": 32, "seed": 1}],
            "batch_size": 2,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 4, "checkpoint_every": 2, "log_every": 1},
        "export": {"model_id": "test-model", "processing_res": 32},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return TrainConfig.model_validate(raw)


def _plain_unet(in_channels: int = 4) -> Any:
    from diffusers import UNet2DConditionModel

    from models.tiny import TINY_UNET

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=4, in_channels=in_channels, out_channels=4, **TINY_UNET).eval()


def _unet_out(unet: Any, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    hidden = torch.randn(x.shape[0], 2, 32, generator=torch.Generator().manual_seed(3))
    t = torch.full((x.shape[0],), 999, dtype=torch.long)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=hidden, class_labels=labels).sample


# --- surgery, schedule, targets -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["e2e-ft", "lotus-g"])
def test_widen_conv_in_follows_each_familys_upstream_rule(family: str) -> None:
    """E2E-FT (`util/unet_prep.py`) halves weights and bias; Lotus (`train_lotus_g.py`) halves only the weights."""
    unet = _plain_unet(4)
    old = torch.nn.Conv2d(4, unet.conv_in.out_channels, 3, padding=1)
    old.load_state_dict(unet.conv_in.state_dict())
    if family == "lotus-g":
        unet = add_task_switcher(unet)
    adapted, changes = adapt_unet(unet, family)
    conv = adapted.conv_in
    assert adapted.config.in_channels == 8 and conv.in_channels == 8
    assert any(("bias kept" if family == "lotus-g" else "weights and bias halved") in c for c in changes)
    torch.testing.assert_close(conv.weight, old.weight.repeat(1, 2, 1, 1) * 0.5, rtol=0, atol=0)
    halved = CONV_IN_BIAS_HALVED[family]
    assert halved == (family == "e2e-ft")
    torch.testing.assert_close(conv.bias, old.bias * 0.5 if halved else old.bias, rtol=0, atol=0)
    x = torch.randn(2, 4, 4, 4)
    bias = old.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        # [x, x] gives the old weights' response; the bias is whatever the rule left.
        expected = old(x) - 0.5 * bias if halved else old(x)
        torch.testing.assert_close(conv(torch.cat([x, x], 1)), expected)
    assert not widen_conv_in(adapted, 8, halved)
    with pytest.raises(ValueError):
        widen_conv_in(adapted, 12, halved)


def test_task_switcher_starts_as_the_plain_unet() -> None:
    plain = _plain_unet(4)
    lotus = add_task_switcher(plain).eval()
    assert lotus.config.class_embed_type == "projection" and lotus.config.projection_class_embeddings_input_dim == 4
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([[0.84, 0.0, 0.54, 1.0], [0.0, 0.84, 1.0, 0.54]])
    torch.testing.assert_close(_unet_out(lotus, x, labels), _unet_out(plain, x))
    widened, changes = adapt_unet(_plain_unet(4), "lotus-g")
    assert widened.config.in_channels == 8 and len(changes) == 2
    with pytest.raises(ValueError, match="not a Lotus one"):
        adapt_unet(lotus, "e2e-ft")
    with pytest.raises(ValueError, match="input channels"):
        adapt_unet(widened, "lotus-d")


def test_lr_schedule() -> None:
    e2e = OptimConfig(schedule="exponential", warmup_steps=100, decay_steps=20000, final_lr_ratio=0.01)
    assert lr_factor(0, e2e) == pytest.approx(0.01) and lr_factor(99, e2e) == pytest.approx(1.0)
    assert lr_factor(100, e2e) == pytest.approx(1.0)
    assert lr_factor(20000, e2e) == pytest.approx(0.01) and lr_factor(30000, e2e) == pytest.approx(0.01)
    mid = 100 + (20000 - 100) // 2
    assert lr_factor(mid, e2e) == pytest.approx(0.1, rel=1e-3)  # geometric: halfway is sqrt(0.01)
    lotus = OptimConfig()
    assert {lr_factor(s, lotus) for s in (0, 10, 10**6)} == {1.0}


def test_targets_and_latent_mask() -> None:
    depth = torch.tensor([1.0, 2.0, 4.0, 8.0, 0.0]).view(1, 1, 1, 5).expand(1, 1, 8, 5).contiguous()
    valid = depth > 0
    disp = scalar_target(depth, valid, "disparity", 0.0, 1.0)
    assert disp[0, 0, 0, :4].tolist() == pytest.approx([1.0, -1 / 7, -5 / 7, -1.0])  # near = high
    deep = scalar_target(depth, valid, "depth", 0.0, 1.0)
    assert deep[0, 0, 0, :4].tolist() == pytest.approx([-1.0, -1 + 2 / 7, -1 + 6 / 7, 1.0])
    batch = {"depth": depth, "valid": valid}
    image = target_image(batch, "disparity", 0.0, 1.0)
    assert image.shape == (1, 3, 8, 5) and float(image[0, 0, 0, 4]) == -1.0  # invalid -> far (low disparity)
    assert float(target_image(batch, "depth", 0.0, 1.0)[0, 1, 0, 4]) == 1.0  # invalid -> far (high depth)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    mask[0, 0, 3, 12] = False
    assert latent_mask(mask)[0, 0].tolist() == [[True, False], [True, True]]


# --- protocol losses against the serving predictors -----------------------------------------------


def _core(
    tiny_dir: Any, family: str, task: str, kind: str | None = None, **kwargs: Any
) -> tuple[TrainingCore, SingleStepPredictor]:
    """A training core over the very modules of a freshly loaded serving predictor."""
    from models.loading import load_model
    from models.spec import resolve_spec

    served = load_model(resolve_spec(str(tiny_dir(family, task))), device="cpu", dtype="fp32")
    pred = served.runtime.core
    pred.unet.requires_grad_(True)  # the service freezes it
    sched = json.loads((tiny_dir(family, task) / "scheduler" / "scheduler_config.json").read_text())
    core = TrainingCore(pred.unet, pred.vae, pred.prompt_embeds, family, kind or task, alpha_bar_999(sched), **kwargs)
    return core, pred


def _batch(n: int = 2, size: int = 32) -> dict[str, torch.Tensor]:
    ds = SyntheticDataset(n, size, size, scene_seed=5)
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in ("image", "depth", "valid", "normals", "normals_valid")}


def _upstream_depth_loss_reference(decoded: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """diffusion-e2e-ft's depth loss in float64 numpy: channel mean clamped to [-1, 1]; per sample, metric depth
    clamped to its 2 / 98 % quantiles, a least-squares scale and shift; one mean over every valid pixel."""
    from models.training import metrics

    errors = []
    for b in range(decoded.shape[0]):
        pred = np.clip(decoded[b].double().mean(0).numpy(), -1.0, 1.0)
        depth, m = batch["depth"][b, 0].double().numpy(), batch["valid"][b, 0].numpy()
        lo, hi = np.quantile(depth[m].astype(np.float32), [0.02, 0.98])
        target = np.clip(depth, lo, hi)
        s, t = metrics.fit_scale_shift(pred, target, m)
        errors.append(np.abs(s * pred + t - target)[m])
    return float(np.concatenate(errors).mean())


@pytest.mark.parametrize("task", ["depth", "normals"])
def test_e2eft_loss_scores_what_the_predictor_serves(tiny_dir: Any, task: str) -> None:
    core, pred = _core(tiny_dir, "e2e-ft", task)
    batch = _batch()
    if task == "depth":
        # Samples with different valid counts, so that pooling pixels differs from averaging samples.
        batch["valid"][0, :, :12] = False
        batch["depth"] = torch.where(batch["valid"], batch["depth"], torch.zeros_like(batch["depth"]))
        # A louder decoder, so that part of the decoded map lies outside [-1, 1] and the clamp matters.
        with torch.no_grad():
            core.vae.decoder.conv_out.weight.mul_(4.0)
            core.vae.decoder.conv_out.bias.add_(0.9)
    loss, _ = core(batch)
    with torch.no_grad():
        decoded = pred.decode(pred.predict_latent(pred.encode(batch["image"])))
    if task == "depth":
        assert core.e2eft_depth_loss == "upstream"
        mean = decoded.mean(1)
        clamped = float((mean.abs() > 1).float().mean())
        assert 0.05 < clamped < 0.8, clamped  # the clamp has work to do
        assert float(loss) == pytest.approx(_upstream_depth_loss_reference(decoded, batch), rel=1e-4)
        # The documented switch keeps this project's first version: [-1, 1] targets, no clamp, per-sample means.
        core.e2eft_depth_loss = "normalized"
        target = losses.quantile_normalize(batch["depth"], batch["valid"])
        expected = losses.affine_invariant_l1(decoded.mean(1, keepdim=True), target, batch["valid"])
        torch.testing.assert_close(core(batch)[0].detach(), expected, rtol=1e-5, atol=1e-6)
        assert abs(float(expected) - float(loss)) > 1e-3
        core.e2eft_depth_loss = "upstream"
    else:
        expected = losses.normals_angular_loss(decoded, batch["normals"], batch["normals_valid"])
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in core.unet.parameters()) and core.vae.decoder.conv_out.weight.grad is None


def test_gradient_checkpointing_keeps_the_gradients(tiny_dir: Any) -> None:
    """Recomputing UNet and (frozen) VAE-decoder activations must not cut or change the gradient path."""
    core, _ = _core(tiny_dir, "e2e-ft", "depth")
    batch = _batch()
    core.train()
    core(batch)[0].backward()
    plain = [p.grad.clone() for p in core.unet.parameters()]
    core.unet.zero_grad(set_to_none=True)
    core.unet.enable_gradient_checkpointing()
    core.vae.enable_gradient_checkpointing()
    core(batch)[0].backward()
    for p, g in zip(core.unet.parameters(), plain, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["lotus-d", "lotus-g"])
def test_lotus_loss_is_x0_mse_plus_detail_preserver(tiny_dir: Any, family: str) -> None:
    from models.predictors.lotus import RECONSTRUCTION_SWITCH

    core, pred = _core(tiny_dir, family, "depth", "disparity", reconstruction_weight=0.5)
    batch = _batch()
    image_latent = pred.encode(batch["image"])
    noise = torch.randn_like(image_latent) if family == "lotus-g" else None
    loss, parts = core(batch, noise)
    with torch.no_grad():
        target_latent = pred.encode(target_image(batch, "disparity", 0.02, 0.98))
        a = math.sqrt(core.alpha_bar)
        if noise is not None:
            # At t = 999 the annotation input is the target latent noised to almost pure noise.
            noisy = a * target_latent + math.sqrt(1 - a * a) * noise
            annotation = pred.predict_latent(image_latent, noisy)
            rec_in = torch.cat([image_latent, a * image_latent + math.sqrt(1 - a * a) * noise], 1)
        else:
            annotation = pred.predict_latent(image_latent)
            rec_in = image_latent
        reconstruction = pred.unet_step(rec_in, pred.task_switch(2, RECONSTRUCTION_SWITCH))
    m = latent_mask(batch["valid"]).expand_as(annotation)
    expected_annotation = ((annotation - target_latent) ** 2)[m].mean()
    expected = expected_annotation + 0.5 * ((reconstruction - image_latent) ** 2).mean()
    torch.testing.assert_close(parts["annotation_mse"], expected_annotation, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)


# --- data order -----------------------------------------------------------------------------------


def test_batch_stream_resumes_at_any_position_and_splits_ranks() -> None:
    ds = SyntheticDataset(10, 16, 16, scene_seed=2)
    ref = BatchStream(ds, 2, seed=7, shuffle=True)
    names = [next(ref)["name"] for _ in range(12)]  # 5 per epoch: crosses two epoch boundaries
    later = BatchStream(ds, 2, seed=7, shuffle=True, position=6)
    assert [next(later)["name"] for _ in range(6)] == names[6:]
    assert sorted(n for batch in names[:5] for n in batch) == [f"{i:06d}" for i in range(10)]
    assert names[:5] != names[5:10]  # a fresh permutation each epoch
    ranks = [BatchStream(ds, 2, seed=7, shuffle=True, rank=r, world=2) for r in range(2)]
    dealt = [n for s in ranks for _ in range(2) for n in next(s)["name"]]
    assert sorted(dealt) == sorted(n for batch in names[:4] for n in batch) and len(set(dealt)) == 8


# --- the job --------------------------------------------------------------------------------------


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.heavy
def test_exact_resume_is_bit_identical(tmp_path: Path) -> None:
    """Lotus-G (seeded noise), accumulation, flips and epoch boundaries: stop at 3, resume, reach 6."""
    sections = {
        "model": {"family": "lotus-g", "output_kind": "depth"},
        "data": {"augment": {"hflip": 0.5}, "batch_size": 2},
        "optim": {"grad_accum": 2, "schedule": "exponential", "warmup_steps": 2, "decay_steps": 6},
        "train": {"steps": 6, "checkpoint_every": 2, "log_every": 1},
    }

    def recorder(log: list[tuple[int, float]]) -> Any:
        return lambda step, loss: log.append((step, loss))

    straight_log: list[tuple[int, float]] = []
    straight = finetune(_config(tmp_path / "straight", **sections), progress=False, on_step=recorder(straight_log))
    cfg = _config(tmp_path / "resumed", **sections)
    first_log: list[tuple[int, float]] = []
    first = finetune(cfg, stop_after=3, progress=False, on_step=recorder(first_log))
    assert (first.step, first.finished, first.model_dir) == (3, False, None)
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000003").is_dir()
    resumed_log: list[tuple[int, float]] = []
    resumed = finetune(cfg, progress=False, on_step=recorder(resumed_log))
    assert resumed.finished and resumed.step == 6
    # A resume, not a restart: the second run executed only steps 4..6, and each of them computed the very loss
    # the uninterrupted run computed at that step (a restart from step 0 would run 1..6 and still end on the
    # same bits, since training is deterministic).
    assert [s for s, _ in first_log] == [1, 2, 3] and [s for s, _ in resumed_log] == [4, 5, 6]
    assert first_log + resumed_log == straight_log
    a = _weights(straight.model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    b = _weights(resumed.model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(str(tmp_path / "straight" / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not all(torch.equal(a[k], start[k]) for k in a)  # it did train
    # The checkpoints hold no pickle: tensors in safetensors, the rest in JSON (tests/test_safe_weights.py).
    files = {p.name for p in (resumed.output_dir / "checkpoints" / "step-0000006").iterdir()}
    assert {p.rsplit(".", 1)[1] for p in files} == {"json", "safetensors"}, files
    opt_a = load_state(straight.output_dir / "checkpoints" / "step-0000006", "optimizer")
    opt_b = load_state(resumed.output_dir / "checkpoints" / "step-0000006", "optimizer")
    assert opt_a["param_groups"] == opt_b["param_groups"] and opt_a["state"].keys() == opt_b["state"].keys()
    for key, state in opt_a["state"].items():
        assert all(torch.equal(state[n], opt_b["state"][key][n]) for n in state)
    # keep_checkpoints (2) prunes older ones; TensorBoard has the scalars.
    assert [p.name for p in sorted((tmp_path / "resumed" / "checkpoints").iterdir())] == [
        "step-0000004",
        "step-0000006",
    ]
    assert list((tmp_path / "resumed" / "tb").glob("events.out.tfevents.*"))
    changed = _config(tmp_path / "resumed", **{**sections, "optim": {**sections["optim"], "lr": 5e-4}})
    with pytest.raises(ValueError, match="different config"):
        finetune(changed.model_copy(update={"train": changed.train.model_copy(update={"steps": 8})}), progress=False)
    with pytest.raises(FileExistsError):
        finetune(cfg, resume="never", progress=False)


def test_resume_keeps_the_step_0_baselines(tmp_path: Path) -> None:
    """Baselines are scored once, at step 0: a resumed run must keep them in its eval table, with the step rows
    up to its checkpoint, and drop the rows of the stretch after it."""
    from models.training.metrics import DepthMetrics
    from models.training.trainer import _history_until, write_history

    def row(label: str, baseline: bool = False) -> EvalResult:
        return EvalResult(
            label, "synthetic", "disparity", 4, 0 if baseline else 32, DepthMetrics(0.3, 0.5, 4), None, baseline
        )

    rows = [row("step 0"), row("baseline: constant", True), row("step 2"), row("step 4"), row("m (step 4, exported)")]
    write_history(tmp_path, rows)
    kept = _history_until(tmp_path, 2)
    assert [r.label for r in kept] == ["step 0", "baseline: constant", "step 2"]
    assert _history_until(tmp_path, 0) == []


def test_warm_start_refits_a_copy_of_the_source_vae(tiny_dir: Any, tmp_path: Path) -> None:
    """A Lotus-D disparity checkpoint starts a Lotus-G normals run: its VAE is refitted on a copy in OUTPUT/base
    (the source folder stays as it was), and the UNet gets Lotus-G's 8 input channels."""
    source = tiny_dir("lotus-d", "depth")
    before = {p: p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()}
    cfg = _config(
        tmp_path / "run",
        model={"scratch": None, "source": str(source), "family": "lotus-g", "output_kind": "normals"},
        vae_fit={"steps": 3, "lr": 1e-3, "batch_size": 2},
        train={"steps": 1, "checkpoint_every": 1},
    )
    result = finetune(cfg, progress=False)
    assert {p: p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()} == before
    base_vae = load_file(tmp_path / "run" / "base" / "vae" / "diffusion_pytorch_model.safetensors")
    source_vae = load_file(source / "vae" / "diffusion_pytorch_model.safetensors")
    assert base_vae.keys() == source_vae.keys()
    assert any(not torch.equal(base_vae[k], source_vae[k]) for k in base_vae)
    _check_export(result, "lotus-g", "normals")
    unet = load_file(result.model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet["conv_in.weight"].shape[1] == 8


def _learning_run(out: Path, family: str, kind: str, steps: int) -> Any:
    """From random weights at 32 px: a 300-step VAE fit (at 100 steps the VAE alone cannot reconstruct the targets
    better than the baselines: a normals round trip scores 45 degrees), then `steps` UNet steps."""
    cfg = _config(
        out,
        model={"family": family, "output_kind": kind},
        vae_fit={"steps": 300, "lr": 3e-3, "batch_size": 8},
        data={"sources": [{"type": "synthetic", "count": 256, "height": 32, "width": 32, "seed": 1}], "batch_size": 8},
        optim={"lr": 1e-3, "warmup_steps": 10},
        train={"steps": steps, "checkpoint_every": steps, "log_every": 50},
        validation={"synthetic": {"count": 24, "height": 32, "width": 32, "seed": 99}},
    )
    return finetune(cfg, progress=False)


def _rows(result: Any) -> tuple[EvalResult, EvalResult, list[EvalResult]]:
    """(step 0, exported, baselines) of a run's validation history."""
    rows = result.evaluations
    assert rows[0].label == "step 0" and rows[-1].label.endswith("exported)")
    baselines = [r for r in rows if r.baseline]
    assert [r.label for r in baselines] == [
        "baseline: mean map (training set)",
        "baseline: vertical ramp",
        "baseline: constant",
    ]
    return rows[0], rows[-1], baselines


def _check_export(result: Any, family: str, kind: str) -> None:
    from models.loading import load_model
    from models.spec import resolve_spec
    from models.tiny import PIPELINE_CLASS

    index = json.loads((result.model_dir / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASS[(family, "normals" if kind == "normals" else "depth")]
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (result.model_dir / component).is_dir()
    model = load_model(resolve_spec(str(result.spec_path)))
    assert (model.family, model.output_kind, model.processing_res) == (family, kind, 32)
    image = synthetic.generate((99, 0), 40, 48).rgb
    (pred,) = model.predict([image])
    assert pred.array.shape[:2] == (40, 48) and np.isfinite(pred.array).all()


@pytest.mark.heavy
def test_e2eft_learns_depth_on_synthetic_scenes(tmp_path: Path) -> None:
    """Upstream's E2E-FT depth loss, end to end. (Lotus at 32 px cannot beat the training set's mean map by a
    clear margin: its 4 x 4 latent target is too coarse; the 64 px demo model covers Lotus-D.)"""
    result = _learning_run(tmp_path / "run", "e2e-ft", "depth", steps=300)
    first, last, baselines = _rows(result)
    before, after = first.depth, last.depth
    assert before is not None and after is not None
    # Measured: AbsRel 61.2 % -> 36.9 %, delta1 31.0 % -> 54.3 %. Baselines on the same scenes: the training
    # set's mean depth map 45.4 % / 48.5 %, a vertical ramp 45.9 % / 47.9 %, a constant 67.4 % / 26.9 %. The
    # curve (the same run with validation.every=100) is flat after 300 steps: 700 scored 38.1 % / 52.6 %.
    assert after.abs_rel < before.abs_rel - 0.15 and after.delta1 > before.delta1 + 0.15
    best = [b.depth for b in baselines if b.depth is not None]
    assert after.abs_rel < min(b.abs_rel for b in best) - 0.03
    assert after.delta1 > max(b.delta1 for b in best) + 0.01
    _check_export(result, "e2e-ft", "depth")
    assert "| step 0 |" in (result.output_dir / "eval.md").read_text()


@pytest.mark.heavy
def test_e2eft_learns_normals_on_synthetic_scenes(tmp_path: Path) -> None:
    result = _learning_run(tmp_path / "run", "e2e-ft", "normals", steps=250)
    first, last, baselines = _rows(result)
    before, after = first.normals, last.normals
    assert before is not None and after is not None
    # Measured: mean angle 52.2 -> 37.7 degrees, median 51.7 -> 29.5, under 11.25 degrees 4.7 % -> 24.0 %. The
    # image-independent baselines on the same scenes: the training set's mean normal map 38.8 / 36.9 / 13.5 %,
    # a vertical ramp 45.3 / 43.6 / 7.5 %, facing the camera 54.5 / 61.2 / 6.8 %. With validation.every=50: the
    # mean angle is lowest at 200-250 steps (37.7) and drifts back up to 38.8 at 400, above the mean map's margin.
    assert after.mean < before.mean - 5.0 and after.within_30 > before.within_30 + 10.0
    best = {k: [getattr(b.normals, k) for b in baselines if b.normals is not None] for k in ("mean", "median")}
    assert after.mean < min(best["mean"]) - 0.5
    assert after.median < min(best["median"]) - 3.0
    assert after.within_11_25 > max(b.normals.within_11_25 for b in baselines if b.normals is not None) + 5.0
    _check_export(result, "e2e-ft", "normals")


# --- evaluation and CLI ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from models.training.cli import add_eval_parser, add_finetune_parser

    parser = argparse.ArgumentParser(prog="dense-serve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_finetune_parser(sub)
    add_eval_parser(sub)
    return parser


def _run_cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


def test_eval_cli_tables_match_the_protocol(tiny_dir: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.loading import load_model
    from models.spec import resolve_spec
    from models.training import metrics
    from models.training.evaluate import load_results

    data = tmp_path / "scenes"
    synthetic.write_scenes(data, 5, 24, 40, seed=4)
    model_dir = tiny_dir("lotus-d", "depth")
    md, js = tmp_path / "out" / "results.md", tmp_path / "out" / "results.json"
    argv = ["eval", "--model", str(model_dir), "--data", str(data), "--processing-res", "32"]
    assert _run_cli([*argv, "--out", str(md), "--out", str(js), "--limit", "4"]) == 0
    printed = capsys.readouterr().out
    rows = load_results(js)
    (row,) = [r for r in rows if not r.baseline]
    baselines = [r for r in rows if r.baseline]
    assert [r.label for r in baselines] == [
        "baseline: mean map (leave-one-out)",
        "baseline: vertical ramp",
        "baseline: constant",
    ]
    assert all(r.images == 4 and r.depth is not None for r in baselines) and "| baseline: constant |" in printed
    assert row.images == 4 and row.processing_res == 32 and row.output_kind == "depth" and row.dataset == "synthetic"
    assert md.read_text() == printed and f"| {row.depth.abs_rel * 100:.2f} |" in printed
    # The same numbers by hand: the served predictor, then the metrics module image by image.
    model = load_model(resolve_spec(str(model_dir)))
    scores = []
    for name in folder_format.list_names(data)[:4]:
        s = folder_format.read_sample(data, name)
        (pred,) = model.predict([s.rgb], processing_res=32)
        scores.append(metrics.evaluate_depth(pred.array, s.depth, s.valid, "depth", synthetic.DEPTH_RANGE).abs_rel)
    assert row.depth.abs_rel == pytest.approx(float(np.mean(scores)), rel=1e-4)
    # The baselines go through the same protocol: a ramp from far (top) to near (bottom), and a constant.
    ramp_scores, const_scores = [], []
    for name in folder_format.list_names(data)[:4]:
        s = folder_format.read_sample(data, name)
        h, w = s.depth.shape
        ramp = np.broadcast_to(1.0 - (np.arange(h)[:, None] + 0.5) / h, (h, w))
        ramp_scores.append(metrics.evaluate_depth(ramp, s.depth, s.valid, "depth", synthetic.DEPTH_RANGE).abs_rel)
        flat = np.full((h, w), 0.3)
        const_scores.append(metrics.evaluate_depth(flat, s.depth, s.valid, "depth", synthetic.DEPTH_RANGE).abs_rel)
    assert baselines[1].depth.abs_rel == pytest.approx(float(np.mean(ramp_scores)), rel=1e-6)
    assert baselines[2].depth.abs_rel == pytest.approx(float(np.mean(const_scores)), rel=1e-6)
    # --train-data gives the training set's mean map; --no-baselines only the model.
    train = tmp_path / "train"
    synthetic.write_scenes(train, 6, 24, 40, seed=5)
    assert _run_cli([*argv, "--limit", "2", "--train-data", str(train)]) == 0
    assert "| baseline: mean map (training set) |" in capsys.readouterr().out
    assert _run_cli([*argv, "--limit", "2", "--no-baselines"]) == 0
    assert "baseline" not in capsys.readouterr().out
    # Normals models are scored by angle; a folder without a dataset.json is refused.
    normals = ["eval", "--model", str(tiny_dir("lotus-d", "normals")), "--data", str(data), "--processing-res", "32"]
    assert _run_cli(normals) == 0
    assert "mean (°)" in capsys.readouterr().out
    assert _run_cli(["eval", "--model", str(model_dir), "--data", str(tmp_path)]) == 2


def test_finetune_cli_runs_stops_and_refuses_bad_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path / "run", train={"steps": 3, "checkpoint_every": 5})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert _run_cli(["finetune", str(path), "--stop-after", "2", "--no-progress"]) == 0
    assert "stopped at step 2 of 3" in capsys.readouterr().out
    assert _run_cli(["finetune", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "exported" in out and (tmp_path / "run" / "test-model.toml").is_file()
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("batch_size: 2", "batch_size: 2\n  batchsize: 3"))
    assert _run_cli(["finetune", str(bad)]) == 2
    assert "batchsize" in capsys.readouterr().err


def test_config_rules_and_shipped_configs() -> None:
    from models.probes.job import load_config as load_probe_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        (load_probe_config if path.name.startswith("probe-") else load_config)(path)
    e2e = load_config(REPO / "configs" / "e2eft-depth-hypersim-vkitti.yaml")
    assert (e2e.optim.lr, e2e.optim.warmup_steps, e2e.optim.decay_steps, e2e.optim.final_lr_ratio) == (
        3e-5,
        100,
        20000,
        0.01,
    )
    assert e2e.data.batch_size * e2e.optim.grad_accum == 32 and e2e.optim.max_grad_norm == 1.0
    assert e2e.optim.weight_decay == 1e-2 and e2e.objective.e2eft_depth_loss == "upstream"
    assert [s.ratio for s in e2e.data.sources] == [9.0, 1.0]
    for name in ("lotus-d-normals-synthetic-demo", "lotus-g-depth-synthetic-demo"):
        demo = load_config(REPO / "configs" / f"{name}.yaml")
        assert demo.export.model_id == name and demo.export.processing_res >= 128
        assert demo.model.source == "models/demo/model" and demo.vae_fit.steps > 0  # warm start, VAE refitted
        assert all(s.type == "synthetic" and s.variety == "varied" and s.height >= 128 for s in demo.data.sources)
        assert demo.validation.synthetic is not None and demo.validation.synthetic.variety == "varied"
        assert demo.train.threads == 1
    with pytest.raises(ValueError, match="exactly one"):
        _config(Path("x"), model={"source": "a/b"})
    with pytest.raises(ValueError, match="disparity"):
        _config(Path("x"), model={"family": "e2e-ft", "output_kind": "disparity"})


# --- the shipped demo -----------------------------------------------------------------------------


def test_demo_model_serves_meaningful_depth(tmp_path: Path) -> None:
    from models.loading import load_model
    from models.spec import resolve_spec
    from models.training.baselines import best, evaluate_baselines
    from models.training.evaluate import evaluate_dataset, load_results

    spec = next(DEMO.glob("*.toml"))
    size = sum(p.stat().st_size for p in (DEMO / "model").rglob("*.safetensors"))
    assert size < 8 * 2**20
    assert load_config(DEMO / "config.yaml") == load_config(REPO / "configs" / "lotus-d-depth-synthetic-demo.yaml")
    model = load_model(resolve_spec(str(spec)))
    data = tmp_path / "held-out"
    synthetic.write_scenes(data, 16, 48, 64, seed=777)
    result = evaluate_dataset(model, data)
    strongest = best(evaluate_baselines(data, model.output_kind))
    # Measured: 0.267; on these scenes a vertical ramp scores 0.326, the leave-one-out mean map 0.336 and a
    # constant 0.386. The model must beat the strongest image-independent baseline by 10 % (relative).
    assert result.depth is not None and result.depth.abs_rel < 0.30, result
    assert strongest.depth is not None and result.depth.abs_rel < 0.9 * strongest.depth.abs_rel, strongest
    # The shipped table (models/demo/eval.md: 64 held-out scenes, the training set's mean map) says the same,
    # with a margin of 5 AbsRel points and 8 delta1 points.
    rows = load_results(DEMO / "eval.json")
    exported = rows[-1]
    assert exported.label.endswith("exported)") and exported.depth is not None
    baselines = [r.depth for r in rows if r.baseline and r.depth is not None]
    assert len(baselines) == 3
    assert exported.depth.abs_rel < min(b.abs_rel for b in baselines) - 0.05
    assert exported.depth.delta1 > max(b.delta1 for b in baselines) + 0.08
