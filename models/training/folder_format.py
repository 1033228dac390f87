"""The generic dataset folder: the one on-disk layout every custom or converted dataset is brought into.

Layout (NAME is any file stem; a sample exists for every image in `rgb/`)::

    ROOT/
      dataset.json            {"name": "...", "depth_range": [min_m, max_m]}
      rgb/NAME.png            8-bit RGB (.jpg/.jpeg also read)
      depth/NAME.png          16-bit grayscale, millimetres, 0 = invalid           } exactly one
      depth/NAME.npy          float32 [H, W] metres; 0, negative or non-finite = invalid } of these
      depth/NAME.exr          float32 metres in channel Z (or Y, R, depth, or the only one); needs `OpenEXR`
      mask/NAME.png           optional, 8-bit; nonzero = valid (ANDed with the depth's own validity)
      normals/NAME.png        optional, 8-bit RGB, n = rgb / 127.5 - 1 (re-normalised); rgb 0,0,0 = invalid
      normals/NAME.npy        optional, float32 [H, W, 3]; zero or non-finite vectors = invalid

`depth_range` is the dataset's valid range in metres: ground truth outside it is ignored in training and
evaluation, and aligned predictions are clipped to it (the evaluation protocol).

Normals are camera-frame unit vectors in the SERVED convention (`models.outputs.NORMALS_CONVENTION`): +x towards
the image's LEFT, +y up, +z towards the camera. That is what the released Lotus / E2E-FT normals checkpoints
output (their training code negates Hypersim's x), so their predictions and ground truth compare as they are;
Marigold's (+x right, `models.outputs.OPENGL_AXES`) are converted to these axes before they are scored. Data in
the OpenGL / Hypersim camera frame (+x right) is converted with `opengl_to_served_normals` when it is written
or read. A normals PNG holds one unit vector per pixel quantised to 8 bits per axis (error < 0.5 degree).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np
from PIL import Image

from models.outputs import LOTUS_AXES

DepthFormat = Literal["png", "npy", "exr"]
NormalsFormat = Literal["png", "npy"]

DEPTH_PNG_UNITS_PER_METRE = 1000.0  # millimetres
RGB_SUFFIXES = (".png", ".jpg", ".jpeg")
DEPTH_SUFFIXES = (".png", ".npy", ".exr")
NORMALS_SUFFIXES = (".png", ".npy")
INFO_FILE = "dataset.json"


_X_FLIP = np.array([-1.0, 1.0, 1.0])
#: The axes of `normals/` ground truth (and of the training targets): Lotus / E2E-FT's.
NORMALS_AXES = LOTUS_AXES


def opengl_to_served_normals(normals: np.ndarray) -> np.ndarray:
    """`[..., 3]` normals in the OpenGL / Hypersim camera frame (+x right, +y up, +z towards the camera) ->
    the served convention (+x left): x changes sign. Its own inverse; zero vectors stay zero."""
    n = np.asarray(normals)
    if n.shape[-1:] != (3,):
        raise ValueError(f"normals must end in 3 components, got shape {n.shape}")
    return (n * _X_FLIP).astype(n.dtype if np.issubdtype(n.dtype, np.floating) else np.float32)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    depth_range: tuple[float, float]

    def __post_init__(self) -> None:
        lo, hi = self.depth_range
        if not (0.0 <= lo < hi):
            raise ValueError(f"depth_range must satisfy 0 <= min < max, got {self.depth_range}")


@dataclass
class RawSample:
    """One sample as decoded arrays, before augmentation: what every dataset reader produces."""

    rgb: np.ndarray  # float32 [H, W, 3] in [0, 1]
    depth: np.ndarray  # float32 [H, W] metres, 0 where invalid
    valid: np.ndarray  # bool [H, W]
    normals: np.ndarray | None  # float32 [H, W, 3] unit vectors, 0 where invalid
    normals_valid: np.ndarray | None  # bool [H, W]


def read_info(root: str | Path) -> DatasetInfo:
    path = Path(root) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a dataset folder needs name and depth_range")
    raw = json.loads(path.read_text())
    try:
        lo, hi = (float(x) for x in raw["depth_range"])
        return DatasetInfo(name=str(raw["name"]), depth_range=(lo, hi))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: expected {{'name': str, 'depth_range': [min, max]}}: {exc}") from exc


def write_info(root: str | Path, info: DatasetInfo) -> None:
    path = Path(root) / INFO_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": info.name, "depth_range": list(info.depth_range)}, indent=2) + "\n")


def list_names(root: str | Path) -> list[str]:
    """Sample names, sorted: the stems of the images in `rgb/`."""
    rgb_dir = Path(root) / "rgb"
    if not rgb_dir.is_dir():
        raise FileNotFoundError(f"{rgb_dir} is missing")
    return sorted(p.stem for p in rgb_dir.iterdir() if p.suffix.lower() in RGB_SUFFIXES)


def find_file(folder: Path, name: str, suffixes: tuple[str, ...]) -> Path | None:
    """The one file `folder/name.<suffix>`; two candidates are an error rather than a silent choice."""
    found = [folder / f"{name}{s}" for s in suffixes if (folder / f"{name}{s}").is_file()]
    if len(found) > 1:
        raise ValueError(f"ambiguous sample {name!r} in {folder}: {[p.name for p in found]}")
    return found[0] if found else None


# --- images ---------------------------------------------------------------------------------------


def read_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def write_rgb(path: str | Path, rgb: np.ndarray) -> None:
    _check_shape(rgb, 3, "rgb")
    data = np.clip(np.rint(np.asarray(rgb, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    _save(Image.fromarray(data), path)


def read_png16(path: str | Path) -> np.ndarray:
    """A 16-bit grayscale PNG as uint16 (Pillow opens these as mode I;16 or I depending on the file)."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel 16-bit PNG, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        raise ValueError(f"{path}: an 8-bit PNG cannot hold depth; expected 16-bit")
    if arr.min() < 0 or arr.max() > 65535:
        raise ValueError(f"{path}: values outside the 16-bit range")
    return arr.astype(np.uint16)


def write_png16(path: str | Path, values: np.ndarray) -> None:
    arr = np.asarray(values)
    if arr.ndim != 2 or arr.dtype != np.uint16:
        raise ValueError(f"write_png16 needs a uint16 [H, W] array, got {arr.dtype} {arr.shape}")
    _save(Image.fromarray(arr), path)


# --- depth ----------------------------------------------------------------------------------------


def read_depth(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Depth in metres (float32, 0 where invalid) and its validity, from a .png (mm), .npy or .exr file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        mm = read_png16(path)
        valid = mm > 0
        depth = mm.astype(np.float32) / np.float32(DEPTH_PNG_UNITS_PER_METRE)
    elif suffix == ".npy":
        depth = np.load(path, allow_pickle=False)
        if depth.ndim != 2:
            raise ValueError(f"{path}: depth must be [H, W], got {depth.shape}")
        depth = depth.astype(np.float32)
        valid = np.isfinite(depth) & (depth > 0)
    elif suffix == ".exr":
        depth = _read_exr_depth(path)
        valid = np.isfinite(depth) & (depth > 0)
    else:
        raise ValueError(f"{path}: unknown depth format {suffix!r}; expected one of {DEPTH_SUFFIXES}")
    return np.where(valid, depth, np.float32(0.0)).astype(np.float32), valid


def write_depth(path: str | Path, depth: np.ndarray, valid: np.ndarray) -> None:
    """Write metres to .png (rounded to mm), .npy or .exr; invalid pixels are stored as 0."""
    path = Path(path)
    _check_shape(depth, None, "depth")
    d = np.where(valid, np.asarray(depth, dtype=np.float64), 0.0)
    suffix = path.suffix.lower()
    if suffix == ".png":
        mm = np.rint(d * DEPTH_PNG_UNITS_PER_METRE)
        if mm.max(initial=0.0) > 65535:
            raise ValueError(f"{path}: depth above {65535 / DEPTH_PNG_UNITS_PER_METRE} m does not fit a 16-bit mm PNG")
        if np.any(valid & (mm <= 0)):
            raise ValueError(f"{path}: valid depth below 0.5 mm would read back as invalid")
        write_png16(path, mm.astype(np.uint16))
    elif suffix == ".npy":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, d.astype(np.float32), allow_pickle=False)
    elif suffix == ".exr":
        _write_exr_depth(path, d.astype(np.float32))
    else:
        raise ValueError(f"{path}: unknown depth format {suffix!r}; expected one of {DEPTH_SUFFIXES}")


def _openexr() -> ModuleType:
    try:
        import OpenEXR
    except ImportError as exc:
        raise RuntimeError("EXR depth needs the optional package OpenEXR (pip install 'OpenEXR>=3.2')") from exc
    return OpenEXR


def _read_exr_depth(path: Path) -> np.ndarray:
    exr = _openexr()
    with exr.File(str(path)) as f:
        channels = f.channels()
        key = next((k for k in ("Z", "Y", "R", "depth", "RGB", "RGBA") if k in channels), None)
        if key is None and len(channels) != 1:
            raise ValueError(f"{path}: no depth channel (Z, Y, R or depth) among {sorted(channels)}")
        pixels = np.array(channels[key].pixels if key is not None else next(iter(channels.values())).pixels)
    if pixels.ndim == 3:  # merged RGB(A): depth replicated or in R
        pixels = pixels[..., 0]
    return pixels.astype(np.float32)


def _write_exr_depth(path: Path, depth: np.ndarray) -> None:
    exr = _openexr()
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"compression": exr.ZIP_COMPRESSION, "type": exr.scanlineimage}
    exr.File(header, {"Z": np.ascontiguousarray(depth, dtype=np.float32)}).write(str(path))


# --- masks and normals ----------------------------------------------------------------------------


def read_mask(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return arr != 0


def write_mask(path: str | Path, valid: np.ndarray) -> None:
    _check_shape(valid, None, "mask")
    _save(Image.fromarray(np.where(valid, 255, 0).astype(np.uint8)), path)


def read_normals(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals (float32 [H, W, 3], 0 where invalid) and their validity, from .png or .npy."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        n = rgb.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        # 8-bit unit vectors decode to length 1 +- 0.01; (0, 0, 0) decodes to length 1.73 and marks invalid.
        length = np.linalg.norm(n, axis=-1)
        valid = np.abs(length - 1.0) < 0.1
    elif suffix == ".npy":
        n = np.load(path, allow_pickle=False).astype(np.float32)
        if n.ndim != 3 or n.shape[-1] != 3:
            raise ValueError(f"{path}: normals must be [H, W, 3], got {n.shape}")
        finite = np.isfinite(n).all(axis=-1)
        n = np.where(finite[..., None], n, np.float32(0.0))
        length = np.linalg.norm(n, axis=-1)
        valid = finite & (length > 0.5)
    else:
        raise ValueError(f"{path}: unknown normals format {suffix!r}; expected one of {NORMALS_SUFFIXES}")
    # Vectors already unit to float32 precision are kept bit for bit; the rest are normalised.
    unit = np.where((np.abs(length - 1.0) < 1e-6)[..., None], n, n / np.maximum(length, 1e-6)[..., None])
    return np.where(valid[..., None], unit, np.float32(0.0)).astype(np.float32), valid


def write_normals(path: str | Path, normals: np.ndarray, valid: np.ndarray) -> None:
    path = Path(path)
    _check_shape(normals, 3, "normals")
    n = np.where(valid[..., None], np.asarray(normals, dtype=np.float64), 0.0)
    suffix = path.suffix.lower()
    if suffix == ".png":
        rgb = np.clip(np.rint((n + 1.0) * 127.5), 0, 255).astype(np.uint8)
        rgb[~valid] = 0
        _save(Image.fromarray(rgb), path)
    elif suffix == ".npy":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, n.astype(np.float32), allow_pickle=False)
    else:
        raise ValueError(f"{path}: unknown normals format {suffix!r}; expected one of {NORMALS_SUFFIXES}")


# --- whole samples --------------------------------------------------------------------------------


def read_sample(root: str | Path, name: str) -> RawSample:
    root = Path(root)
    rgb_path = find_file(root / "rgb", name, RGB_SUFFIXES)
    depth_path = find_file(root / "depth", name, DEPTH_SUFFIXES)
    if rgb_path is None or depth_path is None:
        raise FileNotFoundError(f"sample {name!r} in {root} needs rgb/{name}.png and depth/{name}.(png|npy|exr)")
    rgb = read_rgb(rgb_path)
    depth, valid = read_depth(depth_path)
    hw = rgb.shape[:2]
    _check_hw(depth, hw, depth_path)
    mask_path = find_file(root / "mask", name, (".png",))
    if mask_path is not None:
        mask = read_mask(mask_path)
        _check_hw(mask, hw, mask_path)
        valid &= mask
        depth = np.where(valid, depth, np.float32(0.0))
    normals = normals_valid = None
    normals_path = find_file(root / "normals", name, NORMALS_SUFFIXES)
    if normals_path is not None:
        normals, normals_valid = read_normals(normals_path)
        _check_hw(normals, hw, normals_path)
        if mask_path is not None:
            normals_valid &= mask
            normals = np.where(normals_valid[..., None], normals, np.float32(0.0))
    return RawSample(rgb=rgb, depth=depth, valid=valid, normals=normals, normals_valid=normals_valid)


def write_sample(
    root: str | Path,
    name: str,
    rgb: np.ndarray,
    depth: np.ndarray,
    valid: np.ndarray,
    normals: np.ndarray | None = None,
    depth_format: DepthFormat = "npy",
    normals_format: NormalsFormat = "npy",
    write_mask_file: bool = True,
) -> None:
    """Write one sample; `valid` goes both into the depth (as 0) and, by default, into mask/NAME.png."""
    root = Path(root)
    write_rgb(root / "rgb" / f"{name}.png", rgb)
    write_depth(root / "depth" / f"{name}.{depth_format}", depth, valid)
    if write_mask_file:
        write_mask(root / "mask" / f"{name}.png", valid)
    if normals is not None:
        write_normals(root / "normals" / f"{name}.{normals_format}", normals, valid)


def _check_shape(arr: np.ndarray, channels: int | None, what: str) -> None:
    ok = arr.ndim == 2 if channels is None else (arr.ndim == 3 and arr.shape[-1] == channels)
    if not ok:
        want = "[H, W]" if channels is None else f"[H, W, {channels}]"
        raise ValueError(f"{what} must be {want}, got {arr.shape}")


def _check_hw(arr: np.ndarray, hw: tuple[int, ...], path: Path) -> None:
    if arr.shape[:2] != hw:
        raise ValueError(f"{path}: size {arr.shape[:2]} does not match the image {hw}")


def _save(image: Image.Image, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
