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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.inference import BatchItem, DensePredictor, _to_tensor
from models.predictors.base import TIMESTEP, SingleStepPredictor
from models.probes import data as probe_data
from models.probes.artifact import EVAL, ProbeManifest, save_probe
from models.probes.features import TapConfig, extract, feature_dim, unet_input_noise
from models.probes.mlp import PixelEnsemble
from models.probes.segmenter import Probe, torch_core
from models.spec import ModelSpec

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSource(_Strict):
    type: Literal["synthetic"]
    count: int = Field(ge=1, description="labelled scenes")
    height: int = Field(default=128, ge=8)
    width: int = Field(default=128, ge=8)
    seed: int = Field(default=0, description="scene i uses seed (seed, i): keep train and eval seeds apart")


class FolderSource(_Strict):
    type: Literal["folder"]
    path: str = Field(description="classes.json, rgb/, labels/ (depth probes: rgb/, depth/); models/probes/data.py")
    limit: int | None = Field(default=None, ge=1, description="use only the first N images (sorted by name)")


Source = Annotated[SyntheticSource | FolderSource, Field(discriminator="type")]


class FeatureConfig(_Strict):
    blocks: list[int] = Field(min_length=1, description="decoder layer indices (models/probes/features.py)")
    timesteps: list[int] = Field(default=[TIMESTEP], min_length=1, description="999 shares the depth pass")
    stride: int = Field(default=2, description="feature grid: 1/stride of the processing size (1, 2, 4, 8)")
    noise_seed: int = Field(default=0, ge=0, description="Lotus-G: the fixed noise seed of the probe's input")
    processing_res: int | None = Field(default=None, ge=0, description="default: the base model's")


class TrainSettings(_Strict):
    members: int = Field(default=10, ge=1, le=64, description="MLPs in the majority-vote ensemble (segment only)")
    hidden: tuple[int, int] = Field(default=(256, 32), description="hidden widths of each MLP")
    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=1024, ge=1, description="pixels per step")
    lr: float = Field(default=1e-3, gt=0)
    pixels_per_image: int | None = Field(
        default=1024, ge=1, description="labelled cells sampled per image (None: all); bounds CPU training time"
    )
    seed: int = 0
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default: torch's)")


class DepthSettings(_Strict):
    """Depth probes only (DAG): the time embedding, the serving timesteps and the optional weak head."""

    space: Literal["depth", "disparity"] = Field(
        default="depth", description="what the MLP regresses (normalised per image): depth (DAG) or 1 / depth"
    )
    time_dims: int = Field(default=32, ge=0, le=1024, description="sinusoidal embedding of t fed to the MLP")
    serve_timesteps: list[int] | None = Field(default=None, description="averaged at serving (default: all)")
    weak_blocks: list[int] = Field(default=[], description="the weak MLP's blocks (DAG: 6 alone); [] = none")
    serve_head: Literal["strong", "weak"] = Field(default="strong", description="the head the probe's id serves")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay of both heads")


class ProbeConfig(_Strict):
    id: str = Field(pattern=r"^[\w.-]+$", description="the probe's model id in /v1/models")
    task: Literal["segment", "depth"] = Field(default="segment", description="class map or depth map")
    base: str = Field(description="the base model: spec .toml, diffusers folder or shipped id (as --model)")
    features: FeatureConfig
    train_data: Source
    eval_data: Source
    train: TrainSettings = TrainSettings()
    depth: DepthSettings = DepthSettings()
    output_dir: str = Field(description="where probe.toml, probe.safetensors and eval.json go (--out overrides)")


def load_config(path: str | Path) -> ProbeConfig:
    path = Path(path)
    try:
        return ProbeConfig.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the probe config: {exc}") from exc
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid probe config:\n{exc}") from exc


def read_source(source: SyntheticSource | FolderSource) -> tuple[list[str], list[probe_data.LabelledImage]]:
    if isinstance(source, SyntheticSource):
        return probe_data.synthetic(source.count, source.height, source.width, source.seed)
    return probe_data.read_folder(source.path, source.limit)


BATCH = 8  # images per forward pass in training and evaluation


class _Image(Protocol):
    @property
    def rgb(self) -> np.ndarray: ...


ImageT = TypeVar("ImageT", bound=_Image)


def same_size_chunks(images: list[ImageT], size: int) -> list[list[ImageT]]:
    """Consecutive images of one size, at most `size` at a time (a forward pass takes one shape); labelled and
    depth images alike."""
    chunks: list[list[ImageT]] = []
    for img in images:
        if chunks and len(chunks[-1]) < size and chunks[-1][0].rgb.shape == img.rgb.shape:
            chunks[-1].append(img)
        else:
            chunks.append([img])
    return chunks


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


@dataclass(frozen=True)
class ProbeBase:
    """The frozen base model a probe job trains on (segmentation and depth alike): loaded once on the CPU in
    fp32, and described the same way in every manifest (its id, checkpoint folder and hash, family)."""

    spec: ModelSpec
    path: Path
    predictor: DensePredictor
    core: SingleStepPredictor
    processing_res: int

    @classmethod
    def load(cls, cfg: ProbeConfig) -> ProbeBase:
        from models.loading import load_model, resolve_source
        from models.spec import resolve_spec

        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        spec = resolve_spec(cfg.base, backend="torch", device="cpu", dtype="fp32")
        path = resolve_source(spec)
        predictor = load_model(spec)
        res = cfg.features.processing_res
        return cls(spec, path, predictor, torch_core(predictor), predictor.processing_res if res is None else res)

    def manifest(self, cfg: ProbeConfig, **task_fields: Any) -> ProbeManifest:
        """The probe's manifest: the base and taps as this job trained them, plus the task's own fields."""
        from models.export.manifest import checkpoint_hash

        f = cfg.features
        return ProbeManifest(
            id=cfg.id,
            base_model=self.spec.id,
            base_source=str(self.path),
            base_spec=cfg.base,
            base_hash=checkpoint_hash(self.path),
            family=self.predictor.family,
            blocks=list(f.blocks),
            timesteps=list(f.timesteps),
            stride=f.stride,
            noise_seed=f.noise_seed,
            processing_res=self.processing_res,
            hidden=list(cfg.train.hidden),
            **task_fields,
        )


def train_probe(cfg: ProbeConfig, out: Path | None = None) -> dict[str, object]:
    """The whole job; returns eval.json's content."""
    if cfg.task == "depth":
        from models.probes.depth_train import train_depth_probe

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
