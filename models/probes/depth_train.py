"""`dense-serve probe train` for `task: depth`: DAG's label-efficient depth probe on frozen UNet features.

Targets: each image's ground-truth depth mapped to [0, 1] between its own 2 % and 98 % quantiles (clipped) --
`models.training.baselines.normalized_target`, the fine-tune's target normalisation. Why this one: the answer
then lives in the [0, 1] range every served depth map has (the 16-bit PNG, the colour map and the other encoders
take it as they are), the quantiles ignore a few outlying pixels, and the training-set mean-map baseline uses
the very same normalisation, so the comparison is fair. Since only relative depth is learnt, the evaluation
aligns every prediction to metric ground truth by least squares per image (models/training/metrics.py).

Features are extracted once per image at every configured timestep; every sampled labelled cell enters the
training set once per timestep (with its t), and shuffled mini-batches then mix timesteps at random: the one
MLP learns them all through its time embedding. L1 loss, Adam. The weak head is trained on the same rows.
The held-out evaluation runs the serving path (`DepthProbe`) for both heads, beside the image-independent
baselines of `dense-serve eval` (models/training/baselines.py) and the base model's own depth answer.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.inference import BatchItem, DensePredictor, _to_tensor
from models.outputs import OutputKind
from models.probes import data as probe_data
from models.probes.artifact import EVAL
from models.probes.depth import DepthHeads, DepthMLP, check_taps, extract_depth_features, tap_channels
from models.probes.depth_probe import DepthProbe, save_depth_probe
from models.probes.features import TapConfig, unet_input_noise
from models.probes.job import (
    BATCH,
    FolderSource,
    ProbeBase,
    ProbeConfig,
    SyntheticSource,
    TrainSettings,
    same_size_chunks,
)
from models.probes.segmenter import torch_core
from models.training.baselines import BASELINES, constant, mean_map_from, normalized_target, ramp
from models.training.metrics import DepthEvaluator

log = logging.getLogger(__name__)

DepthSet = tuple[tuple[float, float], list[probe_data.DepthImage]]


def read_depth_source(source: SyntheticSource | FolderSource) -> DepthSet:
    if isinstance(source, SyntheticSource):
        return probe_data.synthetic_depth(source.count, source.height, source.width, source.seed)
    return probe_data.read_depth_folder(source.path, source.limit)


def grid_targets(
    img: probe_data.DepthImage, space: OutputKind, processing_hw: tuple[int, int], padded_hw: tuple[int, int], s: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised target and its validity at each feature-grid cell's centre (nearest at the processing size)."""
    target = torch.from_numpy(normalized_target(space, img.depth, img.valid).astype(np.float32))
    both = torch.stack([target, torch.from_numpy(img.valid.astype(np.float32))])[None]
    both = F.interpolate(both, processing_hw, mode="nearest")[0]
    full = torch.zeros((2, *padded_hw))
    full[:, : processing_hw[0], : processing_hw[1]] = both
    grid = full[:, s // 2 :: s, s // 2 :: s]
    return grid[0], grid[1] > 0.5


@torch.inference_mode()
def pixel_rows(
    base: DensePredictor,
    taps: TapConfig,
    images: list[probe_data.DepthImage],
    processing_res: int,
    per_image: int | None,
    space: OutputKind = "depth",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[N, D]` features of one timestep each, `[N]` their timesteps, `[N]` normalised depth targets."""
    gen = torch.Generator().manual_seed(seed)
    core = torch_core(base)
    xs, ts, ys = [], [], []
    steps = taps.timesteps
    for chunk in same_size_chunks(images, BATCH):
        items = [BatchItem(img.rgb, base.plan(img.rgb, processing_res)) for img in chunk]
        g = items[0].geometry
        x = torch.stack([_to_tensor(it, core.device) for it in items]).to(core.dtype)
        latent = core.encode(x)
        f = extract_depth_features(core, latent, taps, unet_input_noise(core, latent, taps.noise_seed))
        step_dim = f.shape[1] // len(steps)
        for k, img in enumerate(chunk):
            target, valid = grid_targets(img, space, g.processing_hw, g.padded_hw, taps.stride)
            target, valid = target[: f.shape[-2], : f.shape[-1]], valid[: f.shape[-2], : f.shape[-1]]
            cells = valid.flatten().nonzero()[:, 0]
            if per_image is not None and len(cells) > per_image:
                cells = cells[torch.randperm(len(cells), generator=gen)[:per_image]]
            flat = f[k].flatten(1).T.float().cpu()
            for j, t in enumerate(steps):
                xs.append(flat[cells, j * step_dim : (j + 1) * step_dim])
                ts.append(torch.full((len(cells),), t, dtype=torch.long))
                ys.append(target.flatten()[cells])
    return torch.cat(xs), torch.cat(ts), torch.cat(ys)


def fit_head(
    mlp: DepthMLP,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    k: int,
    decay: float = 0.0,
) -> None:
    """L1 regression of one head on its columns of the rows, mini-batches mixing timesteps at random."""
    gen = torch.Generator().manual_seed(settings.seed * 1000 + k)
    mlp.train()
    opt = torch.optim.AdamW(mlp.parameters(), lr=settings.lr, weight_decay=decay)
    for epoch in range(settings.epochs):
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), settings.batch_size):
            idx = order[i : i + settings.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = F.l1_loss(mlp(x[idx], t[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        log.debug("head %d epoch %d: L1 %.4f", k, epoch, total / len(y))
    mlp.eval()


def fit(
    heads: DepthHeads, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, settings: TrainSettings, decay: float = 0.0
) -> DepthHeads:
    for k, name in enumerate(("strong", "weak")):
        if name == "weak" and heads.weak is None:
            continue
        mlp, index = heads.head(name)
        fit_head(mlp, x.index_select(1, index), t, y, settings, k, decay)
    return heads.eval()


def scores(evaluator: DepthEvaluator) -> dict[str, float]:
    r = evaluator.result()
    return {"abs_rel": r.abs_rel, "delta1": r.delta1}


def evaluate(
    probe: DepthProbe,
    heads: list[str],
    images: list[probe_data.DepthImage],
    depth_range: tuple[float, float],
    train_images: list[probe_data.DepthImage],
) -> dict[str, object]:
    """AbsRel and delta1 on held-out images: each head through the serving path, the base model's own depth
    answer (in its own space), and the three image-independent baselines (the mean map from the training set)."""
    base = probe.base
    res = probe.manifest.processing_res
    kind = probe.kind
    probe_eval = {h: DepthEvaluator(kind, depth_range) for h in heads}
    space = "disparity" if base.output_kind == "disparity" else "depth"
    base_eval = DepthEvaluator(space, depth_range) if base.output_kind != "normals" else None
    for chunk in same_size_chunks(images, BATCH):
        items = [BatchItem(img.rgb, base.plan(img.rgb, res)) for img in chunk]
        for h in heads:
            for img, m in zip(chunk, probe.depth(items, head=h), strict=True):
                probe_eval[h].add(m.array, img.depth, img.valid)
        if base_eval is not None:  # a depth model's own answer, for reference (a normals base has none)
            for img, m in zip(chunk, base.predict_batch(items), strict=True):
                base_eval.add(m.float_array(), img.depth, img.valid)
    mean = mean_map_from(kind, ((img.depth, img.valid) for img in train_images))
    makers = {
        "mean map": lambda hw: mean.map(hw),
        "vertical ramp": lambda hw: ramp(kind, hw),
        "constant": lambda hw: constant(kind, hw),
    }
    baselines = {}
    for name in BASELINES:
        ev = DepthEvaluator(kind, depth_range)
        for img in images:
            ev.add(makers[name](img.depth.shape), img.depth, img.valid)
        baselines[name] = scores(ev)
    best = min(baselines, key=lambda n: baselines[n]["abs_rel"])
    own = scores(base_eval) if base_eval is not None else {}
    return {
        **{h: scores(probe_eval[h]) for h in heads},
        "baselines": baselines,
        "best_baseline": best,
        "base_prediction": {"model": base.model_id, "kind": base.output_kind, **own},
        "images": len(images),
        "depth_range": list(depth_range),
    }


def train_depth_probe(cfg: ProbeConfig, out: Path | None = None) -> dict[str, object]:
    """The whole depth job; returns eval.json's content."""
    started = time.perf_counter()
    out = Path(out or cfg.output_dir)
    loaded = ProbeBase.load(cfg)
    base, core, res = loaded.predictor, loaded.core, loaded.processing_res
    f, d = cfg.features, cfg.depth
    serve = d.serve_timesteps or f.timesteps
    if not set(serve) <= set(f.timesteps):
        raise ValueError(f"depth.serve_timesteps {serve} must be among the trained features.timesteps {f.timesteps}")
    if d.serve_head == "weak" and not d.weak_blocks:
        raise ValueError("depth.serve_head is weak but depth.weak_blocks is empty: there is no weak head")
    channels = tap_channels(core.unet)
    check_taps(core.unet, [*f.blocks, *d.weak_blocks])
    torch.manual_seed(cfg.train.seed)  # the heads' initialisation
    heads = DepthHeads(channels, f.blocks, d.weak_blocks, cfg.train.hidden, d.time_dims)
    taps = TapConfig(heads.taps, tuple(f.timesteps), f.stride, f.noise_seed)
    _, train_images = read_depth_source(cfg.train_data)
    depth_range, eval_images = read_depth_source(cfg.eval_data)
    x, t, y = pixel_rows(base, taps, train_images, res, cfg.train.pixels_per_image, d.space, cfg.train.seed)
    t_feat = time.perf_counter() - started
    log.info("features: %d rows x %d dims from %d images", len(y), x.shape[1], len(train_images))
    fit(heads, x, t, y, cfg.train, d.weight_decay)
    t_fit = time.perf_counter() - started - t_feat
    manifest = loaded.manifest(
        cfg,
        task="depth",
        feature_dim=heads.step_dim,
        members=1,
        time_dims=d.time_dims,
        serve_timesteps=list(serve),
        weak_blocks=list(d.weak_blocks),
        serve_head=d.serve_head,
        output_kind=d.space,
    )
    save_depth_probe(out, manifest, heads)
    probe = DepthProbe(manifest, heads, base)
    report: dict[str, object] = {
        "task": "depth",
        "probe": cfg.id,
        "base_model": loaded.spec.id,
        "output_kind": probe.kind,
        "target": f"{probe.kind} per image between its 2 % and 98 % quantiles -> [0, 1]; aligned by least squares",
        **evaluate(probe, ["strong", "weak"] if d.weak_blocks else ["strong"], eval_images, depth_range, train_images),
        "train_images": len(train_images),
        "train_rows": len(y),
        "blocks": list(f.blocks),
        "weak_blocks": list(d.weak_blocks),
        "timesteps": list(f.timesteps),
        "serve_timesteps": list(serve),
        "seconds": {"features": round(t_feat, 2), "fit": round(t_fit, 2), "total": 0.0},
    }
    report["seconds"]["total"] = round(time.perf_counter() - started, 2)  # type: ignore[index]
    (out / EVAL).write_text(json.dumps(report, indent=2) + "\n")
    return report
