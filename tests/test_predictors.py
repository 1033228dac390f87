"""Parity of every family and task with the reference math; batching, seeds, sizes and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.outputs import NORMALS_CONVENTION
from models.predictors.lotus import ANNOTATION_SWITCH
from tests.conftest import COMBOS, random_image
from tests.reference import reference_map

ATOL = 1e-5


@pytest.mark.parametrize(("family", "task"), COMBOS)
@pytest.mark.parametrize(("hw", "res"), [((48, 64), 64), ((37, 53), 128), ((40, 24), 0)])
def test_matches_reference(tiny_dir, tiny_model, family, task, hw, res) -> None:
    image = random_image(*hw, seed=hw[0])
    model = tiny_model(family, task)
    pred = model.predict([image], processing_res=res, seeds=7)[0]
    ref = reference_map(tiny_dir(family, task), family, task, image, res, seed=7)
    assert pred.array.shape == ref.shape == ((*hw, 3) if task == "normals" else hw)
    assert pred.array.dtype == np.float32
    np.testing.assert_allclose(pred.array, ref, atol=ATOL, rtol=0)
    # The maps are informative, not saturated: the parity check would be empty otherwise.
    assert float(pred.array.std()) > 1e-3


@pytest.mark.parametrize(("family", "task"), COMBOS)
def test_value_ranges_and_metadata(tiny_model, family, task) -> None:
    pred = tiny_model(family, task).predict([random_image(64, 48)], processing_res=64)[0]
    if task == "normals":
        np.testing.assert_allclose(np.linalg.norm(pred.array, axis=-1), 1.0, atol=1e-5)
        assert not pred.affine_invariant
    else:
        assert pred.array.min() >= 0.0 and pred.array.max() <= 1.0
        assert pred.affine_invariant
    meta = pred.metadata()
    assert meta["kind"] == task and meta["model"] == f"{family}-{task}"
    assert meta["processing_size"] == [64, 48]
    assert meta["seed"] == (0 if family == "lotus-g" else None)
    # Normals state their axes (the checkpoints' raw convention); depth maps have none.
    assert meta["normals_convention"] == (NORMALS_CONVENTION if task == "normals" else None)


@pytest.mark.parametrize(("family", "task"), [("lotus-g", "depth"), ("lotus-d", "normals"), ("e2e-ft", "depth")])
def test_batch_of_8_equals_single(tiny_model, family, task) -> None:
    model = tiny_model(family, task)
    images = [random_image(48, 64, seed=s) for s in range(8)]
    seeds = list(range(100, 108))
    batched = model.predict(images, processing_res=64, seeds=seeds, batch_size=8)
    for img, seed, b in zip(images, seeds, batched, strict=True):
        single = model.predict([img], processing_res=64, seeds=seed, batch_size=1)[0]
        np.testing.assert_allclose(b.array, single.array, atol=ATOL, rtol=0)


def test_mixed_sizes_grouped_and_returned_in_order(tiny_model) -> None:
    model = tiny_model("lotus-d", "depth")
    sizes = [(48, 64), (37, 53), (64, 48), (48, 64), (1, 500), (37, 53)]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    calls: list[int] = []
    preds = model.predict(images, processing_res=64, batch_size=8, on_batch=calls.append)
    assert [p.array.shape for p in preds] == sizes
    # 48x64 and 37x53 (-> 44x64) share the padded shape 48x64 and run as one batch of 4;
    # 64x48 and 1x500 (-> 1x64, padded 8x64) run alone.
    assert sorted(calls) == [1, 1, 4]
    for img, pred in zip(images, preds, strict=True):
        alone = model.predict([img], processing_res=64)[0]
        np.testing.assert_allclose(pred.array, alone.array, atol=ATOL, rtol=0)


def test_lotus_g_seed_reproducible_across_positions_and_runs(tiny_model) -> None:
    model = tiny_model("lotus-g", "depth")
    img = random_image(48, 64, seed=1)
    others = [random_image(48, 64, seed=s) for s in range(2, 5)]
    first = model.predict([img, *others], processing_res=64, seeds=[42, 1, 2, 3])[0].array
    last = model.predict([*others, img], processing_res=64, seeds=[1, 2, 3, 42])[-1].array
    again = model.predict([img], processing_res=64, seeds=42)[0].array
    np.testing.assert_allclose(first, last, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(again, model.predict([img], processing_res=64, seeds=42)[0].array)
    other_seed = model.predict([img], processing_res=64, seeds=43)[0].array
    assert np.abs(other_seed - again).max() > 1e-3, "a different seed must change a Lotus-G map"


def test_lotus_g_noise_is_drawn_on_cpu_from_the_seed(tiny_model) -> None:
    core = tiny_model("lotus-g", "depth").runtime.core
    noise = core.make_noise([5, 9], (3, 4))
    expect = torch.cat([torch.randn((1, 4, 3, 4), generator=torch.Generator("cpu").manual_seed(s)) for s in (5, 9)])
    torch.testing.assert_close(noise, expect, rtol=0, atol=0)
    assert tiny_model("lotus-d", "depth").runtime.make_noise([5], (3, 4)) is None


def test_deterministic_families_ignore_seed(tiny_model) -> None:
    for family in ("lotus-d", "e2e-ft"):
        model = tiny_model(family, "depth")
        img = random_image(48, 64)
        a = model.predict([img], processing_res=64, seeds=1)[0]
        b = model.predict([img], processing_res=64, seeds=2)[0]
        np.testing.assert_array_equal(a.array, b.array)
        assert a.seed is None


@pytest.mark.parametrize("hw", [(37, 53), (1, 500), (500, 1), (9, 9)])
def test_odd_sizes_come_back_at_input_size(tiny_model, tiny_dir, hw) -> None:
    model = tiny_model("e2e-ft", "normals")
    img = random_image(*hw)
    pred = model.predict([img], processing_res=64)[0]
    assert pred.array.shape == (*hw, 3)
    ref = reference_map(tiny_dir("e2e-ft", "normals"), "e2e-ft", "normals", img, 64)
    np.testing.assert_allclose(pred.array, ref, atol=ATOL, rtol=0)
    native = model.predict([img], processing_res=64, match_input_resolution=False)[0]
    assert native.array.shape[:2] == pred.processing_size


def test_padding_is_cropped_not_resized(tiny_model) -> None:
    """Native processing of a 37 x 53 image pads to 40 x 56 and must crop back to exactly 37 x 53."""
    model = tiny_model("lotus-d", "depth")
    img = random_image(37, 53)
    pred = model.predict([img], processing_res=0)[0]
    assert pred.processing_size == (37, 53)
    assert pred.array.shape == (37, 53)
    padded = np.pad(img, ((0, 3), (0, 3), (0, 0)), mode="edge")
    whole = model.predict([padded], processing_res=0)[0]
    np.testing.assert_allclose(pred.array, whole.array[:37, :53], atol=ATOL, rtol=0)


def test_task_switcher_and_timestep_reach_the_unet(tiny_model) -> None:
    core = tiny_model("lotus-g", "normals").runtime.core
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        seen["t"] = args[1]
        seen["labels"] = kwargs["class_labels"]
        seen["hidden"] = kwargs["encoder_hidden_states"]

    handle = core.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        tiny_model("lotus-g", "normals").predict([random_image(16, 16), random_image(16, 16, 1)], processing_res=16)
    finally:
        handle.remove()
    assert seen["t"].dtype == torch.long and seen["t"].tolist() == [999, 999]
    torch.testing.assert_close(seen["labels"][0], torch.tensor([0.841471, 0.0, 0.540302, 1.0]), atol=1e-6, rtol=0)
    assert tuple(ANNOTATION_SWITCH) == pytest.approx((0.841471, 0.0, 0.540302, 1.0), abs=1e-6)
    assert seen["hidden"].shape[:2] == (2, 2), "empty prompt: two tokens, expanded to the batch"


def test_e2eft_alpha_bar_from_scheduler_config(tiny_model) -> None:
    core = tiny_model("e2e-ft", "depth").runtime.core
    assert core.alpha_bar == pytest.approx(0.0046601, abs=1e-7)
    assert -core.v_to_x0 == pytest.approx(0.997667, abs=1e-6)


def test_minmax_option_normalises_each_e2eft_depth_map(tiny_dir) -> None:
    from models.loading import load_model
    from models.spec import resolve_spec

    model = load_model(resolve_spec(str(tiny_dir("e2e-ft", "depth")), minmax_normalize=True))
    pred = model.predict([random_image(48, 64)], processing_res=64)[0]
    assert pred.array.min() == pytest.approx(0.0, abs=1e-6)
    assert pred.array.max() == pytest.approx(1.0, abs=1e-6)


def test_sdpa_attention_is_used(tiny_model) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    core = tiny_model("lotus-d", "depth").runtime.core
    procs = [*core.unet.attn_processors.values(), *core.vae.attn_processors.values()]
    assert procs and all(isinstance(p, AttnProcessor2_0) for p in procs)
