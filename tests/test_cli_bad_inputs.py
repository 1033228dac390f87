"""`dense-serve predict` run in-process on a tiny checkpoint, with good and bad image files mixed.

Bad files are reported as one `error: PATH: reason` line each on stderr, good files still get their
outputs, and the exit code is 1 when anything failed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli import main

MAX_PIXELS = 5000


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "lotus-d-depth", "lotus-d", "depth")


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encoded(arr: np.ndarray, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _good_images(folder: Path) -> dict[Path, tuple[int, int]]:
    """Good inputs -> their (width, height); all within MAX_PIXELS."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        _write(folder / "photo.png", _encoded(_noise(48, 64, 1), "PNG")): (64, 48),
        _write(folder / "snap.jpg", _encoded(_noise(64, 40, 2), "JPEG", quality=90)): (40, 64),
        _write(folder / "odd.png", _encoded(_noise(53, 37, 3), "PNG")): (37, 53),
        _write(folder / "gray.bmp", _encoded(_noise(30, 50, 4)[:, :, 0], "BMP")): (50, 30),
    }


def _bad_images(folder: Path) -> dict[Path, str]:
    """Bad inputs -> a substring their error reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    png = _encoded(_noise(64, 64, 5), "PNG")
    jpeg = _encoded(_noise(64, 64, 6), "JPEG", quality=90)  # half of it is inside the scan data
    return {
        _write(folder / "corrupt.png", np.random.default_rng(7).bytes(3000)): "not a recognised image",
        _write(folder / "cut.png", png[: len(png) // 2]): "truncated",
        _write(folder / "cut.jpg", jpeg[: len(jpeg) // 2]): "truncated",
        _write(folder / "empty.jpg", b""): "empty file",
        _write(folder / "huge.png", _encoded(_noise(60, 100, 8), "PNG")): f"over the limit of {MAX_PIXELS}",
        folder / "missing.png": "cannot read file",
    }


def _predict(model: Path, images: list[Path], out: Path, *extra: str) -> int:
    argv = ["predict", *map(str, images), "--model", str(model), "--out", str(out), "--processing-res", "64"]
    return main([*argv, *extra])


def _error_lines(stderr: str) -> list[str]:
    # splitlines() also splits on the '\r' tqdm uses to redraw its bar.
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _check_depth_png(path: Path, size: tuple[int, int]) -> None:
    assert path.is_file(), path
    img = Image.open(path)
    assert img.format == "PNG" and img.mode == "I;16", (path, img.mode)
    assert img.size == size, (path, img.size, size)


@pytest.fixture(scope="module")
def predictor(tiny_model: Path):
    """The same checkpoint loaded directly: what each written map must equal."""
    from models.loading import load_model
    from models.spec import resolve_spec

    return load_model(resolve_spec(str(tiny_model)))


def _check_matches_model(predictor, output: Path, source: Path) -> None:
    """The 16-bit PNG written for `source` decodes to the model's own depth map of that image."""
    from service import codec

    expected = predictor.predict([codec.decode_image(source)], processing_res=64)[0].array
    written = np.asarray(Image.open(output), dtype=np.int64)
    assert written.shape == expected.shape, (output, source)
    assert np.abs(written - codec.quantize_unit(expected).astype(np.int64)).max() <= 1, (output, source)


def test_mixed_good_and_bad_inputs(
    tiny_model: Path, predictor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _good_images(tmp_path / "in")
    bad = _bad_images(tmp_path / "in")
    good_paths, bad_paths = list(good), list(bad)
    # Interleave, bad first and last; batch size 1 makes several decode chunks (8 files each).
    images = [bad_paths[0], good_paths[0], bad_paths[1], bad_paths[2], good_paths[1], good_paths[2]]
    images += [bad_paths[3], good_paths[3], bad_paths[4], bad_paths[5]]
    out = tmp_path / "out"

    rc = _predict(tiny_model, images, out, "--max-pixels", str(MAX_PIXELS), "--batch-size", "1")
    captured = capsys.readouterr()

    assert rc == 1
    for path, size in good.items():
        _check_depth_png(out / f"{path.stem}_depth.png", size)
        _check_matches_model(predictor, out / f"{path.stem}_depth.png", path)
    # Exactly the good images' outputs, nothing for the bad ones.
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}_depth.png" for p in good)

    errors = _error_lines(captured.err)
    assert len(errors) == len(bad), captured.err
    for path, reason in bad.items():
        mine = [line for line in errors if line.startswith(f"error: {path}: ")]
        assert len(mine) == 1, (path, errors)
        assert reason in mine[0], mine[0]
    for path in good:
        assert not any(f" {path}:" in line for line in errors), path
    assert f"{len(good)} of {len(images)} images" in captured.out


def test_all_good_inputs_exit_zero(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _good_images(tmp_path / "in")
    out = tmp_path / "out"
    rc = _predict(tiny_model, list(good), out)
    captured = capsys.readouterr()
    assert rc == 0
    assert _error_lines(captured.err) == []
    for path, size in good.items():
        _check_depth_png(out / f"{path.stem}_depth.png", size)
    assert f"{len(good)} of {len(good)} images" in captured.out


def test_only_bad_inputs_exit_one_and_write_nothing(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _bad_images(tmp_path / "in")
    out = tmp_path / "out"
    rc = _predict(tiny_model, list(bad), out, "--max-pixels", str(MAX_PIXELS))
    captured = capsys.readouterr()
    assert rc == 1
    assert list(out.iterdir()) == []
    assert len(_error_lines(captured.err)) == len(bad)
    assert f"0 of {len(bad)} images" in captured.out


def test_all_three_formats(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = {p: s for p, s in _good_images(tmp_path / "in").items() if p.stem in ("odd", "snap")}
    bad = tmp_path / "in" / "empty.png"
    bad.write_bytes(b"")
    out = tmp_path / "out"

    rc = _predict(tiny_model, [*good, bad], out, "--format", "png,npy,color")
    captured = capsys.readouterr()

    assert rc == 1
    assert _error_lines(captured.err) == [f"error: {bad}: empty file (0 bytes)"]
    expected = set()
    for path, (w, h) in good.items():
        stem = path.stem
        expected |= {f"{stem}_depth.png", f"{stem}_depth.npy", f"{stem}_depth_color.png"}
        _check_depth_png(out / f"{stem}_depth.png", (w, h))
        arr = np.load(out / f"{stem}_depth.npy", allow_pickle=False)
        assert arr.dtype == np.float32 and arr.shape == (h, w)
        assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0
        color = Image.open(out / f"{stem}_depth_color.png")
        assert color.mode == "RGB" and color.size == (w, h)
        # The 16-bit PNG and the npy hold the same map.
        png16 = np.asarray(Image.open(out / f"{stem}_depth.png"), dtype=np.float64) / 65535.0
        assert np.abs(png16 - arr).max() <= 0.5 / 65535 + 1e-6
    assert {p.name for p in out.iterdir()} == expected


def test_jpeg_truncated_in_its_headers_is_reported_not_fatal(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _good_images(tmp_path / "in")
    jpeg = _encoded(_noise(23, 31, 9), "JPEG")
    cut = _write(tmp_path / "in" / "header-cut.jpg", jpeg[: len(jpeg) // 2])  # cut inside its tables
    out = tmp_path / "out"
    rc = _predict(tiny_model, [cut, *good], out)
    captured = capsys.readouterr()
    assert rc == 1
    assert [line.split(": ")[1] for line in _error_lines(captured.err)] == [str(cut)]
    for path, size in good.items():
        _check_depth_png(out / f"{path.stem}_depth.png", size)


def test_every_input_gets_its_own_output(
    tiny_model: Path, predictor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sizes = [(40, 24), (24, 40), (32, 32)]
    paths = [tmp_path / "x" / "a.png", tmp_path / "y" / "a.png", tmp_path / "a-1.png"]
    for i, (path, (w, h)) in enumerate(zip(paths, sizes, strict=True)):
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, _encoded(_noise(h, w, 10 + i), "PNG"))
    out = tmp_path / "out"
    assert _predict(tiny_model, paths, out) == 0
    capsys.readouterr()
    # y/a.png and a-1.png must not both write a-1_depth.png: a name already taken gets -1, -2, ... appended.
    names = ["a_depth.png", "a-1_depth.png", "a-1-1_depth.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for path, size, name in zip(paths, sizes, names, strict=True):
        _check_depth_png(out / name, size)
        _check_matches_model(predictor, out / name, path)  # its own input's map, not a neighbour's
