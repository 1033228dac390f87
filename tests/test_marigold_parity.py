"""E2E-FT tiny checkpoints load in diffusers' Marigold pipelines and give the same maps as our predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, MarigoldDepthPipeline, MarigoldNormalsPipeline

from models.predictors.processing import plan
from tests.conftest import random_image


@pytest.mark.parametrize("task", ["depth", "normals"])
@pytest.mark.parametrize(("hw", "res"), [((48, 64), 64), ((37, 53), 64), ((30, 70), 128)])
def test_e2eft_equals_diffusers_marigold(tiny_dir, tiny_model, task, hw, res) -> None:
    cls = MarigoldDepthPipeline if task == "depth" else MarigoldNormalsPipeline
    pipe = cls.from_pretrained(tiny_dir("e2e-ft", task), use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True
    )
    pipe.set_progress_bar_config(disable=True)
    image = random_image(*hw, seed=3)
    lh, lw = plan(*hw, res).latent_hw
    out = pipe(
        torch.from_numpy(image).permute(2, 0, 1)[None],
        num_inference_steps=1,
        ensemble_size=1,
        processing_resolution=res,
        match_input_resolution=True,
        latents=torch.zeros(1, 4, lh, lw),
        output_type="np",
    ).prediction[0]
    ours = tiny_model("e2e-ft", task).predict([image], processing_res=res)[0].array
    expected = out[..., 0] if task == "depth" else out
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
