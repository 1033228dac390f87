"""The offline fine-tune job: data -> protocol loss -> AdamW, with exact resume, logs and a servable export.

Runs as one process (CPU or one GPU) or as several under `accelerate launch` (DDP; every process gets its own
share of each epoch). Exact resume: everything random is either restored from the checkpoint (global RNG
states) or derived from (seed, step, position) without state (data order, augmentation, Lotus-G noise), and
the data position is the number of micro-batches consumed. So on the CPU a run resumed from step k reaches
step n with the same bits as one that never stopped (on GPUs, as far as the kernels are deterministic).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from models.build import empty_prompt_embedding
from models.training import checkpointing as ckpt
from models.training import folder_format
from models.training.baselines import baseline_rows
from models.training.config import OptimConfig, TrainConfig, dump_config
from models.training.datasets import Sample, build_dataset, write_synthetic
from models.training.evaluate import EvalResult, evaluate_dataset, load_results, to_json, to_markdown
from models.training.objectives import TrainingCore, adapt_unet, alpha_bar_999, target_image, vae_fit_loss

log = logging.getLogger(__name__)

Resume = Literal["auto", "never"] | Path
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
_ORDER_STREAM = 0x0DA7A  # keeps the epoch permutation's seed apart from the datasets' own (seed, epoch, index)


@dataclass(frozen=True)
class FinetuneResult:
    output_dir: Path
    step: int
    finished: bool
    model_dir: Path | None
    spec_path: Path | None
    evaluations: list[EvalResult]


# --- data -----------------------------------------------------------------------------------------


def _collate(items: list[Sample]) -> dict[str, Any]:
    try:
        return default_collate(items)
    except RuntimeError as exc:
        shapes = sorted({tuple(i["image"].shape) for i in items})
        raise ValueError(f"samples of one batch differ in size {shapes}: set data.augment resize/crop") from exc


class BatchStream:
    """This process's micro-batches in a fixed order, addressable by position (micro-batches consumed).

    Epoch e is a permutation drawn from (seed, e); its first `per_epoch * batch * world` items are dealt to
    the processes round-robin. Position p is micro-batch p % per_epoch of epoch p // per_epoch, so resuming
    at a position skips to it without loading what came before.
    """

    def __init__(
        self,
        dataset: Dataset[Sample],
        batch_size: int,
        seed: int,
        shuffle: bool,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        position: int = 0,
    ) -> None:
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.size = len(dataset)  # type: ignore[arg-type]
        self.per_epoch = self.size // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"{self.size} samples do not fill one batch of {batch_size} on {world} process(es)")
        self.position = position
        self._epoch = -1
        self._it: Iterator[dict[str, Any]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        n = self.per_epoch * self.batch_size * self.world
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, _ORDER_STREAM]).permutation(self.size)
        else:
            order = np.arange(self.size)
        items = order[:n][self.rank :: self.world]
        return [items[i * self.batch_size : (i + 1) * self.batch_size].tolist() for i in range(self.per_epoch)]

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        epoch, offset = divmod(self.position, self.per_epoch)
        if self._it is None or epoch != self._epoch:
            set_epoch = getattr(self.dataset, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(epoch)
            loader = DataLoader(
                self.dataset,
                batch_sampler=self.epoch_batches(epoch)[offset:],
                num_workers=self.num_workers,
                collate_fn=_collate,
            )
            self._it, self._epoch = iter(loader), epoch
        batch = next(self._it)
        self.position += 1
        if self.position % self.per_epoch == 0:
            self._it = None  # the next call opens the next epoch
        return batch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def stream_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, micro-batch, rank, ...): no state to save, same on every device."""
    state = np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state))


# --- schedule and precision -----------------------------------------------------------------------


def lr_factor(step: int, optim: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then constant or exponential
    decay that reaches `final_lr_ratio` at `decay_steps` and stays there."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(optim.decay_steps - optim.warmup_steps, 1)
    progress = min(step - optim.warmup_steps, span) / span
    return optim.final_lr_ratio**progress


def resolve_precision(requested: str, device: str) -> str:
    """auto -> bf16 on GPUs that support it, fp16 on other GPUs, no (fp32) on the CPU."""
    if requested != "auto":
        return requested
    if device == "cpu" or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# --- starting checkpoint --------------------------------------------------------------------------


def prepare_base(cfg: TrainConfig, accelerator: Any, progress: bool) -> Path:
    """The starting diffusers folder: a local/hub checkpoint as is; a scratch one made, or a source copied when its
    VAE is to be refitted, (and its VAE fitted) once in OUTPUT/base by the main process."""
    source: Path | None = None
    if cfg.model.source is not None:
        from models.source import resolve_source
        from models.spec import ModelSpec

        source = resolve_source(ModelSpec(id="base", source=cfg.model.source, revision=cfg.model.revision))
        if not cfg.vae_fit.steps:
            return source
    base = cfg.run.output_dir / "base"
    if accelerator.is_main_process and not (base / "model_index.json").is_file():
        from models.tiny import make_tiny

        staged = cfg.run.output_dir / ".tmp-base"
        if staged.exists():
            shutil.rmtree(staged)
        if source is not None:
            shutil.copytree(source, staged)
        else:
            scratch = cfg.model.scratch
            assert scratch is not None
            make_tiny(staged, cfg.model.family, cfg.model.task, seed=scratch.seed, arch=scratch.arch)
        if cfg.vae_fit.steps:
            fit_vae(staged, cfg, accelerator.device, progress)
        staged.rename(base)
    accelerator.wait_for_everyone()
    return base


def fit_vae(path: Path, cfg: TrainConfig, device: torch.device, progress: bool) -> None:
    """Teach a scratch VAE to reconstruct the training images and target maps; rescale its latent to unit std
    (as Stable Diffusion's scaling factor does), and save it in place."""
    from diffusers import AutoencoderKL

    fit = cfg.vae_fit
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=fit.lr)
    dataset = build_dataset(cfg.data, cfg.run.seed)
    stream = BatchStream(dataset, fit.batch_size, cfg.run.seed + 1, cfg.data.shuffle, num_workers=cfg.data.num_workers)
    lo, hi = cfg.objective.quantile_low, cfg.objective.quantile_high
    bar = tqdm(total=fit.steps, desc="vae fit", unit="step", disable=not progress, dynamic_ncols=True)
    for step in range(fit.steps):
        batch = to_device(next(stream), device)
        x = torch.cat([batch["image"], target_image(batch, cfg.model.output_kind, lo, hi)])
        loss, parts = vae_fit_loss(vae, x, fit.kl_weight, stream_generator(cfg.run.seed, step, 0xAE))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update()
        bar.set_postfix(l1=f"{float(parts['vae_l1']):.4f}", refresh=False)
    bar.close()
    vae.eval()
    with torch.no_grad():
        latents = []
        for _ in range(min(8, stream.per_epoch)):
            batch = to_device(next(stream), device)
            x = torch.cat([batch["image"], target_image(batch, cfg.model.output_kind, lo, hi)])
            latents.append(vae.encode(x).latent_dist.mode())
        std = float(torch.cat(latents).std())
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
    vae.save_pretrained(path / "vae", safe_serialization=True)
    log.info("vae fit: %d steps, latent std %.4f -> scaling factor %.5f", fit.steps, std, 1.0 / max(std, 1e-6))


def load_core(base: Path, cfg: TrainConfig) -> tuple[TrainingCore, list[str]]:
    """The UNet (adapted to the family) and frozen VAE from `base`, in fp32, with the empty-prompt embedding."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32, use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32, use_safetensors=True)
    unet, changes = adapt_unet(unet, cfg.model.family)
    for module in (unet, vae):
        module.set_attn_processor(AttnProcessor2_0())
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    scheduler_cfg = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    core = TrainingCore(
        unet,
        vae,
        empty_prompt_embedding(base),
        cfg.model.family,
        cfg.model.output_kind,
        alpha_bar=alpha_bar_999(scheduler_cfg),
        reconstruction_weight=cfg.objective.reconstruction_weight,
        quantiles=(cfg.objective.quantile_low, cfg.objective.quantile_high),
        e2eft_depth_loss=cfg.objective.e2eft_depth_loss,
    )
    return core, changes


# --- validation -----------------------------------------------------------------------------------


def validation_sets(cfg: TrainConfig, is_main: bool) -> list[Path]:
    """Folder datasets to validate on; held-out synthetic scenes are written once to OUTPUT/validation-synthetic."""
    sets = list(cfg.validation.data)
    syn = cfg.validation.synthetic
    if syn is not None:
        root = cfg.run.output_dir / "validation-synthetic"
        if is_main and not (root / folder_format.INFO_FILE).is_file():
            write_synthetic(root, syn)
        sets.append(root)
    return sets


def validate_core(
    core: TrainingCore, sets: Sequence[Path], model_id: str, res: int, limit: int | None, label: str
) -> list[EvalResult]:
    """Score the in-training weights through the serving predictor (the same modules, no copy)."""
    from models.inference import DensePredictor
    from models.runtime import TorchRuntime

    was_training = core.training
    try:
        model = DensePredictor(TorchRuntime(core.predictor()), model_id, core.family, res)
        return [evaluate_dataset(model, root, processing_res=res, limit=limit, label=label) for root in sets]
    finally:
        core.train(was_training)


def validate_export(
    spec_path: Path, sets: Sequence[Path], res: int, limit: int | None, label: str, device: str
) -> list[EvalResult]:
    """Score the exported checkpoint exactly as `dense-serve serve --model SPEC` loads it."""
    from models.loading import load_model
    from models.spec import resolve_spec

    model = load_model(resolve_spec(str(spec_path)), device=device)
    return [evaluate_dataset(model, root, processing_res=res, limit=limit, label=label) for root in sets]


def _history_until(output_dir: Path, step: int) -> list[EvalResult]:
    """A resumed run keeps the evaluations up to its checkpoint (later ones belong to the lost stretch) and the
    baseline rows scored at step 0 (a resume does not score them again)."""
    path = output_dir / EVAL_JSON
    if step == 0 or not path.is_file():
        return []
    kept = []
    for row in load_results(path):
        m = re.fullmatch(r"step (\d+)", row.label)
        if row.baseline or (m is not None and int(m.group(1)) <= step):
            kept.append(row)
    return kept


def write_history(output_dir: Path, results: Sequence[EvalResult]) -> None:
    (output_dir / EVAL_JSON).write_text(to_json(results))
    (output_dir / EVAL_MD).write_text(to_markdown(results))


# --- the loop -------------------------------------------------------------------------------------


def _make_accelerator(cfg: TrainConfig) -> Any:
    try:
        from accelerate import Accelerator
    except ImportError as exc:
        raise RuntimeError("the fine-tune job needs the package accelerate (pip install 'accelerate>=1.0')") from exc
    device = cfg.train.device
    precision = resolve_precision(cfg.train.mixed_precision, device)
    # On a machine without a GPU "auto" must say cpu explicitly: accelerate only forms a multi-process CPU
    # group (gloo) under torchrun / accelerate launch when told it runs on the CPU.
    cpu = device == "cpu" or not torch.cuda.is_available()
    return Accelerator(mixed_precision=precision, cpu=cpu)


def _summary_writer(path: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install 'tensorboard>=2.16')")
        return None
    return SummaryWriter(log_dir=str(path), purge_step=purge_step)


def _find_resume(cfg: TrainConfig, resume: Resume) -> Path | None:
    existing = ckpt.latest_checkpoint(cfg.run.output_dir)
    if isinstance(resume, Path):
        if not (resume / ckpt.STATE_FILE).is_file():
            raise FileNotFoundError(f"{resume} is not a complete training checkpoint")
        return resume
    if resume == "never":
        if existing is not None:
            raise FileExistsError(
                f"{cfg.run.output_dir} already has checkpoints (latest {existing.name}); resume, or pick another "
                "output_dir"
            )
        return None
    return existing


def finetune(
    cfg: TrainConfig,
    *,
    resume: Resume = "auto",
    stop_after: int | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Run (or continue) the job in `cfg`; stop at `cfg.train.steps`, or earlier at `stop_after` total steps
    with a checkpoint written there. The finished job exports the model and its spec and evaluates it."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = cfg.run.output_dir
    out.mkdir(parents=True, exist_ok=True)
    acc = _make_accelerator(cfg)
    main, rank, world = acc.is_main_process, acc.process_index, acc.num_processes
    resume_from = _find_resume(cfg, resume)
    fingerprint = cfg.fingerprint()
    if resume_from is not None:
        previous = ckpt.read_state(resume_from)
        if previous.fingerprint != fingerprint:
            raise ValueError(f"{resume_from} was written by a different config (model, data, optimiser or objective)")
        if previous.world_size != world:
            raise ValueError(f"{resume_from} ran on {previous.world_size} process(es); exact resume needs the same")
    if main:
        (out / "config.yaml").write_text(dump_config(cfg))

    torch.manual_seed(cfg.run.seed + rank)
    np.random.seed((cfg.run.seed + rank) % 2**32)
    base = prepare_base(cfg, acc, progress and main)
    core, changes = load_core(base, cfg)
    for change in changes:
        log.info("starting UNet: %s", change)
    core.to(acc.device).train()
    params = [p for p in core.unet.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, o))
    model, optimizer = acc.prepare(core, optimizer)
    inner: TrainingCore = acc.unwrap_model(model)

    step, position = 0, 0
    if resume_from is not None:
        state = ckpt.load_training_state(resume_from, rank, inner.unet, optimizer, scheduler, acc.scaler)
        step, position = state.step, state.micro_index
        log.info("resumed from %s at step %d", resume_from, step)

    dataset = build_dataset(cfg.data, cfg.run.seed)
    stream = BatchStream(
        dataset, cfg.data.batch_size, cfg.run.seed, cfg.data.shuffle, rank, world, cfg.data.num_workers, position
    )
    val_sets = validation_sets(cfg, main)
    val_res = cfg.validation.processing_res if cfg.validation.processing_res is not None else cfg.export.processing_res
    history = _history_until(out, step)
    writer = _summary_writer(out / "tb", step if step else None) if main else None

    def validate(at: int) -> None:
        if main and val_sets:
            rows = validate_core(inner, val_sets, cfg.export.model_id, val_res, cfg.validation.limit, f"step {at}")
            if at == 0 and cfg.validation.baselines:
                rows.extend(baseline_rows(cfg, val_sets, dataset))
            history.extend(rows)
            write_history(out, history)
            if writer is not None:
                _log_eval(writer, rows, at)
        acc.wait_for_everyone()

    if step == 0:
        validate(0)
    target = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    bar = tqdm(total=cfg.train.steps, initial=step, desc="finetune", unit="step", disable=not (progress and main))
    samples_per_step = cfg.data.batch_size * o.grad_accum * world
    accum = o.grad_accum
    while step < target:
        started = time.perf_counter()
        sums: dict[str, float] = {}
        for micro in range(accum):
            batch = to_device(next(stream), acc.device)
            _check_size(batch["image"])
            noise = None
            if inner.generative:
                b, _, h, w = batch["image"].shape
                gen = stream_generator(cfg.run.seed, step, micro, rank)
                noise = torch.randn((b, 4, h // 8, w // 8), generator=gen).to(acc.device)
            sync = micro == accum - 1
            with acc.autocast(), nullcontext() if sync else acc.no_sync(model):
                loss, parts = model(batch, noise)
                acc.backward(loss / accum)
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        grad_norm = acc.clip_grad_norm_(params, o.max_grad_norm) if o.max_grad_norm is not None else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        rate = samples_per_step / max(time.perf_counter() - started, 1e-9)
        if not math.isfinite(sums["loss"]):
            raise FloatingPointError(f"loss is {sums['loss']} at step {step}")
        bar.update()
        bar.set_postfix(loss=f"{sums['loss']:.4f}", samples_s=f"{rate:.1f}", refresh=False)
        if on_step is not None:
            on_step(step, sums["loss"])
        if step % cfg.train.log_every == 0:
            reduced = {k: float(acc.reduce(torch.tensor(v, device=acc.device), "mean")) for k, v in sums.items()}
            if writer is not None:
                for k, v in reduced.items():
                    writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                writer.add_scalar("train/samples_per_s", rate, step)
                if grad_norm is not None:
                    writer.add_scalar("train/grad_norm", float(grad_norm), step)
        if step % cfg.train.checkpoint_every == 0 or step == target:
            _save(acc, cfg, step, stream.position, fingerprint, inner, optimizer, scheduler)
        if cfg.validation.every and step % cfg.validation.every == 0 and step < cfg.train.steps:
            validate(step)
    bar.close()

    finished = step >= cfg.train.steps
    model_dir = spec_path = None
    if finished:
        if main:
            model_dir, spec_path = ckpt.export_model(
                base,
                inner.unet,
                inner.vae,
                out,
                cfg.export.model_id,
                cfg.model.family,
                cfg.model.output_kind,
                cfg.export.processing_res,
            )
            if val_sets:
                device = "cpu" if acc.device.type == "cpu" else str(acc.device)
                label = f"{cfg.export.model_id} (step {step}, exported)"
                rows = validate_export(spec_path, val_sets, val_res, cfg.validation.limit, label, device)
                history.extend(rows)
                write_history(out, history)
                if writer is not None:
                    _log_eval(writer, rows, step)
        acc.wait_for_everyone()
    if writer is not None:
        writer.close()
    acc.end_training()
    return FinetuneResult(out, step, finished, model_dir, spec_path, history)


def _check_size(images: torch.Tensor) -> None:
    h, w = images.shape[-2:]
    if h % 16 or w % 16:
        raise ValueError(f"training images must be multiples of 16 pixels (VAE and UNet strides), got {h} x {w}")


def _save(
    acc: Any,
    cfg: TrainConfig,
    step: int,
    position: int,
    fingerprint: str,
    core: TrainingCore,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    out = cfg.run.output_dir
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.staging_dir(out, step)
    acc.wait_for_everyone()
    folder = ckpt.staging_dir(out, step)
    ckpt.save_rng(folder, acc.process_index)
    if acc.is_main_process:
        world = acc.num_processes
        state = ckpt.TrainerState(step=step, micro_index=position, fingerprint=fingerprint, world_size=world)
        ckpt.save_training_state(folder, state, core.unet, optimizer, scheduler, acc.scaler)
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.commit_checkpoint(out, step, cfg.train.keep_checkpoints)
    acc.wait_for_everyone()


def _log_eval(writer: Any, rows: Sequence[EvalResult], step: int) -> None:
    for r in rows:
        if r.depth is not None:
            writer.add_scalar(f"val/{r.dataset}/abs_rel", r.depth.abs_rel, step)
            writer.add_scalar(f"val/{r.dataset}/delta1", r.depth.delta1, step)
        if r.normals is not None:
            writer.add_scalar(f"val/{r.dataset}/mean_angle", r.normals.mean, step)
            writer.add_scalar(f"val/{r.dataset}/median_angle", r.normals.median, step)
