"""One request vocabulary (service/request.py) across REST, gRPC and the CLI: the same parameter means the same
thing on every front-end, an error names its field on every front-end, and a field raised by the worker
survives the queue (in-process and Redis)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidParameter
from service.grpc.stubs import dense_pb2 as pb
from service.grpc.stubs.dense_pb2_grpc import DenseServiceStub
from service.request import FORMATS, Limits, PredictionRequest, parse_request
from tests.conftest import REPO
from tests.service_harness import Harness, png_bytes, read_npy, running_service

pytestmark = pytest.mark.anyio
PNG = {"content-type": "image/png"}


def trailers(err: grpc.aio.AioRpcError) -> dict[str, str]:
    return {k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)}


async def test_processing_res_zero_is_native_size_on_rest_grpc_and_cli(tiny_dir, tmp_path: Path) -> None:
    image = png_bytes(40, 56, seed=11)
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], grpc_enabled=True, grpc_port=0) as h:
        rest = await h.client.post(
            "/v1/depth?format=npy&processing_res=0&match_input_resolution=false", content=image, headers=PNG
        )
        assert rest.status_code == 200, rest.text
        native = read_npy(rest.content)
        assert native.shape == (40, 56)  # the model saw the input's own size
        default = read_npy(
            (
                await h.client.post("/v1/depth?format=npy&match_input_resolution=false", content=image, headers=PNG)
            ).content
        )
        assert default.shape != native.shape  # unset = the model's default size (64 here)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{h.app.state.grpc.port}") as channel:
            reply = await DenseServiceStub(channel).Predict(
                pb.PredictRequest(
                    encoded=image,
                    processing_res=0,
                    match_input_resolution=False,
                    encoding=pb.OUTPUT_ENCODING_RAW_FLOAT32,
                )
            )
        assert tuple(reply.shape) == (40, 56) and reply.steps == 1 and reply.normals_convention == ""
        np.testing.assert_array_equal(np.frombuffer(reply.data, "<f4").reshape(40, 56), native)
    source = tmp_path / "in.png"
    source.write_bytes(image)
    cli = subprocess.run(
        [
            sys.executable, "-m", "service.cli", "predict", str(source), "--model", str(tiny_dir("lotus-d", "depth")),
            "--processing-res", "0", "--no-match-input-resolution", "--format", "npy", "--out", str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    np.testing.assert_allclose(np.load(tmp_path / "o" / "in_depth.npy"), native, atol=1e-5)


async def test_a_bad_parameter_names_its_field_on_rest_grpc_and_in_a_stream(tiny_dir) -> None:
    image = png_bytes(24, 24)
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], grpc_enabled=True, grpc_port=0) as h:
        r = await h.client.post("/v1/depth?processing_res=100", content=image, headers=PNG)
        assert r.status_code == 422 and r.json()["field"] == "processing_res", r.text
        async with grpc.aio.insecure_channel(f"127.0.0.1:{h.app.state.grpc.port}") as channel:
            stub = DenseServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(pb.PredictRequest(encoded=image, processing_res=100))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            meta = trailers(err.value)
            assert meta.get("dense-error-field") == "processing_res", meta
            assert meta.get("dense-error-type", "").endswith("invalid_parameter"), meta
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(pb.PredictRequest(encoded=image, model="nope"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert trailers(err.value).get("dense-error-type", "").endswith("model_not_found")

            async def frames():
                yield pb.StreamRequest(frame=pb.PredictRequest(encoded=image, frame_id=1, processing_res=100))
                yield pb.StreamRequest(frame=pb.PredictRequest(encoded=image, frame_id=2))

            replies = [reply async for reply in stub.StreamPredict(frames())]
            assert [(x.frame_id, x.status) for x in replies] == [(1, 2), (2, 0)]
            assert replies[0].error_field == "processing_res" and replies[0].error_type.endswith("invalid_parameter")


def _limit_engines(h: Harness, model: str, side: int) -> None:
    """As a TensorRT engine built for at most side x side would: the worker, not the front-end, refuses more."""
    h.worker.served[model].predictor.runtime.max_hw = (side, side)


@pytest.mark.parametrize("queue", ["memory", "redis"])
async def test_a_field_raised_by_the_worker_survives_the_queue(tiny_dir, redis_url, redis_prefix, queue) -> None:
    extra = {"queue": "redis", "redis_url": redis_url, "redis_prefix": redis_prefix} if queue == "redis" else {}
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], **extra) as h:
        _limit_engines(h, "lotus-d-depth", 64)
        r = await h.client.post("/v1/depth?processing_res=0", content=png_bytes(128, 128), headers=PNG)
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["field"] == "processing_res" and "exceeds" in problem["detail"], problem
        ok = await h.client.post("/v1/depth?processing_res=64", content=png_bytes(128, 128), headers=PNG)
        assert ok.status_code == 200, ok.text


async def test_the_answer_says_how_many_steps_ran(tiny_dir) -> None:
    async with running_service(tiny_dir, models=[("lotus-d", "depth")]) as h:
        r = await h.client.post("/v1/depth?steps=1&format=json", content=png_bytes(24, 24), headers=PNG)
        assert r.status_code == 200, r.text
        assert r.headers["x-steps"] == "1" and r.json()["steps"] == 1
        bad = await h.client.post("/v1/depth?steps=0", content=png_bytes(24, 24), headers=PNG)
        assert bad.status_code == 422 and bad.json()["field"] == "steps"


def test_one_spelling_per_format() -> None:
    with pytest.raises(InvalidParameter) as refused:
        parse_request({"format": "png16"}, Limits())
    assert refused.value.field == "format"
    assert set(FORMATS) >= {"png", "npy", "exr", "tiff", "color", "json"}
    for name in ("processing_res", "match_input_resolution", "seed", "seeds", "steps", "format", "timeout_ms"):
        assert name in PredictionRequest.model_fields
        assert name in pb.PredictRequest.DESCRIPTOR.fields_by_name or name in ("seeds", "format", "timeout_ms")


def test_the_cli_refuses_a_bad_parameter_with_the_same_words(tmp_path: Path, tiny_dir) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (16, 16)).save(source)
    cli = subprocess.run(
        [
            sys.executable, "-m", "service.cli", "predict", str(source), "--model", str(tiny_dir("lotus-d", "depth")),
            "--processing-res", "100", "--out", str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert cli.returncode == 2, cli.stderr
    assert "processing_res" in cli.stderr and "multiple of 8" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr


async def test_normals_answers_state_their_familys_axes_on_rest_and_grpc(tiny_dir) -> None:
    """Lotus (and E2E-FT) normals: +x image left; Marigold's: +x image right (Hypersim's frame as it is). Every
    answer (binary header, JSON, gRPC, uncertainty) and the model list say which, per model."""
    from models.outputs import NORMALS_CONVENTION

    marigold = "+x image right, +y image up, +z towards the camera"
    expected = {"lotus-g-normals": NORMALS_CONVENTION, "marigold-normals": marigold}
    assert NORMALS_CONVENTION == "+x image left, +y image up, +z towards the camera"
    image = png_bytes(24, 24)
    models = [("lotus-g", "normals"), ("marigold", "normals")]
    async with running_service(tiny_dir, models=models, grpc_enabled=True, grpc_port=0) as h:
        listed = {m["id"]: m for m in (await h.client.get("/v1/models")).json()["models"]}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{h.app.state.grpc.port}") as channel:
            stub = DenseServiceStub(channel)
            grpc_listed = {m.id: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
            for model, words in expected.items():
                assert listed[model]["normals_convention"] == words and grpc_listed[model].normals_convention == words
                r = await h.client.post(f"/v1/normals?format=npy&model={model}", content=image, headers=PNG)
                assert r.status_code == 200 and r.headers["x-normals-convention"] == words, r.text
                r = await h.client.post(f"/v1/normals?format=json&model={model}", content=image, headers=PNG)
                assert r.json()["normals_convention"] == words
                u = await h.client.post(
                    f"/v1/uncertainty?task=normals&seeds=2&format=json&model={model}", content=image, headers=PNG
                )
                assert u.status_code == 200 and u.json()["normals_convention"] == words, u.text
                reply = await stub.Predict(pb.PredictRequest(encoded=image, task=pb.TASK_NORMALS, model=model))
                assert reply.status == pb.FRAME_STATUS_OK and reply.normals_convention == words
