"""Labelled images for probes: the folder format, and synthetic scenes written into it.

Layout (NAME is any file stem; a sample exists for every image in `rgb/`)::

    ROOT/
      classes.json        ["floor", "wall", ...]: class index i is the i-th name
      rgb/NAME.png        8-bit RGB (.jpg/.jpeg also read)
      labels/NAME.png     8-bit single channel, the class index per pixel; 255 = unlabelled (ignored)

A label PNG must have the size of its image. Any paint program or labelling tool that exports index masks
writes this (CVAT "Segmentation mask", LabelMe `labelme_export_json`, ... with a palette mapped to indices).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.training import folder_format

IGNORE = 255
CLASSES_FILE = "classes.json"


@dataclass(frozen=True)
class LabelledImage:
    name: str
    rgb: np.ndarray  # uint8 [H, W, 3]: what a served request decodes to
    labels: np.ndarray  # uint8 [H, W], IGNORE = unlabelled


def read_classes(root: Path) -> list[str]:
    path = root / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a probe dataset names its classes in a JSON list")
    classes = json.loads(path.read_text())
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"{path}: expected a non-empty JSON list of class names")
    if len(classes) > IGNORE or len(set(classes)) != len(classes):
        raise ValueError(f"{path}: at most {IGNORE} distinct class names")
    return classes


def read_folder(root: str | Path, limit: int | None = None) -> tuple[list[str], list[LabelledImage]]:
    root = Path(root)
    classes = read_classes(root)
    names = folder_format.list_names(root)[:limit]
    if not names:
        raise ValueError(f"{root}/rgb holds no images")
    images = []
    for name in names:
        label_path = root / "labels" / f"{name}.png"
        if not label_path.is_file():
            raise FileNotFoundError(f"{label_path} is missing: every image in rgb/ needs its label PNG")
        rgb_path = folder_format.find_file(root / "rgb", name, folder_format.RGB_SUFFIXES)
        assert rgb_path is not None
        with Image.open(rgb_path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        with Image.open(label_path) as im:
            if im.mode not in ("L", "P"):
                raise ValueError(f"{label_path}: a label PNG is 8-bit single channel (class indices), not {im.mode}")
            labels = np.asarray(im, dtype=np.uint8)
        if labels.shape != rgb.shape[:2]:
            raise ValueError(f"{label_path}: {labels.shape[::-1]} labels for a {rgb.shape[1::-1]} image")
        bad = np.unique(labels[(labels != IGNORE) & (labels >= len(classes))])
        if bad.size:
            raise ValueError(f"{label_path}: class indices {bad.tolist()} but classes.json names {len(classes)}")
        images.append(LabelledImage(name, rgb, labels))
    return classes, images


def write_folder(root: str | Path, classes: list[str], images: list[LabelledImage]) -> None:
    root = Path(root)
    for sub in ("rgb", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / CLASSES_FILE).write_text(json.dumps(classes) + "\n")
    for img in images:
        Image.fromarray(img.rgb, mode="RGB").save(root / "rgb" / f"{img.name}.png")
        Image.fromarray(img.labels, mode="L").save(root / "labels" / f"{img.name}.png")


def synthetic(count: int, height: int, width: int, seed: int) -> tuple[list[str], list[LabelledImage]]:
    """Procedural rooms with per-pixel classes (sky, floor, ceiling, wall, box, sphere); scene i uses seed (seed, i)."""
    from models.training.synthetic import SEMANTIC_CLASSES, generate, semantic_labels

    images = []
    for i in range(count):
        r = generate((seed, i), height, width)
        rgb = np.clip(np.rint(r.rgb * 255.0), 0, 255).astype(np.uint8)
        images.append(LabelledImage(f"{i:06d}", rgb, semantic_labels(r)))
    return list(SEMANTIC_CLASSES), images


# --- depth probes ---------------------------------------------------------------------------------
#
# A depth probe's folder is the same `rgb/` plus `depth/` (no classes.json, no labels/ needed; a folder may hold
# both and train both kinds of probe)::
#
#     ROOT/
#       rgb/NAME.png          8-bit RGB (.jpg/.jpeg also read)
#       depth/NAME.png        16-bit grayscale, millimetres, 0 = invalid          } one of these per image
#       depth/NAME.npy        float32 [H, W] metres (or any unit: the probe learns relative depth); 0, negative
#                             or non-finite = invalid                               }
#       dataset.json          optional {"name": ..., "depth_range": [min, max]}: the evaluation's valid range
#                             and clipping range (default DEFAULT_DEPTH_RANGE)
#
# Only relative depth matters: each image's depth is normalised on its own before training (depth_train.py).

#: The evaluation's depth range when a folder has no dataset.json: every positive depth counts.
DEFAULT_DEPTH_RANGE = (1e-3, 1e6)


@dataclass(frozen=True)
class DepthImage:
    name: str
    rgb: np.ndarray  # uint8 [H, W, 3]
    depth: np.ndarray  # float32 [H, W], 0 where invalid
    valid: np.ndarray  # bool [H, W]


def synthetic_depth(count: int, height: int, width: int, seed: int) -> tuple[tuple[float, float], list[DepthImage]]:
    """Procedural rooms with their rendered depth (the same scenes as `synthetic`); and their depth range."""
    from models.training.synthetic import DEPTH_RANGE, generate

    images = []
    for i in range(count):
        r = generate((seed, i), height, width)
        rgb = np.clip(np.rint(r.rgb * 255.0), 0, 255).astype(np.uint8)
        images.append(DepthImage(f"{i:06d}", rgb, r.depth.astype(np.float32), r.valid.astype(bool)))
    return DEPTH_RANGE, images


def read_depth_folder(root: str | Path, limit: int | None = None) -> tuple[tuple[float, float], list[DepthImage]]:
    """Images with depth from `root` (layout above) and the depth range of its dataset.json (or the default)."""
    root = Path(root)
    names = folder_format.list_names(root)[:limit]
    if not names:
        raise ValueError(f"{root}/rgb holds no images")
    info = root / folder_format.INFO_FILE
    depth_range = folder_format.read_info(root).depth_range if info.is_file() else DEFAULT_DEPTH_RANGE
    if depth_range[0] <= 0:
        depth_range = (DEFAULT_DEPTH_RANGE[0], depth_range[1])
    images = []
    for name in names:
        path = folder_format.find_file(root / "depth", name, (".png", ".npy"))
        if path is None:
            raise FileNotFoundError(f"{root / 'depth' / name}.png or .npy is missing: every image needs its depth")
        depth, valid = folder_format.read_depth(path)
        rgb_path = folder_format.find_file(root / "rgb", name, folder_format.RGB_SUFFIXES)
        assert rgb_path is not None
        with Image.open(rgb_path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if depth.shape != rgb.shape[:2]:
            raise ValueError(f"{path}: {depth.shape[::-1]} depth for a {rgb.shape[1::-1]} image")
        if valid.sum() < 2:
            raise ValueError(f"{path}: fewer than two valid depth pixels")
        images.append(DepthImage(name, rgb, depth, valid))
    return depth_range, images


def write_depth_folder(root: str | Path, images: list[DepthImage], depth_range: tuple[float, float]) -> None:
    """`depth/NAME.npy` (float32 metres) beside `rgb/` and a dataset.json with the depth range."""
    root = Path(root)
    (root / "rgb").mkdir(parents=True, exist_ok=True)
    for img in images:
        Image.fromarray(img.rgb, mode="RGB").save(root / "rgb" / f"{img.name}.png")
        folder_format.write_depth(root / "depth" / f"{img.name}.npy", img.depth, img.valid)
    folder_format.write_info(root, folder_format.DatasetInfo(name=root.name or "probe-depth", depth_range=depth_range))
