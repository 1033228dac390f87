"""The README quickstart: tiny checkpoints, `dense-serve predict` on the shipped sample, PNG/NPY out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.inference import BatchItem
from service import codec
from service.cli import main
from service.worker.float_maps import decode_exr, decode_tiff
from service.worker.prepare import decode_for
from tests.conftest import SAMPLE


@pytest.mark.parametrize(("family", "task"), [("lotus-g", "depth"), ("lotus-g", "normals"), ("e2e-ft", "depth")])
def test_predict_sample_writes_every_format(tiny_dir, tiny_model, tmp_path: Path, capsys, family, task) -> None:
    out = tmp_path / "out"
    rc = main(
        [
            "predict",
            str(SAMPLE),
            "--model",
            str(tiny_dir(family, task)),
            "--processing-res",
            "64",
            "--format",
            "png,npy,color",
            "--out",
            str(out),
            "--seed",
            "3",
        ]
    )
    assert rc == 0
    assert f"1 of 1 images -> {out}" in capsys.readouterr().out
    w, h = Image.open(SAMPLE).size
    arr = np.load(out / f"sample_{task}.npy")
    png = Image.open(out / f"sample_{task}.png")
    color = Image.open(out / f"sample_{task}_color.png")
    assert png.size == color.size == (w, h)
    assert color.mode == "RGB"
    # The map is the model's own, called directly on the same image with the same seed and resolution.
    direct = tiny_model(family, task).predict([codec.decode_image(SAMPLE)], processing_res=64, seeds=3)[0].array
    np.testing.assert_allclose(arr, direct, atol=1e-5, rtol=0)
    if task == "normals":
        assert arr.shape == (h, w, 3) and png.mode == "RGB"
        back = np.asarray(png, dtype=np.float32) / 255 * 2 - 1
        assert np.abs(back - arr).max() <= 1 / 255 + 1e-6
    else:
        assert arr.shape == (h, w) and png.mode.startswith("I")
        assert np.abs(np.asarray(png, dtype=np.float64) / 65535 - arr).max() <= 0.5 / 65535 + 1e-6


def test_predict_many_images_in_batches_matches_single(tiny_dir, tmp_path: Path, capsys) -> None:
    src = Image.open(SAMPLE)
    paths = []
    for i, size in enumerate([(64, 48), (64, 48), (53, 37), (64, 48), (80, 60)]):
        p = tmp_path / "in" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        src.resize(size).save(p)
        paths.append(str(p))
    model = str(tiny_dir("lotus-d", "depth"))
    assert (
        main(
            [
                "predict",
                *paths,
                "--model",
                model,
                "--processing-res",
                "64",
                "--batch-size",
                "3",
                "--format",
                "npy",
                "--out",
                str(tmp_path / "batched"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                paths[3],
                "--model",
                model,
                "--processing-res",
                "64",
                "--batch-size",
                "1",
                "--format",
                "npy",
                "--out",
                str(tmp_path / "single"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    np.testing.assert_allclose(
        np.load(tmp_path / "batched" / "img3_depth.npy"),
        np.load(tmp_path / "single" / "img3_depth.npy"),
        atol=1e-5,
        rtol=0,
    )
    assert len(list((tmp_path / "batched").iterdir())) == 5


def test_usage_errors(tiny_dir, tmp_path: Path, capsys) -> None:
    # A bad parameter is refused by the shared request model before any model is read: status 2, the field named.
    assert main(["predict", str(SAMPLE), "--model", "x", "--out", str(tmp_path), "--processing-res", "100"]) == 2
    assert "processing_res" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", str(SAMPLE), "--model", "x", "--out", str(tmp_path), "--format", "jpeg"])
    assert main(["predict", str(SAMPLE), "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_prints_a_table_with_ratios(tiny_dir, capsys) -> None:
    rc = main(
        [
            "bench",
            "--model",
            str(tiny_dir("lotus-d", "depth")),
            "--resolutions",
            "32",
            "--batch-sizes",
            "1,2",
            "--images",
            "2",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "| 32 | 1 | 2 |" in out and "| 32 | 2 | 2 |" in out and "1.00x" in out


def test_models_lists_the_shipped_specs(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "GonzaloMG/marigold-e2e-ft-depth" in out and "jingheya/lotus-normal-g-v1-1" in out


def test_predict_many_real_size_jpegs_in_every_format(tiny_dir, tiny_model, tmp_path: Path, capsys) -> None:
    """A folder of 1080p photos: decoded ahead and encoded behind the model on a thread pool, each output equal
    to the float map it came from (EXR within half precision, TIFF exactly), and that map the model's own."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        small = rng.integers(0, 256, (27, 48, 3), dtype=np.uint8)
        path = tmp_path / f"photo{i}.jpg"
        Image.fromarray(small).resize((1920, 1080), Image.BILINEAR).save(path, quality=90)
        paths.append(str(path))
    out = tmp_path / "maps"
    args = ["predict", *paths, "--model", str(tiny_dir("lotus-d", "depth")), "--processing-res", "64"]
    assert main([*args, "--format", "npy,png,exr,tiff", "--out", str(out), "--batch-size", "2"]) == 0
    assert "5 of 5 images" in capsys.readouterr().out
    model = tiny_model("lotus-d", "depth")
    for i in range(5):
        values = np.load(out / f"photo{i}_depth.npy")
        assert values.shape == (1080, 1920)
        # The model called directly on the photo's pixels as the CLI decodes them (a JPEG at a reduced DCT scale,
        # never below the processing size) ...
        pixels, geometry = decode_for(model, Path(paths[i]), 64)
        (direct,) = model.predict_items([BatchItem(pixels, geometry, model.resolve_seed(None))])
        np.testing.assert_allclose(values, direct.array, atol=1e-5, rtol=0)
        # ... and close to the map of the photo decoded at full size.
        full = model.predict([codec.decode_image(paths[i])], processing_res=64)[0].array
        assert np.abs(values - full).max() < 0.01
        png = np.asarray(Image.open(out / f"photo{i}_depth.png"))
        assert np.array_equal(png, codec.quantize_unit(values))
        assert np.abs(decode_exr((out / f"photo{i}_depth.exr").read_bytes()) - values).max() <= 2**-11
        assert np.array_equal(decode_tiff((out / f"photo{i}_depth.tiff").read_bytes()), values)
    # One format: the map leaves the device already quantised, and the bytes are the same.
    alone = tmp_path / "alone"
    assert main([*args, "--format", "png", "--out", str(alone), "--batch-size", "2"]) == 0
    for i in range(5):
        assert (alone / f"photo{i}_depth.png").read_bytes() == (out / f"photo{i}_depth.png").read_bytes()
