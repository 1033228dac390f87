"""Multi-seed uncertainty: the ensembling math against numpy, and the endpoint against direct predictions."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from models.uncertainty import align_scale_shift, reduce_normals, reduce_scalar
from service import codec
from tests.service_harness import png_bytes, read_npy, read_png16, running_service


def _np_align(members: np.ndarray) -> np.ndarray:
    ref = members[0].ravel().astype(np.float64)
    out = []
    for m in members:
        a = np.stack([m.ravel().astype(np.float64), np.ones(m.size)], axis=1)
        (s, t), *_ = np.linalg.lstsq(a, ref, rcond=None)
        out.append(s * m + t)
    return np.stack(out)


def test_alignment_is_least_squares_scale_and_shift() -> None:
    rng = np.random.default_rng(0)
    base = rng.random((6, 7))
    members = np.stack([base, 2.0 * base + 0.3, 0.5 * base - 0.1 + rng.normal(0, 0.01, base.shape)])
    got = align_scale_shift(torch.from_numpy(members).float()).numpy()
    np.testing.assert_allclose(got, _np_align(members), atol=1e-5)
    np.testing.assert_allclose(got[1], base, atol=1e-5)  # an exact affine copy aligns exactly


def test_scalar_reductions() -> None:
    rng = np.random.default_rng(1)
    members = rng.random((5, 4, 3)).astype(np.float32)
    aligned = _np_align(members)
    pred, std = reduce_scalar(torch.from_numpy(members), "mean")
    np.testing.assert_allclose(pred.numpy(), np.clip(aligned.mean(0), 0, 1), atol=1e-5)
    np.testing.assert_allclose(std.numpy(), aligned.std(0), atol=1e-5)
    med, mad = reduce_scalar(torch.from_numpy(members), "median")
    np.testing.assert_allclose(med.numpy(), np.clip(np.median(aligned, 0), 0, 1), atol=1e-5)
    np.testing.assert_allclose(mad.numpy(), np.median(np.abs(aligned - np.median(aligned, 0)), 0), atol=1e-5)


def test_normal_reduction_angles_in_degrees() -> None:
    # Two members 90 degrees apart: the mean direction is halfway, each is 45 degrees from it.
    members = torch.zeros(2, 3, 1, 1)
    members[0, 0] = 1.0
    members[1, 1] = 1.0
    centre, spread = reduce_normals(members, "mean")
    np.testing.assert_allclose(centre[:, 0, 0].numpy(), [2**-0.5, 2**-0.5, 0], atol=1e-6)
    assert spread.item() == pytest.approx(45.0, abs=1e-4)


@pytest.mark.anyio
@pytest.mark.parametrize("task", ["depth", "normals"])
async def test_endpoint_members_match_single_seed_predictions(tiny_dir, tiny_model, task) -> None:
    async with running_service(tiny_dir, models=[("lotus-g", task), ("lotus-d", "depth")]) as svc:
        image = png_bytes(40, 56, seed=9)
        forwards = svc.worker.stats.forwards[f"lotus-g-{task}"]
        r = await svc.client.post(
            f"/v1/uncertainty?task={task}&seeds=4&seed=20&format=json&json_encoding=npy&return_members=true",
            content=image,
            headers={"content-type": "image/png"},
        )
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["seeds"] == [20, 21, 22, 23] and data["batch_size"] == 4
        # One image's seeds ran as ONE forward pass of batch 4.
        assert svc.worker.stats.forwards[f"lotus-g-{task}"] == forwards + 1
        assert svc.worker.stats.batch_sizes(f"lotus-g-{task}")[-1] == 4
        outs = {k: read_npy(base64.b64decode(v["data"])) for k, v in data["outputs"].items()}
        model = tiny_model("lotus-g", task)
        img = codec.decode_image(image)
        singles = np.stack([model.predict([img], processing_res=64, seeds=s)[0].array for s in range(20, 24)])
        np.testing.assert_allclose(outs["members"], singles, atol=1e-5)
        if task == "depth":
            aligned = _np_align(singles)
            np.testing.assert_allclose(outs["prediction"], np.clip(aligned.mean(0), 0, 1), atol=1e-4)
            np.testing.assert_allclose(outs["uncertainty"], aligned.std(0), atol=1e-4)
            assert data["uncertainty_measure"] == "population standard deviation"
        else:
            mean = singles.mean(0)
            mean /= np.linalg.norm(mean, axis=-1, keepdims=True)
            angles = np.degrees(np.arccos(np.clip((singles * mean).sum(-1), -1, 1)))
            np.testing.assert_allclose(outs["prediction"], mean, atol=1e-4)
            np.testing.assert_allclose(outs["uncertainty"], angles.mean(0), atol=1e-2)
            assert data["uncertainty_unit"] == "degrees"
        # Binary default: the uncertainty map as a 16-bit PNG of value / uncertainty_png_max.
        r = await svc.client.post(
            f"/v1/uncertainty?task={task}&seeds=4&seed=20", content=image, headers={"content-type": "image/png"}
        )
        assert r.headers["content-type"] == "image/png"
        scale = data["uncertainty_png_max"]
        np.testing.assert_allclose(read_png16(r.content) * scale, outs["uncertainty"], atol=scale / 65535 + 1e-4)
        # A deterministic model cannot give multi-seed uncertainty.
        if task == "depth":
            r = await svc.client.post(
                "/v1/uncertainty?model=lotus-d-depth", content=image, headers={"content-type": "image/png"}
            )
            assert r.status_code == 404 and "deterministic" in r.json()["detail"]
