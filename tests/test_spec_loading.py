"""Model specs, family/task detection, mismatches, hub ids offline, devices and dtypes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.detect import CheckpointConfig, identify
from models.errors import ModelLoadError, SpecError
from models.loading import load_model, pick_device, pick_dtype, resolve_source
from models.spec import ModelSpec, load_spec_file, resolve_spec, shipped_specs
from tests.conftest import COMBOS, REPO


@pytest.mark.parametrize(("family", "task"), COMBOS)
def test_detects_family_and_task_from_checkpoint(tiny_dir, family, task) -> None:
    path = tiny_dir(family, task)
    ident = identify(ModelSpec(id="x", source=str(path)), CheckpointConfig.read(path))
    assert (ident.family, ident.task, ident.output_kind) == (family, task, task)


def test_lotus_unet_detected_without_pipeline_class(tiny_dir, tmp_path: Path) -> None:
    path = shutil.copytree(tiny_dir("lotus-d", "depth"), tmp_path / "renamed-depth")
    index = json.loads((path / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (path / "model_index.json").write_text(json.dumps(index))
    ident = identify(ModelSpec(id="x", source=str(path)), CheckpointConfig.read(path))
    assert ident.family == "lotus-d"


def test_spec_overrides_output_kind_to_disparity(tiny_dir) -> None:
    spec = resolve_spec(str(tiny_dir("lotus-g", "depth")), output_kind="disparity")
    model = load_model(spec)
    from tests.conftest import random_image

    pred = model.predict([random_image(32, 32)], processing_res=32)[0]
    assert pred.kind == "disparity" and pred.near_is_high and pred.affine_invariant


@pytest.mark.parametrize(
    ("checkpoint", "declared", "message"),
    [
        (("lotus-d", "depth"), "lotus-g", "in_channels=8"),
        (("lotus-g", "depth"), "lotus-d", "in_channels=4"),
        (("lotus-g", "depth"), "e2e-ft", "v_prediction"),
        (("e2e-ft", "depth"), "lotus-g", "projection"),
    ],
)
def test_family_mismatch_is_a_clear_load_error(tiny_dir, checkpoint, declared, message) -> None:
    spec = resolve_spec(str(tiny_dir(*checkpoint)), family=declared)
    with pytest.raises(ModelLoadError, match=message) as err:
        load_model(spec)
    assert f"does not match family {declared}" in str(err.value)


def test_task_contradiction_and_undetectable_task(tiny_dir, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="e2e-ft predicts depth or normals"):
        load_model(resolve_spec(str(tiny_dir("e2e-ft", "depth")), output_kind="disparity"))
    anonymous = shutil.copytree(tiny_dir("lotus-d", "normals"), tmp_path / "ckpt")
    with pytest.raises(ModelLoadError, match="cannot detect the task"):
        load_model(resolve_spec(str(anonymous)))
    model = load_model(resolve_spec(str(anonymous), task="normals"))
    assert model.output_kind == "normals"


def test_incomplete_or_missing_folder(tiny_dir, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_dir("lotus-d", "depth"), tmp_path / "broken-depth")
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelLoadError, match=r"missing: unet"):
        load_model(resolve_spec(str(broken)))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(ModelSpec(id="gone", source=str(tmp_path / "nowhere" / "x")))


def test_spec_files_and_resolution(tiny_dir, tmp_path: Path) -> None:
    ckpt = tiny_dir("lotus-g", "normals")
    shutil.copytree(ckpt, tmp_path / "weights")
    (tmp_path / "mine.toml").write_text('source = "weights"\ntask = "normals"\nprocessing_res = 96\nseed = 5\n')
    spec = load_spec_file(tmp_path / "mine.toml")
    assert spec.id == "mine" and Path(spec.source) == (tmp_path / "weights").resolve()
    model = load_model(spec)
    assert (model.family, model.output_kind, model.processing_res, model.default_seed) == ("lotus-g", "normals", 96, 5)
    (tmp_path / "bad.toml").write_text('source = "x"\nprocessing_res = 100\n')
    with pytest.raises(SpecError, match="multiple of 8"):
        load_spec_file(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text('source = "x"\nfamliy = "lotus-g"\n')
    with pytest.raises(SpecError, match="famliy"):
        load_spec_file(tmp_path / "typo.toml")
    with pytest.raises(SpecError, match="unknown model 'no such thing'"):
        resolve_spec("no such thing")


def test_shipped_specs_name_the_documented_hub_checkpoints() -> None:
    specs = shipped_specs()
    expected = {
        "jingheya/lotus-depth-g-v2-1-disparity": ("lotus-g", "disparity"),
        "jingheya/lotus-depth-d-v2-0-disparity": ("lotus-d", "disparity"),
        "jingheya/lotus-normal-g-v1-1": ("lotus-g", "normals"),
        "jingheya/lotus-normal-d-v1-1": ("lotus-d", "normals"),
        "GonzaloMG/marigold-e2e-ft-depth": ("e2e-ft", "depth"),
        "GonzaloMG/marigold-e2e-ft-normals": ("e2e-ft", "normals"),
        "GonzaloMG/stable-diffusion-e2e-ft-depth": ("e2e-ft", "depth"),
        "GonzaloMG/stable-diffusion-e2e-ft-normals": ("e2e-ft", "normals"),
    }
    by_source = {s.source: (s.family, s.output_kind) for s in specs.values()}
    for source, fam_kind in expected.items():
        assert by_source[source] == fam_kind
    assert resolve_spec("marigold-e2e-ft-depth").source == "GonzaloMG/marigold-e2e-ft-depth"


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | env
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("mode", ["HF_HUB_OFFLINE", "unreachable"])
def test_hub_id_offline_is_a_clear_error(tmp_path: Path, mode: str) -> None:
    env = {"HF_HOME": str(tmp_path / "hf")}
    # Loopback only: port 9 (discard) is closed, so the hub client fails at once.
    env |= {"HF_HUB_OFFLINE": "1"} if mode == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": "http://127.0.0.1:9"}
    result = _cli(
        [
            "predict",
            str(REPO / "assets" / "sample.png"),
            "--model",
            "lotus-depth-g-v2-1-disparity",
            "--out",
            str(tmp_path / "o"),
        ],
        **env,
    )
    assert result.returncode == 2
    err = result.stderr.strip()
    assert "jingheya/lotus-depth-g-v2-1-disparity" in err
    assert ("source" in err and "local" in err.lower()) or "--model DIR" in err
    if mode == "HF_HUB_OFFLINE":
        assert "HF_HUB_OFFLINE" in err
    assert len(err.splitlines()) == 1


def test_device_and_dtype_choice() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert pick_dtype("fp32", torch.device("cuda")) == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            pick_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_cuda_close_to_fp32_cpu(tiny_dir) -> None:
    import numpy as np

    from tests.conftest import random_image

    spec = resolve_spec(str(tiny_dir("lotus-g", "depth")))
    img = random_image(64, 64)
    gpu = load_model(spec, device="cuda").predict([img], processing_res=64)[0].array
    cpu = load_model(spec, device="cpu").predict([img], processing_res=64)[0].array
    assert np.abs(gpu - cpu).max() < 5e-3


def test_hub_id_loads_from_the_hugging_face_cache_offline(tiny_dir, tmp_path: Path) -> None:
    """The hub path for real: a snapshot laid out as the hub client caches it, read with HF_HUB_OFFLINE=1."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--lotus-d-depth"
    shutil.copytree(tiny_dir("lotus-d", "depth"), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    out = tmp_path / "o"
    result = _cli(
        [
            "predict",
            str(REPO / "assets" / "sample.png"),
            "--model",
            f"tiny-org/lotus-d-depth@{revision}",
            "--processing-res",
            "64",
            "--out",
            str(out),
        ],
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
    )
    assert result.returncode == 0, result.stderr
    assert "lotus-d depth" in result.stdout
    assert (out / "sample_depth.png").is_file()
    # The same id without a revision is refused before the cache is read: hub ids must be pinned.
    unpinned = _cli(
        ["predict", str(REPO / "assets" / "sample.png"), "--model", "tiny-org/lotus-d-depth", "--out", str(out)],
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
    )
    assert unpinned.returncode == 2 and "without a pinned revision" in unpinned.stderr, unpinned.stderr
