"""`steps`, `ensemble_size`, `steps=auto` and the uncertainty methods over the real REST service (embedded
broker, worker lanes) with a tiny Marigold beside single-step models."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

from models.inference import BatchItem
from models.spec import ModelSpec
from service import codec
from service.grpc.servicer import request_of
from service.grpc.stubs import dense_pb2 as pb
from service.request import Limits
from service.worker.steps import StepTimer, auto_steps
from tests.service_harness import TEST_RES, png_bytes, read_npy, running_service
from tests.test_api_errors import assert_field, assert_problem

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def svc(tiny_dir):
    specs = [
        ModelSpec(id="marigold-depth", source=str(tiny_dir("marigold", "depth")), processing_res=TEST_RES),
        ModelSpec(id="lotus-d-depth", source=str(tiny_dir("lotus-d", "depth")), processing_res=TEST_RES),
    ]
    async with running_service(tiny_dir, specs=specs) as harness:
        yield harness


def alone(svc, image: bytes, steps: int, seed: int) -> np.ndarray:
    """The same job computed by itself, outside the service."""
    model = svc.worker.served["marigold-depth"].predictor
    pixels = codec.decode_image(image)
    return model.predict_batch([BatchItem(pixels, model.plan(pixels), seed, True, "float32", steps)])[0].array


async def test_steps_run_and_are_reported(svc) -> None:
    image = png_bytes(40, 56, seed=1)
    r = await svc.client.post("/v1/depth?model=marigold-depth&steps=6&seed=3&format=npy", files={"image": image})
    assert r.status_code == 200, r.text
    assert r.headers["x-steps"] == "6" and r.headers["x-seed"] == "3"
    np.testing.assert_allclose(read_npy(r.content), alone(svc, image, 6, 3), atol=1e-5)
    r = await svc.client.post("/v1/depth?model=marigold-depth&format=json", files={"image": image})
    assert r.json()["steps"] == 4  # the checkpoint's default_denoising_steps


async def test_mixed_steps_in_flight_each_get_their_alone_result(svc) -> None:
    images = [png_bytes(40, 56, seed=10 + i) for i in range(6)]
    plan = [(1, 0), (10, 1), (4, 2), (7, 3), (2, 4), (10, 5)]

    async def one(image: bytes, steps: int, seed: int):
        url = f"/v1/depth?model=marigold-depth&steps={steps}&seed={seed}&format=npy"
        return await svc.client.post(url, files={"image": image})

    replies = await asyncio.gather(*(one(im, s, seed) for im, (s, seed) in zip(images, plan, strict=True)))
    for r, im, (steps, seed) in zip(replies, images, plan, strict=True):
        assert r.status_code == 200, r.text
        assert r.headers["x-steps"] == str(steps)
        np.testing.assert_allclose(read_npy(r.content), alone(svc, im, steps, seed), atol=1e-5)


async def test_ensemble_size(svc) -> None:
    r = await svc.client.post(
        "/v1/depth?model=marigold-depth&ensemble_size=3&steps=2&format=json", files={"image": png_bytes(32, 40)}
    )
    assert r.status_code == 200, r.text
    assert r.json()["ensemble_size"] == 3


@pytest.mark.parametrize(
    ("url", "field", "words"),
    [
        ("/v1/depth?model=lotus-d-depth&steps=4", "steps", "single-step"),
        ("/v1/depth?model=lotus-d-depth&ensemble_size=3", "ensemble_size", "multi-step"),
        ("/v1/uncertainty?model=marigold-depth&method=steps&steps=1", "steps", "steps >= 2"),
        ("/v1/depth?model=marigold-depth&steps=fast", "steps", "auto"),
    ],
)
async def test_what_a_family_cannot_do_is_a_422_that_says_why(svc, url: str, field: str, words: str) -> None:
    r = await svc.client.post(url, files={"image": png_bytes(32, 32)})
    body = assert_problem(r, 422)
    assert_field(body, field)
    assert words in body["detail"], body


async def test_single_step_family_accepts_steps_1_and_auto(svc) -> None:
    for steps in ("1", "auto"):
        r = await svc.client.post(f"/v1/depth?model=lotus-d-depth&steps={steps}", files={"image": png_bytes(32, 32)})
        assert r.status_code == 200 and r.headers["x-steps"] == "1", r.text


async def test_steps_auto_takes_fewer_steps_when_the_deadline_is_tight(svc) -> None:
    lane = svc.worker.lanes["marigold-depth"]
    lane.step_timer.pin(per_step_s=0.45)
    try:
        image = png_bytes(32, 40, seed=2)
        url = "/v1/depth?model=marigold-depth&steps=auto&format=npy&timeout_ms="
        loose = await svc.client.post(url + "60000", files={"image": image})
        tight = await svc.client.post(url + "1200", files={"image": image})
    finally:
        lane.step_timer = StepTimer()
    assert loose.status_code == 200 and tight.status_code == 200, (loose.text, tight.text)
    assert loose.headers["x-steps"] == "4"  # at most the model's default steps
    assert 1 <= int(tight.headers["x-steps"]) <= 2
    steps = int(tight.headers["x-steps"])
    np.testing.assert_allclose(read_npy(tight.content), alone(svc, image, steps, 0), atol=1e-5)


def test_auto_steps_arithmetic() -> None:
    assert auto_steps(remaining_s=1.0, per_step_s=0.2, fixed_s=0.1, max_steps=10) == 4
    assert auto_steps(remaining_s=10.0, per_step_s=0.2, fixed_s=0.1, max_steps=10) == 10
    assert auto_steps(remaining_s=0.05, per_step_s=0.2, fixed_s=0.1, max_steps=10) == 1
    timer = StepTimer()
    assert timer.choose(0.1, 7) == 7  # nothing measured yet: the most
    timer.observe_step(0.1)
    timer.observe_step(0.2)
    assert timer.per_step_s == pytest.approx(0.12)


async def test_uncertainty_method_steps_and_diffusers(svc) -> None:
    image = png_bytes(32, 40, seed=3)
    r = await svc.client.post(
        "/v1/uncertainty?model=marigold-depth&method=steps&steps=6&format=json&json_encoding=npy",
        files={"image": image},
    )
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["uncertainty_method"] == "steps" and data["step_window"] == 3 and data["steps"] == 6
    spread = read_npy(base64.b64decode(data["outputs"]["uncertainty"]["data"]))
    assert spread.shape == (32, 40) and spread.mean() > 0
    r = await svc.client.post(
        "/v1/uncertainty?model=marigold-depth&method=diffusers&seeds=3&steps=2&format=json", files={"image": image}
    )
    assert r.status_code == 200, r.text
    assert r.json()["uncertainty_method"] == "diffusers" and "diffusers" in r.json()["uncertainty_measure"]


async def test_models_list_says_multi_step(svc) -> None:
    models = {m["id"]: m for m in (await svc.client.get("/v1/models")).json()["models"]}
    assert models["marigold-depth"]["multi_step"] is True and models["marigold-depth"]["default_steps"] == 4
    assert models["lotus-d-depth"]["multi_step"] is False


def test_grpc_steps_auto_and_ensemble_size() -> None:
    req = pb.PredictRequest(encoded=b"x", steps_auto=True, ensemble_size=3)
    parsed = request_of(req, Limits())
    assert parsed.steps == "auto" and parsed.ensemble_size == 3
    with pytest.raises(Exception, match="steps or steps_auto"):
        request_of(pb.PredictRequest(encoded=b"x", steps=2, steps_auto=True), Limits())
