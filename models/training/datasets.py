"""Torch datasets for fine-tuning: the generic folder format, Hypersim, Virtual KITTI 2, and a ratio mixer.

Every dataset yields the same dict, so sources can be mixed in one batch by the default collate:

- `image`: float32 `[3, H, W]` in [-1, 1] (the VAE's input range)
- `depth`: float32 `[1, H, W]` planar depth in metres, 0 where invalid
- `valid`: bool `[1, H, W]`: depth is usable (decoded validity AND mask AND inside the depth range)
- `normals`: float32 `[3, H, W]` camera-frame unit vectors in the served convention (+x image LEFT, +y up, +z
  towards the camera: what the released Lotus / E2E-FT normals checkpoints output, the training families here;
  `models.outputs.NORMALS_CONVENTION`; Marigold's are OpenGL's, +x right, converted when scored);
  readers of data in another frame convert at load time. Zeros when the source has no normals (always present
  so that mixed batches collate)
- `normals_valid`: bool `[1, H, W]`, all False when the source has no normals
- `has_normals`: bool, `source`: dataset name, `name`: sample id

Randomness (crop position, flip) is drawn from `numpy.random.default_rng([seed, epoch, index])`, so a sample
is the same whatever the DataLoader's worker count or order; call `set_epoch` to get fresh draws each epoch.
"""

from __future__ import annotations

import csv
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from models.training import folder_format, synthetic
from models.training.config import Augment, DataConfig, SyntheticScenes
from models.training.folder_format import RawSample

Sample = dict[str, Any]

# Hypersim: 60 degree horizontal field of view at 1024 x 768, square pixels: f = 512 / tan(30 deg).
HYPERSIM_FOCAL_PX = 886.81
HYPERSIM_WIDTH = 1024
# Valid depth ranges of Marigold's training configs (the ranges the published E2E-FT / Lotus models saw).
HYPERSIM_DEPTH_RANGE = (1e-5, 65.0)
VKITTI2_DEPTH_RANGE = (1e-5, 80.0)
VKITTI2_DEPTH_UNITS_PER_METRE = 100.0  # centimetres
VKITTI2_SKY = 65535


@dataclass(frozen=True)
class Augmentation:
    """Training-time geometry changes, applied in this order: resize, random crop, random horizontal flip.

    Resizing uses bilinear + antialias for the image and nearest for depth, masks and normals, so no depth
    is invented across object edges. A crop larger than the (resized) image is an error, not padding.
    """

    resize_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] | None = None
    hflip_prob: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {self.hflip_prob}")


def to_tensors(raw: RawSample) -> Sample:
    """Arrays -> CHW tensors (image still in [0, 1])."""
    h, w = raw.depth.shape
    has_normals = raw.normals is not None
    normals = raw.normals if raw.normals is not None else np.zeros((h, w, 3), np.float32)
    normals_valid = raw.normals_valid if raw.normals_valid is not None else np.zeros((h, w), bool)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(raw.rgb, dtype=np.float32)).permute(2, 0, 1).contiguous(),
        "depth": torch.from_numpy(np.ascontiguousarray(raw.depth, dtype=np.float32))[None],
        "valid": torch.from_numpy(np.ascontiguousarray(raw.valid, dtype=bool))[None],
        "normals": torch.from_numpy(np.ascontiguousarray(normals, dtype=np.float32)).permute(2, 0, 1).contiguous(),
        "normals_valid": torch.from_numpy(np.ascontiguousarray(normals_valid, dtype=bool))[None],
        "has_normals": has_normals,
    }


def clip_depth_range(raw: RawSample, depth_range: tuple[float, float]) -> RawSample:
    """Depth outside [min, max] becomes invalid (and 0): it is ignored, not clamped into the range."""
    lo, hi = depth_range
    valid = raw.valid & (raw.depth >= lo) & (raw.depth <= hi)
    depth = np.where(valid, raw.depth, np.float32(0.0)).astype(np.float32)
    return RawSample(raw.rgb, depth, valid, raw.normals, raw.normals_valid)


def resize(sample: Sample, hw: tuple[int, int]) -> Sample:
    out = dict(sample)
    if tuple(sample["image"].shape[-2:]) == tuple(hw):
        return out
    out["image"] = F.interpolate(sample["image"][None], hw, mode="bilinear", antialias=True, align_corners=False)[0]
    for key in ("depth", "normals"):
        out[key] = F.interpolate(sample[key][None], hw, mode="nearest-exact")[0]
    for key in ("valid", "normals_valid"):
        out[key] = F.interpolate(sample[key][None].float(), hw, mode="nearest-exact")[0] > 0.5
    return out


def crop(sample: Sample, top: int, left: int, hw: tuple[int, int]) -> Sample:
    h, w = hw
    out = dict(sample)
    for key in ("image", "depth", "valid", "normals", "normals_valid"):
        out[key] = sample[key][:, top : top + h, left : left + w].contiguous()
    return out


def hflip(sample: Sample) -> Sample:
    """Mirror left-right. A mirrored surface's normal mirrors too: its x component changes sign."""
    out = dict(sample)
    for key in ("image", "depth", "valid", "normals", "normals_valid"):
        out[key] = torch.flip(sample[key], dims=[-1])
    out["normals"] = out["normals"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    return out


def augment(sample: Sample, aug: Augmentation, rng: np.random.Generator) -> Sample:
    if aug.resize_hw is not None:
        sample = resize(sample, aug.resize_hw)
    if aug.crop_hw is not None:
        h, w = sample["image"].shape[-2:]
        ch, cw = aug.crop_hw
        if ch > h or cw > w:
            raise ValueError(f"crop {aug.crop_hw} is larger than the image ({h}, {w}); resize first")
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        sample = crop(sample, top, left, aug.crop_hw)
    if aug.hflip_prob > 0.0 and rng.random() < aug.hflip_prob:
        sample = hflip(sample)
    return sample


class DenseDataset(Dataset[Sample], ABC):
    """Shared pipeline: read arrays -> apply the depth range -> tensors -> augment -> image to [-1, 1]."""

    source: str

    def __init__(
        self, depth_range: tuple[float, float], augmentation: Augmentation | None = None, seed: int = 0
    ) -> None:
        lo, hi = depth_range
        if not 0.0 <= lo < hi:
            raise ValueError(f"depth_range must satisfy 0 <= min < max, got {depth_range}")
        self.depth_range = (float(lo), float(hi))
        self.augmentation = augmentation or Augmentation()
        self.seed = seed
        self.epoch = 0

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> RawSample:
        """Decoded arrays of sample `index`, validity from the files alone."""

    @abstractmethod
    def name(self, index: int) -> str: ...

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        raw = clip_depth_range(self.load(index), self.depth_range)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample = augment(to_tensors(raw), self.augmentation, rng)
        sample["image"] = sample["image"] * 2.0 - 1.0
        sample["source"] = self.source
        sample["name"] = self.name(index)
        return sample


class FolderDataset(DenseDataset):
    """The generic folder format (see `folder_format`); the depth range comes from dataset.json by default."""

    def __init__(
        self,
        root: str | Path,
        names: Sequence[str] | None = None,
        depth_range: tuple[float, float] | None = None,
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        info = folder_format.read_info(self.root)
        super().__init__(depth_range or info.depth_range, augmentation, seed)
        self.source = info.name
        self.names = list(names) if names is not None else folder_format.list_names(self.root)

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        return self.names[index]

    def load(self, index: int) -> RawSample:
        return folder_format.read_sample(self.root, self.names[index])


# --- Hypersim -------------------------------------------------------------------------------------


def pixel_rays(height: int, width: int, focal_px: float) -> np.ndarray:
    """`[H, W, 3]` camera-frame rays (x right, y up, z = -1) through pixel centres of a centred pinhole."""
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    return np.stack([(u - cx) / focal_px, -(v - cy) / focal_px, -np.ones_like(u)], axis=-1)


def hypersim_focal(width: int) -> float:
    """Hypersim's default focal length in pixels, scaled to the image width."""
    return HYPERSIM_FOCAL_PX * width / HYPERSIM_WIDTH


def distance_to_planar_depth(distance: np.ndarray, focal_px: float) -> np.ndarray:
    """Distance to the camera centre -> planar depth: z = dist * f / sqrt((u - cx)^2 + (v - cy)^2 + f^2)."""
    h, w = distance.shape
    v, u = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    scale = focal_px / np.sqrt((u - cx) ** 2 + (v - cy) ** 2 + focal_px**2)
    return (distance.astype(np.float64) * scale).astype(np.float32)


@dataclass(frozen=True)
class HypersimFrame:
    scene: str  # ai_VVV_NNN
    camera: str  # cam_XX
    frame: int


def _read_hdf5(path: Path) -> np.ndarray:
    try:
        import h5py  # optional: only the Hypersim reader needs it
    except ImportError as exc:
        raise RuntimeError("reading Hypersim needs the package h5py (pip install 'h5py>=3.10')") from exc

    with h5py.File(path, "r") as f:
        return np.asarray(f["dataset"])


class HypersimDataset(DenseDataset):
    """Apple's Hypersim, as unpacked from its per-scene zips (https://github.com/apple/ml-hypersim)::

        ROOT/ai_VVV_NNN/images/scene_cam_XX_final_preview/frame.IIII.tonemap.jpg       RGB (tonemapped)
        ROOT/ai_VVV_NNN/images/scene_cam_XX_geometry_hdf5/frame.IIII.depth_meters.hdf5 distance to the camera
        ROOT/ai_VVV_NNN/images/scene_cam_XX_geometry_hdf5/frame.IIII.normal_cam.hdf5   camera-frame normals

    Each HDF5 file holds one array under the key "dataset". `depth_meters` is the Euclidean distance to the
    optical centre (NaN where nothing was hit); it is converted to planar depth with the default pinhole
    (886.81 px at 1024 wide, principal point at the centre). A few Hypersim scenes use other, tilt-shift
    cameras (listed in Hypersim's metadata_camera_parameters.csv); leave those out or pass their focal length.
    Hypersim's camera frame is OpenGL's (x right, y up, z away from where the camera looks); normals are
    normalised, flipped where they face away from the camera (back faces), then converted to the served
    convention (+x image left), as both upstream training codes do (Lotus `utils/hypersim_dataset.py`,
    E2E-FT `dataloaders/load.py`).

    Frames come from `split_csv` (Hypersim's metadata_images_split_scene_v1.csv: the rows of `split` that are
    in the public release) or, without it, from every tonemap.jpg found with its depth file beside it.
    """

    source = "hypersim"

    def __init__(
        self,
        root: str | Path,
        split_csv: str | Path | None = None,
        split: str = "train",
        focal_px: float | None = None,
        load_normals: bool = True,
        depth_range: tuple[float, float] = HYPERSIM_DEPTH_RANGE,
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(depth_range, augmentation, seed)
        self.root = Path(root)
        self.focal_px = focal_px
        self.load_normals = load_normals
        frames = self._frames_from_csv(Path(split_csv), split) if split_csv is not None else self._scan()
        self.frames = [f for f in frames if self._depth_path(f).is_file() and self._rgb_path(f).is_file()]
        if split_csv is not None and len(self.frames) < len(frames):
            missing = len(frames) - len(self.frames)
            raise FileNotFoundError(f"{missing} of {len(frames)} Hypersim frames listed for {split!r} are missing")

    def _images(self, f: HypersimFrame) -> Path:
        return self.root / f.scene / "images"

    def _rgb_path(self, f: HypersimFrame) -> Path:
        return self._images(f) / f"scene_{f.camera}_final_preview" / f"frame.{f.frame:04d}.tonemap.jpg"

    def _depth_path(self, f: HypersimFrame) -> Path:
        return self._images(f) / f"scene_{f.camera}_geometry_hdf5" / f"frame.{f.frame:04d}.depth_meters.hdf5"

    def _normals_path(self, f: HypersimFrame) -> Path:
        return self._images(f) / f"scene_{f.camera}_geometry_hdf5" / f"frame.{f.frame:04d}.normal_cam.hdf5"

    def _scan(self) -> list[HypersimFrame]:
        pattern = re.compile(r"scene_(cam_\d+)_final_preview")
        frames = []
        for scene_dir in sorted(p for p in self.root.glob("ai_*_*") if p.is_dir()):
            for cam_dir in sorted((scene_dir / "images").glob("scene_cam_*_final_preview")):
                m = pattern.fullmatch(cam_dir.name)
                if m is None:
                    continue
                for jpg in sorted(cam_dir.glob("frame.*.tonemap.jpg")):
                    frames.append(HypersimFrame(scene_dir.name, m.group(1), int(jpg.name.split(".")[1])))
        return frames

    @staticmethod
    def _frames_from_csv(path: Path, split: str) -> list[HypersimFrame]:
        with path.open(newline="", encoding="utf-8") as stream:
            return [
                HypersimFrame(row["scene_name"], row["camera_name"], int(row["frame_id"]))
                for row in csv.DictReader(stream)
                if row["split_partition_name"] == split and row["included_in_public_release"] == "True"
            ]

    def __len__(self) -> int:
        return len(self.frames)

    def name(self, index: int) -> str:
        f = self.frames[index]
        return f"{f.scene}/{f.camera}/frame.{f.frame:04d}"

    def load(self, index: int) -> RawSample:
        f = self.frames[index]
        rgb = folder_format.read_rgb(self._rgb_path(f))
        distance = _read_hdf5(self._depth_path(f)).astype(np.float64)
        if distance.shape != rgb.shape[:2]:
            raise ValueError(f"{self._depth_path(f)}: depth {distance.shape} does not match RGB {rgb.shape[:2]}")
        h, w = distance.shape
        focal = self.focal_px if self.focal_px is not None else hypersim_focal(w)
        valid = np.isfinite(distance) & (distance > 0)
        depth = np.where(valid, distance_to_planar_depth(np.where(valid, distance, 0.0), focal), np.float32(0.0))
        normals = normals_valid = None
        if self.load_normals and self._normals_path(f).is_file():
            normals, normals_valid = _face_camera(_read_hdf5(self._normals_path(f)), pixel_rays(h, w, focal))
            normals = folder_format.opengl_to_served_normals(normals)
        return RawSample(rgb, depth.astype(np.float32), valid, normals, normals_valid)


def _face_camera(normals: np.ndarray, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalise and flip normals that point along the viewing ray; zero-length or NaN ones are invalid."""
    n = np.asarray(normals, dtype=np.float64)
    finite = np.isfinite(n).all(axis=-1)
    n = np.where(finite[..., None], n, 0.0)
    length = np.linalg.norm(n, axis=-1)
    valid = finite & (length > 1e-6)
    n = n / np.maximum(length, 1e-6)[..., None]
    n = np.where((np.einsum("hwc,hwc->hw", n, rays) > 0.0)[..., None], -n, n)
    return np.where(valid[..., None], n, 0.0).astype(np.float32), valid


# --- Virtual KITTI 2 ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VirtualKittiFrame:
    scene: str  # SceneXX
    variation: str  # clone, fog, 15-deg-left, ...
    camera: str  # Camera_0 / Camera_1
    frame: int


class VirtualKitti2Dataset(DenseDataset):
    """Virtual KITTI 2 (Naver Labs), as unpacked from vkitti_2.0.3_rgb.tar and vkitti_2.0.3_depth.tar::

        ROOT/SceneXX/VARIATION/frames/rgb/Camera_K/rgb_NNNNN.jpg
        ROOT/SceneXX/VARIATION/frames/depth/Camera_K/depth_NNNNN.png   16-bit, centimetres, 65535 = sky

    Depth is planar (the z of the camera frame); it has no normals. The default range clips at 80 m, which
    also drops the distant background that the 655.35 m cap would otherwise let through.
    """

    source = "vkitti2"

    def __init__(
        self,
        root: str | Path,
        scenes: Sequence[str] | None = None,
        variations: Sequence[str] | None = None,
        cameras: Sequence[str] = ("Camera_0",),
        depth_range: tuple[float, float] = VKITTI2_DEPTH_RANGE,
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(depth_range, augmentation, seed)
        self.root = Path(root)
        self.frames: list[VirtualKittiFrame] = []
        for scene_dir in sorted(p for p in self.root.glob("Scene*") if p.is_dir()):
            if scenes is not None and scene_dir.name not in scenes:
                continue
            for var_dir in sorted(p for p in scene_dir.iterdir() if p.is_dir()):
                if variations is not None and var_dir.name not in variations:
                    continue
                for camera in cameras:
                    for jpg in sorted((var_dir / "frames" / "rgb" / camera).glob("rgb_*.jpg")):
                        frame = VirtualKittiFrame(scene_dir.name, var_dir.name, camera, int(jpg.stem.split("_")[1]))
                        if self._depth_path(frame).is_file():
                            self.frames.append(frame)

    def _frames_dir(self, f: VirtualKittiFrame) -> Path:
        return self.root / f.scene / f.variation / "frames"

    def _rgb_path(self, f: VirtualKittiFrame) -> Path:
        return self._frames_dir(f) / "rgb" / f.camera / f"rgb_{f.frame:05d}.jpg"

    def _depth_path(self, f: VirtualKittiFrame) -> Path:
        return self._frames_dir(f) / "depth" / f.camera / f"depth_{f.frame:05d}.png"

    def __len__(self) -> int:
        return len(self.frames)

    def name(self, index: int) -> str:
        f = self.frames[index]
        return f"{f.scene}/{f.variation}/{f.camera}/{f.frame:05d}"

    def load(self, index: int) -> RawSample:
        f = self.frames[index]
        rgb = folder_format.read_rgb(self._rgb_path(f))
        cm = folder_format.read_png16(self._depth_path(f))
        if cm.shape != rgb.shape[:2]:
            raise ValueError(f"{self._depth_path(f)}: depth {cm.shape} does not match RGB {rgb.shape[:2]}")
        valid = (cm > 0) & (cm < VKITTI2_SKY)
        depth = np.where(valid, cm.astype(np.float32) / np.float32(VKITTI2_DEPTH_UNITS_PER_METRE), np.float32(0.0))
        return RawSample(rgb, depth.astype(np.float32), valid, None, None)


# --- mixing ---------------------------------------------------------------------------------------


class MixedDataset(Dataset[Sample]):
    """Draws each item from source k with probability ratios[k] / sum(ratios) (e.g. Hypersim : vKITTI = 9 : 1).

    Item i of epoch e picks its source and its index in that source from `default_rng([seed, e, i])`:
    deterministic, independent of worker order, and fresh each epoch after `set_epoch`.
    """

    def __init__(self, sources: Sequence[DenseDataset], ratios: Sequence[float], length: int, seed: int = 0) -> None:
        if len(sources) == 0 or len(sources) != len(ratios):
            raise ValueError(f"need one ratio per source, got {len(sources)} sources and {len(ratios)} ratios")
        weights = np.asarray(ratios, dtype=np.float64)
        if np.any(weights < 0) or not math.isfinite(weights.sum()) or weights.sum() <= 0:
            raise ValueError(f"ratios must be non-negative with a positive sum, got {list(ratios)}")
        for src, r in zip(sources, ratios, strict=True):
            if r > 0 and len(src) == 0:
                raise ValueError(f"source {getattr(src, 'source', src)!r} is empty but has ratio {r}")
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        self.sources = list(sources)
        self.probabilities = weights / weights.sum()
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for src in self.sources:
            src.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def pick(self, index: int) -> tuple[int, int]:
        """(source number, index in that source) of item `index` this epoch."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k = int(rng.choice(len(self.sources), p=self.probabilities))
        return k, int(rng.integers(len(self.sources[k])))

    def __getitem__(self, index: int) -> Sample:
        k, j = self.pick(index)
        return self.sources[k][j]


class SyntheticDataset(DenseDataset):
    """Procedural scenes rendered on first use and kept in memory (scene i uses the seed (scene_seed, i));
    normals in the served convention (+x image left), like every other source."""

    source = "synthetic"

    def __init__(
        self,
        count: int,
        height: int,
        width: int,
        scene_seed: int,
        augmentation: Augmentation | None = None,
        seed: int = 0,
        variety: synthetic.Variety = "base",
    ) -> None:
        super().__init__(synthetic.DEPTH_RANGE, augmentation, seed)
        self.count, self.height, self.width, self.scene_seed = count, height, width, scene_seed
        self.variety = variety
        self._cache: dict[int, RawSample] = {}

    def __len__(self) -> int:
        return self.count

    def name(self, index: int) -> str:
        return f"{index:06d}"

    def load(self, index: int) -> RawSample:
        if index not in self._cache:
            r = synthetic.generate((self.scene_seed, index), self.height, self.width, self.variety)
            self._cache[index] = RawSample(r.rgb, r.depth, r.valid, r.served_normals, r.valid.copy())
        return self._cache[index]


def _augmentation(aug: Augment) -> Augmentation:
    return Augmentation(resize_hw=aug.resize, crop_hw=aug.crop, hflip_prob=aug.hflip)


def build_dataset(data: DataConfig, seed: int) -> Dataset[Sample]:
    """The configured sources, mixed by ratio when there are several (or when samples_per_epoch is set)."""
    sources: list[DenseDataset] = []
    for src in data.sources:
        aug = _augmentation(src.augment or data.augment)
        if src.type == "folder":
            sources.append(FolderDataset(src.root, depth_range=src.depth_range, augmentation=aug, seed=seed))
        elif src.type == "hypersim":
            sources.append(HypersimDataset(src.root, src.split_csv, src.split, augmentation=aug, seed=seed))
        elif src.type == "vkitti2":
            sources.append(VirtualKitti2Dataset(src.root, src.scenes, src.variations, augmentation=aug, seed=seed))
        else:
            sources.append(SyntheticDataset(src.count, src.height, src.width, src.seed, aug, seed, src.variety))
    for src_cfg, ds in zip(data.sources, sources, strict=True):
        if len(ds) == 0:
            raise ValueError(f"training source {src_cfg.type} ({getattr(src_cfg, 'root', '')}) has no samples")
    if len(sources) == 1 and data.samples_per_epoch is None:
        return sources[0]
    shapes = {tuple(ds[0]["image"].shape[-2:]) for ds in sources}
    if len(shapes) > 1:
        raise ValueError(f"mixed sources give different image sizes {sorted(shapes)}: set resize/crop per source")
    length = data.samples_per_epoch or sum(len(ds) for ds in sources)
    return MixedDataset(sources, [s.ratio for s in data.sources], length, seed)


def write_synthetic(root: Path, syn: SyntheticScenes) -> Path:
    """Render held-out scenes to `root` in the folder format, staged and renamed so a crash leaves no half set."""
    staged = root.with_name(f".tmp-{root.name}")
    synthetic.write_scenes(staged, syn.count, syn.height, syn.width, syn.seed, variety=syn.variety)
    staged.rename(root)
    return root
