"""`dense-serve probe train CONFIG.yaml`: fit an ensemble of pixel MLPs on frozen diffusion features.

Features are extracted once per labelled image exactly as serving extracts them (same pre-processing, same
taps), at the feature grid (1/stride of the processing size); each label is the class at its grid cell's
centre, and unlabelled (255) or padded cells are dropped. Every member sees all sampled pixels in its own random order
from its own initialisation (cross-entropy, Adam); serving takes their majority vote. The held-out evaluation
runs the serving path itself (`Probe.segment`) at each image's own size and writes `eval.json`.
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
from models.probes import data as probe_data
from models.probes.artifact import EVAL, save_probe
from models.probes.depth_train import train_depth_probe
from models.probes.features import TapConfig, extract, feature_dim, unet_input_noise
from models.probes.job import (
    BATCH,
    FolderSource,
    ProbeBase,
    ProbeConfig,
    SyntheticSource,
    TrainSettings,
    same_size_chunks,
)
from models.probes.mlp import PixelEnsemble
from models.probes.segmenter import Probe, torch_core

log = logging.getLogger(__name__)


def read_source(source: SyntheticSource | FolderSource) -> tuple[list[str], list[probe_data.LabelledImage]]:
    if isinstance(source, SyntheticSource):
        return probe_data.synthetic(source.count, source.height, source.width, source.seed)
    return probe_data.read_folder(source.path, source.limit)


@torch.inference_mode()
def pixel_features(
    base: DensePredictor,
    taps: TapConfig,
    images: list[probe_data.LabelledImage],
    processing_res: int,
    per_image: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, D]` float32 features and `[N]` int64 labels of the labelled feature-grid cells (at most `per_image`
    of each image, drawn at random with `seed`)."""
    gen = torch.Generator().manual_seed(seed)
    core = torch_core(base)
    feats, labels = [], []
    s = taps.stride
    for chunk in same_size_chunks(images, BATCH):
        items = [BatchItem(img.rgb, base.plan(img.rgb, processing_res)) for img in chunk]
        g = items[0].geometry
        x = torch.stack([_to_tensor(it, core.device) for it in items]).to(core.dtype)
        latent = core.encode(x)
        f, _ = extract(core, latent, taps, unet_input_noise(core, latent, taps.noise_seed))
        for k, img in enumerate(chunk):
            # Labels at the processing size (nearest), padded as unlabelled, read at each grid cell's centre.
            lab = torch.from_numpy(img.labels.astype(np.int64))[None, None].float()
            lab = F.interpolate(lab, g.processing_hw, mode="nearest")[0, 0].long()
            full = torch.full(g.padded_hw, probe_data.IGNORE, dtype=torch.long)
            full[: g.processing_hw[0], : g.processing_hw[1]] = lab
            grid = full[s // 2 :: s, s // 2 :: s][: f.shape[-2], : f.shape[-1]]
            cells = (grid != probe_data.IGNORE).flatten().nonzero()[:, 0]
            if per_image is not None and len(cells) > per_image:
                cells = cells[torch.randperm(len(cells), generator=gen)[:per_image]]
            flat = f[k].flatten(1).T.float().cpu()
            feats.append(flat[cells])
            labels.append(grid.flatten()[cells])
    return torch.cat(feats), torch.cat(labels)


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, settings: TrainSettings, log_every: int = 0) -> PixelEnsemble:
    """Train every member independently on all pixels (own init, own shuffling)."""
    ensemble = PixelEnsemble(x.shape[1], classes, settings.members, settings.hidden)
    for k, member in enumerate(ensemble.members):
        gen = torch.Generator().manual_seed(settings.seed * 1000 + k)
        torch.manual_seed(settings.seed * 1000 + k)
        for layer in member:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        member.train()
        opt = torch.optim.Adam(member.parameters(), lr=settings.lr)
        for epoch in range(settings.epochs):
            order = torch.randperm(len(y), generator=gen)
            total = 0.0
            for i in range(0, len(y), settings.batch_size):
                idx = order[i : i + settings.batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                loss = F.cross_entropy(member(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            if log_every:
                log.info("member %d epoch %d: loss %.4f", k, epoch, total / len(y))
        member.eval()
    return ensemble.eval()


def confusion(pred: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    keep = truth != probe_data.IGNORE
    idx = truth[keep].astype(np.int64) * classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=classes * classes).reshape(classes, classes)


def scores_of(conf: np.ndarray, classes: list[str]) -> dict[str, object]:
    """mIoU over the classes present in the truth or the prediction, per-class IoU, pixel accuracy."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = {c: float(tp[i] / union[i]) for i, c in enumerate(classes) if union[i] > 0}
    return {
        "miou": float(np.mean(list(iou.values()))) if iou else 0.0,
        "per_class_iou": iou,
        "pixel_accuracy": float(tp.sum() / max(conf.sum(), 1)),
    }


def evaluate(probe: Probe, images: list[probe_data.LabelledImage], majority: int) -> dict[str, object]:
    """The serving path on held-out images, and the majority-class predictor (the train set's commonest class)."""
    n = len(probe.classes)
    conf = np.zeros((n, n), dtype=np.int64)
    base_conf = np.zeros((n, n), dtype=np.int64)
    segs = []
    for chunk in same_size_chunks(images, BATCH):
        res = probe.manifest.processing_res
        out, _ = probe.segment([BatchItem(img.rgb, probe.base.plan(img.rgb, res)) for img in chunk])
        segs += out
    for img, seg in zip(images, segs, strict=True):
        conf += confusion(seg.labels, img.labels, n)
        base_conf += confusion(np.full_like(img.labels, majority), img.labels, n)
    return {
        **scores_of(conf, probe.classes),
        "images": len(images),
        "majority_class": probe.classes[majority],
        "majority_baseline": scores_of(base_conf, probe.classes),
    }


def train_probe(cfg: ProbeConfig, out: Path | None = None) -> dict[str, object]:
    """The whole job; returns eval.json's content."""
    if cfg.task == "depth":
        return train_depth_probe(cfg, out)
    started = time.perf_counter()
    out = Path(out or cfg.output_dir)
    loaded = ProbeBase.load(cfg)
    base, res = loaded.predictor, loaded.processing_res
    f = cfg.features
    taps = TapConfig(tuple(f.blocks), tuple(f.timesteps), f.stride, f.noise_seed)
    classes, train_images = read_source(cfg.train_data)
    eval_classes, eval_images = read_source(cfg.eval_data)
    if eval_classes != classes:
        raise ValueError(f"train and eval data name different classes: {classes} vs {eval_classes}")
    x, y = pixel_features(base, taps, train_images, res, cfg.train.pixels_per_image, cfg.train.seed)
    t_feat = time.perf_counter() - started
    log.info("features: %d labelled pixels x %d dims from %d images", len(y), x.shape[1], len(train_images))
    ensemble = fit(x, y, len(classes), cfg.train)
    t_fit = time.perf_counter() - started - t_feat
    manifest = loaded.manifest(
        cfg, classes=classes, feature_dim=feature_dim(loaded.core.unet, taps), members=cfg.train.members
    )
    save_probe(out, manifest, ensemble)
    probe = Probe(manifest, ensemble, base)
    counts = np.bincount(y.numpy(), minlength=len(classes))
    report = {
        **evaluate(probe, eval_images, int(counts.argmax())),
        "probe": cfg.id,
        "base_model": loaded.spec.id,
        "train_images": len(train_images),
        "train_pixels": len(y),
        "feature_dim": int(x.shape[1]),
        "seconds": {"features": round(t_feat, 2), "fit": round(t_fit, 2), "total": 0.0},
    }
    report["seconds"]["total"] = round(time.perf_counter() - started, 2)  # type: ignore[index]
    (out / EVAL).write_text(json.dumps(report, indent=2) + "\n")
    return report
