"""`steps`, `ensemble_size`, `steps=auto` and the uncertainty methods over the real REST service (embedded
broker, worker lanes) with a tiny Marigold beside single-step models."""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from models.inference import BatchItem
from models.spec import ModelSpec
from service import codec
from service.grpc.servicer import request_of
from service.grpc.stubs import dense_pb2 as pb
from service.grpc.stubs.dense_pb2_grpc import DenseServiceStub
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
    async with running_service(tiny_dir, specs=specs, grpc_enabled=True, grpc_port=0) as harness:
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
        ("/v1/depth?model=lotus-d-depth&uncertainty=steps&format=json", "uncertainty", "multi-step models"),
        ("/v1/depth?model=marigold-depth&uncertainty=steps&steps=1&format=json", "steps", "steps >= 2"),
        ("/v1/depth?model=marigold-depth&uncertainty=steps&steps=4&format=npy", "uncertainty", "format=json"),
        ("/v1/depth?model=marigold-depth&uncertainty=steps", "uncertainty", "format=json"),
        ("/v1/depth?model=marigold-depth&uncertainty=steps&ensemble_size=2&format=json", "ensemble_size", "one run"),
        ("/v1/depth?model=marigold-depth&uncertainty=seeds&format=json", "uncertainty", "none"),
        ("/v1/uncertainty?model=marigold-depth&method=steps&uncertainty=steps&format=json", "uncertainty", ""),
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


# ---------------------------------------------------------------- uncertainty=steps in a plain answer


def json_maps(r) -> tuple[np.ndarray, np.ndarray | None]:
    """The prediction and (when present) the uncertainty of a JSON answer with NPY maps."""
    outputs = r.json()["outputs"]
    pred = read_npy(base64.b64decode(outputs["prediction"]["data"]))
    spread = outputs.get("uncertainty")
    return pred, None if spread is None else read_npy(base64.b64decode(spread["data"]))


async def step_uncertainty_reference(svc, image: bytes, steps: int, seed: int):
    """What `/v1/uncertainty?method=steps` answers for the same image, seed and steps."""
    q = f"model=marigold-depth&steps={steps}&seed={seed}&format=json&json_encoding=npy&method=steps"
    r = await svc.client.post(f"/v1/uncertainty?{q}", files={"image": image})
    assert r.status_code == 200, r.text
    return r


async def test_a_depth_answer_carries_the_uncertainty_endpoints_step_change(svc) -> None:
    image = png_bytes(32, 40, seed=4)
    ref = await step_uncertainty_reference(svc, image, 6, 5)
    q = "model=marigold-depth&steps=6&seed=5&json_encoding=npy&uncertainty=steps"
    r = await svc.client.post(f"/v1/depth?{q}", files={"image": image}, headers={"accept": "application/json"})
    assert r.status_code == 200, r.text
    pred, spread = json_maps(r)
    ref_pred, ref_spread = json_maps(ref)
    assert spread is not None and spread.shape == (32, 40) and spread.mean() > 0
    np.testing.assert_array_equal(spread, ref_spread)  # the same numbers, not just close
    np.testing.assert_array_equal(pred, ref_pred)
    data, expected = r.json(), ref.json()
    assert data["uncertainty_method"] == "steps" and data["steps"] == 6
    assert data["step_window"] == 3 and data["uncertainty_decodes"] == 4  # its cost: 4 VAE decodes, no UNet call
    for key in ("step_window", "uncertainty_decodes", "uncertainty_unit", "uncertainty_measure", "uncertainty_max"):
        assert data[key] == expected[key], key
    plain = await svc.client.post(
        f"/v1/depth?{q.replace('uncertainty=steps', 'uncertainty=none')}&format=json", files={"image": image}
    )
    assert plain.status_code == 200, plain.text
    assert "uncertainty" not in plain.json()["outputs"] and "uncertainty_method" not in plain.json()
    # asking for it does not change the map (beyond float rounding: its decode shares a VAE call with the x0s)
    np.testing.assert_allclose(json_maps(plain)[0], pred, atol=1e-6)


async def test_uncertainty_jobs_step_with_plain_jobs_and_keep_their_numbers(svc) -> None:
    images = [png_bytes(32, 40, seed=20 + i) for i in range(4)]
    plan = [(6, "steps"), (3, "none"), (10, "steps"), (2, "none")]

    async def one(image: bytes, steps: int, uncertainty: str):
        url = f"/v1/depth?model=marigold-depth&steps={steps}&format=json&json_encoding=npy&uncertainty={uncertainty}"
        return await svc.client.post(url, files={"image": image})

    replies = await asyncio.gather(*(one(im, s, u) for im, (s, u) in zip(images, plan, strict=True)))
    for r, im, (steps, uncertainty) in zip(replies, images, plan, strict=True):
        assert r.status_code == 200, r.text
        pred, spread = json_maps(r)
        np.testing.assert_allclose(pred, alone(svc, im, steps, 0), atol=1e-5)
        if uncertainty == "none":
            assert spread is None
        else:
            _, ref = json_maps(await step_uncertainty_reference(svc, im, steps, 0))
            np.testing.assert_allclose(spread, ref, atol=1e-5)


def test_one_step_batch_holds_jobs_with_and_without_step_uncertainty(svc) -> None:
    """They share each UNet call (not one-job batches as /v1/uncertainty's): one batch, two members."""
    model = svc.worker.served["marigold-depth"].predictor
    a, b = (codec.decode_image(png_bytes(32, 40, seed=s)) for s in (30, 31))
    tracked = BatchItem(a, model.plan(a), 2, True, "float32", 5, step_uncertainty=True)
    plain = BatchItem(b, model.plan(b), 3, True, "float32", 3)
    batch = model.stepper()
    batch.admit([(0, tracked), (1, plain)])
    assert batch.members == 2
    out = {}
    while batch.active:
        out.update({f.trajectory.key: model.finish_trajectory(f) for f in batch.step()})
    assert out[1].uncertainty is None and out[1].extra == {}
    ref = model.predict_uncertainty(replace(tracked, step_uncertainty=False), [2], method="steps")
    assert out[0].extra == {"uncertainty_method": "steps", "step_window": 3, "uncertainty_decodes": 4}
    np.testing.assert_allclose(out[0].uncertainty, ref.uncertainty, atol=1e-5)
    np.testing.assert_allclose(out[0].array, ref.prediction.array, atol=1e-5)


async def test_grpc_answer_carries_the_step_uncertainty(svc) -> None:
    image = png_bytes(32, 40, seed=4)
    _, ref = json_maps(await step_uncertainty_reference(svc, image, 6, 5))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.app.state.grpc.port}") as channel:
        stub = DenseServiceStub(channel)
        reply = await stub.Predict(
            pb.PredictRequest(
                encoded=image,
                model="marigold-depth",
                steps=6,
                seed=5,
                encoding=pb.OUTPUT_ENCODING_RAW_FLOAT32,
                uncertainty=pb.ANSWER_UNCERTAINTY_STEPS,
            )
        )
        assert reply.status == pb.FRAME_STATUS_OK and reply.steps == 6
        np.testing.assert_array_equal(np.frombuffer(reply.uncertainty_data, "<f4").reshape(32, 40), ref)
        assert (reply.uncertainty_method, reply.step_window, reply.uncertainty_decodes) == ("steps", 3, 4)
        assert reply.uncertainty_unit.startswith("map units") and reply.uncertainty_max == pytest.approx(ref.max())
        plain = await stub.Predict(pb.PredictRequest(encoded=image, model="marigold-depth", steps=6))
        assert plain.uncertainty_data == b"" and plain.uncertainty_method == ""
        for bad, field in [
            (pb.PredictRequest(encoded=image, model="lotus-d-depth", uncertainty=1), "uncertainty"),
            (pb.PredictRequest(encoded=image, model="marigold-depth", steps=1, uncertainty=1), "steps"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            meta = {k: v for k, v in (err.value.trailing_metadata() or ()) if isinstance(v, str)}
            assert meta.get("dense-error-field") == field, meta


def test_cli_writes_the_step_uncertainty_beside_the_map(svc, tiny_dir, tmp_path: Path) -> None:
    from service.cli import main

    image = png_bytes(32, 40, seed=4)
    (tmp_path / "in.png").write_bytes(image)
    args = ["predict", str(tmp_path / "in.png"), "--model", str(tiny_dir("marigold", "depth")), "--steps", "6"]
    args += ["--seed", "5", "--processing-res", str(TEST_RES), "--format", "npy", "--out", str(tmp_path / "o")]
    assert main([*args, "--uncertainty", "steps"]) == 0
    model = svc.worker.served["marigold-depth"].predictor
    pixels = codec.decode_image(image)
    item = BatchItem(pixels, model.plan(pixels), 5, True, "float32", 6)
    ref = model.predict_uncertainty(item, [5], method="steps")
    np.testing.assert_allclose(np.load(tmp_path / "o" / "in_depth_uncertainty.npy"), ref.uncertainty, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "o" / "in_depth.npy"), ref.prediction.array, atol=1e-6)


# ---------------------------------------------------------------- a live stream with steps_auto


async def test_a_live_stream_with_steps_auto_degrades_steps_under_a_tight_deadline(svc) -> None:
    """StreamConfig.steps_auto over a real channel: frames with a tight deadline run fewer steps than the
    default, frames with a loose one the most (the model's default), a frame that names its steps keeps them."""
    lane = svc.worker.lanes["marigold-depth"]
    lane.step_timer.pin(per_step_s=0.45)  # what the lane would measure on a slow device
    image = png_bytes(32, 40, seed=6)
    plan = [(1, 60000, None), (2, 1200, None), (3, 60000, None), (4, 1200, None), (5, 1200, 3)]

    async def frames():
        yield pb.StreamRequest(config=pb.StreamConfig(steps_auto=True, max_in_flight=2))
        for frame_id, timeout_ms, steps in plan:
            frame = pb.PredictRequest(
                encoded=image,
                model="marigold-depth",
                frame_id=frame_id,
                timeout_ms=timeout_ms,
                encoding=pb.OUTPUT_ENCODING_RAW_FLOAT32,
            )
            if steps is not None:
                frame.steps = steps
            yield pb.StreamRequest(frame=frame)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.app.state.grpc.port}") as channel:
            replies = [r async for r in DenseServiceStub(channel).StreamPredict(frames())]
    finally:
        lane.step_timer = StepTimer()
    assert [r.frame_id for r in replies] == [1, 2, 3, 4, 5]
    assert all(r.status == pb.FRAME_STATUS_OK for r in replies), [(r.frame_id, r.error_message) for r in replies]
    steps = {r.frame_id: r.steps for r in replies}
    assert steps[1] == steps[3] == 4  # the most: the model's default steps
    assert 1 <= steps[2] <= 2 and 1 <= steps[4] <= 2, steps  # fewer than the default, not a dropped frame
    assert steps[5] == 3  # steps named in the frame win over the stream's steps_auto
    for r in replies:
        np.testing.assert_allclose(
            np.frombuffer(r.data, "<f4").reshape(32, 40), alone(svc, image, r.steps, 0), atol=1e-5
        )


async def test_steps_auto_with_step_uncertainty_runs_at_least_two_steps(svc) -> None:
    """The change between steps needs two: where auto would run one, a job that asked for it runs two."""
    lane = svc.worker.lanes["marigold-depth"]
    lane.step_timer.pin(per_step_s=0.45)
    try:
        image = png_bytes(32, 40, seed=8)
        url = "/v1/depth?model=marigold-depth&steps=auto&format=json&json_encoding=npy&timeout_ms=700"
        plain = await svc.client.post(url, files={"image": image})
        asked = await svc.client.post(url + "&uncertainty=steps", files={"image": image})
    finally:
        lane.step_timer = StepTimer()
    assert plain.status_code == 200 and asked.status_code == 200, (plain.text, asked.text)
    assert plain.json()["steps"] == 1 and asked.json()["steps"] == 2
    assert asked.json()["step_window"] == 1 and json_maps(asked)[1] is not None


async def test_steps_and_step_uncertainty_travel_over_redis(svc, tiny_dir, redis_url, redis_prefix) -> None:
    """`steps`, `seed` and `uncertainty=steps` survive the Redis stream: the answer equals the embedded queue's."""
    image = png_bytes(32, 40, seed=6)
    q = "model=marigold-depth&steps=3&seed=2&json_encoding=npy&uncertainty=steps&format=json"
    embedded = await svc.client.post(f"/v1/depth?{q}", files={"image": image})
    assert embedded.status_code == 200, embedded.text
    specs = [ModelSpec(id="marigold-depth", source=str(tiny_dir("marigold", "depth")), processing_res=TEST_RES)]
    async with running_service(
        tiny_dir, specs=specs, queue="redis", redis_url=redis_url, redis_prefix=redis_prefix
    ) as h:
        r = await h.client.post(f"/v1/depth?{q}", files={"image": image})
    assert r.status_code == 200, r.text
    assert r.json()["steps"] == 3 and r.json()["uncertainty_method"] == "steps"
    for got, want in zip(json_maps(r), json_maps(embedded), strict=True):
        assert got is not None and want is not None
        np.testing.assert_array_equal(got, want)


async def test_a_1080p_answer_carries_its_step_uncertainty_at_its_size(svc) -> None:
    """Real size, default settings otherwise: a 1920x1080 photo's JSON answer holds the map and its step-change
    uncertainty, both at 1080p, both 16-bit PNGs by default; a binary format is refused naming the field."""
    from PIL import Image

    small = np.asarray(Image.open(io.BytesIO(png_bytes(54, 96, seed=8))).convert("RGB"))
    big = io.BytesIO()
    Image.fromarray(small).resize((1920, 1080), Image.BILINEAR).save(big, format="JPEG", quality=90)
    files = {"image": ("photo.jpg", big.getvalue(), "image/jpeg")}
    r = await svc.client.post("/v1/depth?model=marigold-depth&steps=3&uncertainty=steps&format=json", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["steps"] == 3 and body["uncertainty_method"] == "steps" and body["step_window"] == 2
    for name in ("prediction", "uncertainty"):
        out = body["outputs"][name]
        assert out["media_type"] == "image/png", name
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["data"]))))
        assert pixels.shape == (1080, 1920) and pixels.dtype == np.uint16, name
    refused = await svc.client.post("/v1/depth?model=marigold-depth&uncertainty=steps&format=png", files=files)
    assert refused.status_code == 422
    assert_field(refused.json(), "uncertainty")
