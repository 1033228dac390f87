"""Output encoders and input decoders at real sizes: which one the service should use, and what it costs.

    .venv/bin/python -m load_tests.bench_codecs [--sizes 1920x1080,3840x2160] [--repeat 5] [--out FILE]

Maps are what the service answers (see `maps`): 16-bit depth, 8-bit RGB normals and the 8-bit colour preview.
Every PNG is decoded back with Pillow and compared, so a fast encoder that writes something else is caught.
Time is the median of `--repeat` single-threaded runs; size is relative to Pillow's default (level 6).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image

SIZES = {"640x480": (480, 640), "1920x1080": (1080, 1920), "3840x2160": (2160, 3840)}
Encoder = Callable[[np.ndarray], bytes]


@dataclass(frozen=True)
class Row:
    what: str
    size: str
    encoder: str
    ms: float
    bytes: int
    ratio_to_pillow6: float


def _pillow(level: int, strategy: int | None = None) -> Encoder:
    def encode(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        opts: dict[str, int] = {"compress_level": level}
        if strategy is not None:
            opts["compress_type"] = strategy
        Image.fromarray(a).save(buf, format="PNG", **opts)
        return buf.getvalue()

    return encode


def _opencv(level: int, strategy: int) -> Encoder | None:
    try:
        import cv2
    except ImportError:
        return None

    def encode(a: np.ndarray) -> bytes:
        img = a[..., ::-1] if a.ndim == 3 else a  # OpenCV wants BGR
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_STRATEGY, strategy])
        assert ok
        return buf.tobytes()

    return encode


def _imagecodecs(level: int, strategy: int | None = None, filt: int | None = None) -> Encoder | None:
    try:
        import imagecodecs
    except ImportError:
        return None
    return lambda a: bytes(imagecodecs.png_encode(a, level=level, strategy=strategy, filter=filt))


def _spng(level: int) -> Encoder | None:
    try:
        import imagecodecs
    except ImportError:
        return None
    return lambda a: bytes(imagecodecs.spng_encode(a, level=level))


def _service() -> Encoder:
    from service.codec import encode_png

    return encode_png


def encoders() -> dict[str, Encoder]:
    """Every candidate that imports here, by a name that says its settings."""
    found: dict[str, Encoder | None] = {f"pillow level {lv}": _pillow(lv) for lv in (0, 1, 3, 6, 9)}
    found["pillow level 1 rle"] = _pillow(1, 3)
    for lv, st in ((1, 3), (1, 0), (3, 0)):
        found[f"opencv level {lv} strategy {st}"] = _opencv(lv, st)
    for lv in (1, 2, 3, 6):
        found[f"imagecodecs libpng level {lv}"] = _imagecodecs(lv)
    found["imagecodecs libpng level 1 rle sub"] = _imagecodecs(1, 3, 16)
    found["imagecodecs libpng level 1 up"] = _imagecodecs(1, None, 32)
    found["imagecodecs libpng level 1 paeth"] = _imagecodecs(1, None, 128)
    found["imagecodecs libpng level 1 sub+up"] = _imagecodecs(1, None, 16 | 32)
    for lv in (1, 3, 6):
        found[f"imagecodecs spng level {lv}"] = _spng(lv)
    found["dense-serve (service.codec.encode_png)"] = _service()
    return {name: enc for name, enc in found.items() if enc is not None}


def maps(height: int, width: int) -> dict[str, np.ndarray]:
    """The answers a client gets at this size: a rendered scene's exact depth (smooth planes, sharp edges), the
    shipped demo model's depth at 768 px resized back (a real network's output: fine-grained, hard to
    compress), rendered normals at 768 px resized back, and the demo depth's colour preview."""
    import torch
    import torch.nn.functional as F

    from load_tests.bench_sizes import DEMO, photo
    from models.loading import load_model
    from models.spec import resolve_spec
    from models.training.synthetic import generate
    from service.codec import colorize, quantize_normals, quantize_unit

    def upsample(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x)).float()
        t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
        return F.interpolate(t, (height, width), mode="bilinear")[0].permute(1, 2, 0).squeeze(-1).numpy()

    full = generate(7, height, width)
    disp = np.where(full.valid, 1.0 / np.maximum(full.depth, 1e-3), 0.0)
    rendered = (disp - disp.min()) / max(float(disp.max() - disp.min()), 1e-6)
    low = generate(7, max(8, height * 768 // max(height, width)), max(8, width * 768 // max(height, width)))
    normals = upsample(low.normals)
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-6)
    demo = load_model(resolve_spec(str(DEMO))).predict([photo(height, width, seed=7)], processing_res=768)[0].array
    found = {
        "depth u16 (rendered)": quantize_unit(rendered),
        "depth u16 (demo model, 768 px)": quantize_unit(demo),
        "normals u8 (rendered, 768 px)": quantize_normals(normals),
        "colour u8 (demo model, 768 px)": colorize(demo),
    }
    return {name: np.ascontiguousarray(a) for name, a in found.items()}


def _time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def bench_encoders(sizes: list[str], repeat: int) -> list[Row]:
    rows: list[Row] = []
    encs = encoders()
    for size in sizes:
        for what, arr in maps(*SIZES[size]).items():
            reference = len(_pillow(6)(arr))
            for name, enc in encs.items():
                data = enc(arr)
                back = np.asarray(Image.open(io.BytesIO(data)))
                if back.dtype != arr.dtype or not np.array_equal(back, arr):
                    raise AssertionError(f"{name} did not round-trip {what} at {size}")
                ms = _time(partial(enc, arr), repeat)
                rows.append(Row(what, size, name, ms, len(data), len(data) / reference))
    return rows


def bench_threads(size: str, batch: int, threads: list[int]) -> list[tuple[int, float]]:
    """A batch of maps encoded by the service's encoder on N threads: does it scale (GIL released)?"""
    from service.codec import encode_png

    arr = maps(*SIZES[size])["depth u16 (demo model, 768 px)"]
    out = []
    for n in threads:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(encode_png, [arr] * batch))  # warm
            ms = _time(lambda pool=pool: list(pool.map(encode_png, [arr] * batch)), 3)
        out.append((n, ms))
    return out


def _pillow_decode(data: bytes, draft: tuple[int, int] | None = None) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    if draft:
        img.draft("RGB", draft)
    return np.asarray(img.convert("RGB"))


def decoders(jpeg: bytes, png: bytes, h: int, w: int) -> dict[str, Callable[[], object]]:
    from service.codec import decode_pixels

    half = (w // 2, h // 2)
    found: dict[str, Callable[[], object]] = {
        "pillow jpeg": partial(_pillow_decode, jpeg),
        "pillow jpeg, draft 1/2": partial(_pillow_decode, jpeg, half),
        "pillow png": partial(_pillow_decode, png),
        "dense-serve jpeg (simplejpeg)": partial(decode_pixels, jpeg),
        "dense-serve jpeg at a 1/2 DCT scale": partial(decode_pixels, jpeg, min_size=(h // 2, w // 2)),
        "dense-serve png": partial(decode_pixels, png),
    }
    try:
        import cv2

        found["opencv jpeg"] = partial(cv2.imdecode, np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    except ImportError:
        pass
    return found


def bench_decoders(sizes: list[str], repeat: int) -> list[tuple[str, str, float]]:
    """Photo-like JPEG (quality 90) and PNG decode to uint8 RGB."""
    from load_tests.bench_sizes import encoded, photo

    rows = []
    for size in sizes:
        h, w = SIZES[size]
        rgb = photo(h, w, seed=3)
        jpeg, png = encoded(rgb, "jpeg"), encoded(rgb, "png")
        for name, fn in decoders(jpeg, png, h, w).items():
            rows.append((f"{size} ({len(jpeg) // 1024} KB JPEG)", name, _time(fn, repeat)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1920x1080,3840x2160")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", help="also write the Markdown tables here")
    args = ap.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    lines = ["| map | size | encoder | ms | bytes | size vs Pillow 6 |", "|---|---|---|---:|---:|---:|"]
    for r in bench_encoders(sizes, args.repeat):
        lines.append(f"| {r.what} | {r.size} | {r.encoder} | {r.ms:.1f} | {r.bytes:,} | {r.ratio_to_pillow6:.2f} |")
    lines += ["", "| threads | batch of 8 x 1920x1080 depth, ms | speed-up |", "|---:|---:|---:|"]
    scaling = bench_threads("1920x1080", 8, [1, 2, 4])
    for n, ms in scaling:
        lines.append(f"| {n} | {ms:.1f} | {scaling[0][1] / ms:.2f}x |")
    lines += ["", "| size | decoder | ms |", "|---|---|---:|"]
    for size, name, ms in bench_decoders(sizes, args.repeat):
        lines.append(f"| {size} | {name} | {ms:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
