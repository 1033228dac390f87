"""Tiny checkpoints: real classes and config keys, small, and byte-for-byte reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.tiny import make_tiny
from tests.conftest import COMBOS


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("family", "task"), COMBOS)
def test_classes_and_config_keys(tiny_dir, family, task) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = tiny_dir(family, task)
    size = sum(len(b) for b in _files(path).values())
    assert size < 5_000_000
    unet = json.loads((path / "unet" / "config.json").read_text())
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    index = json.loads((path / "model_index.json").read_text())
    assert unet["_class_name"] == "UNet2DConditionModel"
    assert unet["in_channels"] == (4 if family == "lotus-d" else 8)
    if family.startswith("lotus"):
        assert unet["class_embed_type"] == "projection"
        assert unet["projection_class_embeddings_input_dim"] == 4
        assert sched["prediction_type"] == "sample"
        pipeline = "DirectDiffusionY0Pipeline" if family == "lotus-g" else "DirectRegressionPipeline"
        assert index["_class_name"] == pipeline
    else:
        assert unet["class_embed_type"] is None
        assert sched["prediction_type"] == "v_prediction"
        assert sched["timestep_spacing"] == "trailing" and sched["set_alpha_to_one"] is True
        assert index["_class_name"] == ("MarigoldDepthPipeline" if task == "depth" else "MarigoldNormalsPipeline")
    vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert isinstance(UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True), UNet2DConditionModel)
    assert isinstance(CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True), CLIPTextModel)
    tok = CLIPTokenizer.from_pretrained(path / "tokenizer")
    assert tok("", padding="do_not_pad").input_ids == [tok.bos_token_id, tok.eos_token_id]
    assert len(tok("a photo").input_ids) > 2


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = _files(make_tiny(tmp_path / "a", "lotus-g", "depth", seed=1))
    b = _files(make_tiny(tmp_path / "b", "lotus-g", "depth", seed=1))
    c = _files(make_tiny(tmp_path / "c", "lotus-g", "depth", seed=2))
    assert a == b
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert a[weights] != c[weights]
    assert {k for k in a if not k.endswith(".safetensors")} == {k for k in c if not k.endswith(".safetensors")}


def test_make_tiny_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    assert main(["make-tiny", str(tmp_path / "m"), "--family", "e2e-ft", "--task", "normals", "--seed", "3"]) == 0
    assert "random weights" in capsys.readouterr().out
    assert (tmp_path / "m" / "model_index.json").is_file()
