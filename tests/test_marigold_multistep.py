"""Multi-step Marigold: diffusers' numbers for every step count, batched or not, ensembles, step batching,
step-change uncertainty, detection and the shipped hub specs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import MarigoldDepthPipeline, MarigoldNormalsPipeline
from safetensors.torch import load_file, save_file

from models.detect import CheckpointConfig, detect_family
from models.inference import BatchItem
from models.loading import load_model
from models.multistep import MultiStepPredictor
from models.spec import ModelSpec, shipped_specs
from tests.conftest import REPO, random_image

RES = 64
PARITY_ATOL = 1e-4
#: The module fixture loads three Marigold models and their pipelines: run first, by one worker (conftest.py).
pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def marigold(tiny_dir, tmp_path_factory):
    """Loaded tiny Marigold models (DDIM depth/normals as prs-eth v1-1, LCM depth as lcm-v1-0) and their
    diffusers pipelines."""
    from models.tiny import make_tiny

    root = tmp_path_factory.mktemp("marigold")
    dirs = {
        "depth": tiny_dir("marigold", "depth"),
        "normals": tiny_dir("marigold", "normals"),
        "lcm": make_tiny(root / "lcm", "marigold", "depth", scheduler="lcm"),
    }
    out = {}
    for name, path in dirs.items():
        cls = MarigoldNormalsPipeline if name == "normals" else MarigoldDepthPipeline
        pipe = cls.from_pretrained(path, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        out[name] = (path, load_model(ModelSpec(id=f"m-{name}", source=str(path))), pipe)
    return out


def reference(pipe, image: np.ndarray, steps: int, seed: int, ensemble: int = 1) -> np.ndarray:
    """diffusers, exactly as a user calls it (E members in one batch)."""
    out = pipe(
        torch.from_numpy(image).permute(2, 0, 1)[None],
        num_inference_steps=steps,
        ensemble_size=ensemble,
        batch_size=ensemble,
        processing_resolution=RES,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).prediction[0]
    return out[..., 0] if out.shape[-1] == 1 else out


def item(model: MultiStepPredictor, image: np.ndarray, seed: int, steps: int | None, ensemble: int = 1) -> BatchItem:
    return BatchItem(image, model.plan(image, RES), seed, True, "float32", steps, ensemble)


@pytest.mark.parametrize("name", ["depth", "normals", "lcm"])
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_one_image_equals_diffusers(marigold, name: str, steps: int) -> None:
    _, model, pipe = marigold[name]
    image = random_image(37, 53, seed=3)
    got = model.predict_batch([item(model, image, 7, steps)])[0]
    expected = reference(pipe, image, steps, 7)
    assert got.steps == steps and got.seed == 7 and got.array.shape == expected.shape
    np.testing.assert_allclose(got.array, expected, atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize("name", ["depth", "normals", "lcm"])
def test_batch_of_mixed_steps_equals_diffusers_per_image(marigold, name: str) -> None:
    """One batch, each job with its own steps and seed: one UNet call per step over the jobs still running."""
    _, model, pipe = marigold[name]
    images = [random_image(48, 64, seed=i) for i in range(3)]
    plan = [(1, 5), (4, 6), (10, 7)]
    got = model.predict_batch([item(model, im, seed, steps) for im, (steps, seed) in zip(images, plan, strict=True)])
    for im, (steps, seed), pred in zip(images, plan, got, strict=True):
        assert pred.steps == steps
        np.testing.assert_allclose(pred.array, reference(pipe, im, steps, seed), atol=PARITY_ATOL, rtol=0)
    # the step count matters (the parity above is not of a map that ignores it)
    assert np.abs(got[0].array - model.predict_batch([item(model, images[0], 5, 10)])[0].array).max() > 1e-3


def test_jobs_joining_and_leaving_between_steps_get_their_alone_result(marigold) -> None:
    _, model, _ = marigold["depth"]
    images = [random_image(48, 64, seed=10 + i) for i in range(3)]
    steps = (10, 3, 5)
    alone = [model.predict_batch([item(model, images[i], i, steps[i])])[0].array for i in range(3)]
    batch = model.stepper()
    batch.admit([("a", item(model, images[0], 0, 10))])
    finished = {}
    for k in range(12):
        if k == 2:
            batch.admit([("b", item(model, images[1], 1, 3))])  # joins at A's third step
        if k == 4:
            batch.admit([("c", item(model, images[2], 2, 5))])
        for done in batch.step():
            finished[done.trajectory.key] = model.finish_trajectory(done).array
    assert not batch.active and set(finished) == {"a", "b", "c"}
    for key, expected in zip("abc", alone, strict=True):
        np.testing.assert_allclose(finished[key], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["depth", "normals"])
def test_ensemble_uses_diffusers_alignment_and_reduction(marigold, name: str) -> None:
    _, model, pipe = marigold[name]
    image = random_image(40, 56, seed=4)
    got = model.predict_batch([item(model, image, 3, 4, ensemble=4)])[0]
    assert got.extra["ensemble_size"] == 4
    np.testing.assert_allclose(got.array, reference(pipe, image, 4, 3, ensemble=4), atol=1e-3, rtol=0)


def _frozen_copy(src: Path, dst: Path) -> Path:
    """A Marigold whose UNet predicts x0 from the image alone: its steps cannot change the prediction."""
    shutil.copytree(src, dst)
    sched = dst / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    sched.write_text(json.dumps({**cfg, "prediction_type": "sample"}))
    weights = dst / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_in.weight"][:, 4:] = 0.0  # blind to the current latent
    state["time_embedding.linear_2.weight"].zero_()  # and to the timestep
    state["time_embedding.linear_2.bias"].zero_()
    save_file(state, weights)
    return dst


def test_step_change_is_zero_when_steps_do_not_change_the_prediction(marigold, tmp_path) -> None:
    path, model, _ = marigold["depth"]
    frozen = load_model(ModelSpec(id="frozen", source=str(_frozen_copy(path, tmp_path / "frozen"))))
    image = random_image(40, 56, seed=5)
    still = frozen.predict_uncertainty(item(frozen, image, 0, 6), [0], return_members=True, method="steps")
    assert still.method == "steps" and still.members.shape[0] == 4  # STEP_WINDOW + 1 decoded x0 maps
    assert float(np.abs(still.uncertainty).max()) < 1e-6
    moving = model.predict_uncertainty(item(model, image, 0, 6), [0], method="steps")
    assert float(moving.uncertainty.mean()) > 1e-4 and moving.prediction.steps == 6
    # the answer beside the uncertainty is the ordinary prediction of that run
    plain = model.predict_batch([item(model, image, 0, 6)])[0].array
    np.testing.assert_allclose(moving.prediction.array, plain, atol=1e-6)


def test_step_change_normals_is_in_degrees(marigold) -> None:
    _, model, _ = marigold["normals"]
    image = random_image(40, 56, seed=6)
    result = model.predict_uncertainty(item(model, image, 1, 4), [1], method="steps")
    assert result.uncertainty.shape == (40, 56) and 0 < float(result.uncertainty.mean()) < 180


@pytest.mark.parametrize("name", ["normals", "lcm"])
def test_step_uncertainty_in_an_answer_is_method_steps(marigold, name: str) -> None:
    """`uncertainty=steps` in a plain answer (normals: degrees; LCM: its last x0 IS the final latent, so that
    map is not decoded twice) gives the numbers of `method=steps`."""
    from dataclasses import replace

    _, model, _ = marigold[name]
    image = random_image(40, 56, seed=7)
    asked = replace(item(model, image, 3, 5), step_uncertainty=True)
    (answer,) = model.predict_batch([asked])
    ref = model.predict_uncertainty(item(model, image, 3, 5), [3], method="steps")
    assert answer.uncertainty is not None and answer.uncertainty.shape == (40, 56)
    np.testing.assert_allclose(answer.uncertainty, ref.uncertainty, atol=1e-5)
    np.testing.assert_allclose(answer.array, ref.prediction.array, atol=1e-5)
    decodes = 3 if name == "lcm" else 4  # k = 3 changes: k (LCM) or k + 1 (DDIM without set_alpha_to_one)
    assert answer.extra == {"uncertainty_method": "steps", "step_window": 3, "uncertainty_decodes": decodes}
    assert ref.prediction.extra["uncertainty_decodes"] == decodes
    assert float(answer.uncertainty.mean()) > 0


def test_uncertainty_methods_seeds_and_diffusers(marigold) -> None:
    _, model, pipe = marigold["depth"]
    image = random_image(40, 56, seed=7)
    ours = model.predict_uncertainty(item(model, image, 2, 4), [2, 3, 4], return_members=True)
    assert ours.seeds == [2, 3, 4] and ours.members.shape == (3, 40, 56) and ours.method == "seeds"
    # member i is the plain prediction with seed i
    np.testing.assert_allclose(ours.members[1], model.predict_batch([item(model, image, 3, 4)])[0].array, atol=1e-5)
    theirs = model.predict_uncertainty(item(model, image, 2, 4), [2, 3, 4], reduction="median", method="diffusers")
    out = pipe(
        torch.from_numpy(image).permute(2, 0, 1)[None],
        num_inference_steps=4,
        ensemble_size=3,
        batch_size=3,
        processing_resolution=RES,
        generator=torch.Generator().manual_seed(2),
        output_uncertainty=True,
        output_type="np",
    )
    np.testing.assert_allclose(theirs.prediction.array, out.prediction[0, ..., 0], atol=1e-3)
    np.testing.assert_allclose(theirs.uncertainty, out.uncertainty[0, ..., 0], atol=1e-3)


def test_detection_tells_marigold_from_e2e_ft(marigold, tiny_dir) -> None:
    for name in ("depth", "normals", "lcm"):
        assert detect_family(CheckpointConfig.read(marigold[name][0])) == "marigold"
    assert detect_family(CheckpointConfig.read(tiny_dir("e2e-ft", "depth"))) == "e2e-ft"
    assert marigold["depth"][1].default_steps == 4 and marigold["lcm"][1].default_steps == 1
    assert marigold["lcm"][1].core.scheduler_name == "LCMScheduler"


def test_single_step_families_refuse_steps(tiny_model) -> None:
    model = tiny_model("lotus-d", "depth")
    with pytest.raises(ValueError, match="single-step"):
        model.predict([random_image(32, 32)], processing_res=32, steps=4)


def test_shipped_marigold_specs_and_offline_error(tmp_path) -> None:
    specs = {s.source: s for s in shipped_specs().values()}
    for source, task in [
        ("prs-eth/marigold-depth-v1-1", "depth"),
        ("prs-eth/marigold-normals-v1-1", "normals"),
        ("prs-eth/marigold-depth-lcm-v1-0", "depth"),
    ]:
        assert specs[source].family == "marigold" and specs[source].task == task
    cli_args = ["--model", "marigold-depth-v1-1", "--steps", "4", "--out", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "predict", str(REPO / "assets" / "sample.png"), *cli_args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "prs-eth/marigold-depth-v1-1" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "hf download" in result.stderr
