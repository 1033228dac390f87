"""The REST API over a real ASGI client against the embedded service running tiny checkpoints."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from service import codec
from tests.conftest import REPO
from tests.service_harness import TEST_RES, png_bytes, read_npy, read_png16, running_service

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def svc(tiny_dir):
    async with running_service(tiny_dir) as harness:
        yield harness


def direct(tiny_model, family: str, task: str, image: bytes, **kw) -> np.ndarray:
    model = tiny_model(family, task)
    return model.predict([codec.decode_image(image)], processing_res=kw.pop("processing_res", TEST_RES), **kw)[0].array


async def test_multipart_default_is_png16_equal_to_direct_call(svc, tiny_model) -> None:
    image = png_bytes(48, 80, seed=1)
    r = await svc.client.post("/v1/depth", files={"image": ("x.png", image, "image/png")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    got = read_png16(r.content)
    assert got.shape == (48, 80)
    assert np.abs(got - direct(tiny_model, "lotus-g", "depth", image, seeds=0)).max() <= 0.5 / 65535 + 2e-5
    assert r.headers["x-model"] == "lotus-g-depth" and r.headers["x-seed"] == "0"
    timing = r.headers["server-timing"]
    assert all(f"{name};dur=" in timing for name in ("queue", "compute", "total"))


async def test_raw_body_npy_and_query_parameters(svc, tiny_model) -> None:
    image = png_bytes(40, 30, seed=2)
    r = await svc.client.post(
        "/v1/depth?format=npy&model=lotus-d-depth&processing_res=32",
        content=image,
        headers={"content-type": "image/png"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    got = read_npy(r.content)
    assert got.dtype == np.float32 and got.shape == (40, 30)
    np.testing.assert_allclose(got, direct(tiny_model, "lotus-d", "depth", image, processing_res=32), atol=1e-5)
    assert "x-seed" not in r.headers


async def test_json_body_and_json_response(svc, tiny_model) -> None:
    image = png_bytes(32, 48, seed=3)
    body = {"image": base64.b64encode(image).decode(), "seed": 11, "json_encoding": "npy"}
    r = await svc.client.post("/v1/normals", json=body, headers={"accept": "application/json"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["kind"] == "normals" and data["shape"] == [32, 48, 3] and data["seed"] == 11
    assert data["affine_invariant"] is False and data["range"] == [-1.0, 1.0]
    assert data["model"] == "lotus-g-normals" and data["processing_size"] == [42, 64]
    assert data["normals_convention"] == "+x image left, +y image up, +z towards the camera"
    assert r.headers["x-normals-convention"] == data["normals_convention"]
    assert set(data["timings"]) >= {"queue", "compute", "total"} and data["batch_size"] >= 1
    assert data["request_id"] == r.headers["x-request-id"]
    blob = data["outputs"]["prediction"]
    assert blob["media_type"] == "application/x-npy"
    got = read_npy(base64.b64decode(blob["data"]))
    np.testing.assert_allclose(got, direct(tiny_model, "lotus-g", "normals", image, seeds=11), atol=1e-5)


async def test_normals_png_color_and_accept_header(svc) -> None:
    image = png_bytes(24, 40, seed=4)
    r = await svc.client.post("/v1/normals", files={"image": ("n.png", image)})
    assert r.status_code == 200
    png = Image.open(io.BytesIO(r.content))
    assert png.mode == "RGB" and png.size == (40, 24)
    assert r.headers["x-normals-convention"].startswith("+x image left")
    r = await svc.client.post("/v1/depth?format=color", files={"image": ("d.png", image)})
    assert "x-normals-convention" not in r.headers
    color = Image.open(io.BytesIO(r.content))
    assert color.mode == "RGB" and color.size == (40, 24)
    r = await svc.client.post("/v1/depth", files={"image": ("d.png", image)}, headers={"accept": "application/x-npy"})
    assert r.headers["content-type"] == "application/x-npy"
    r = await svc.client.post("/v1/depth", files={"image": ("d.png", image)}, headers={"accept": "text/html"})
    assert r.status_code == 406 and r.headers["content-type"] == "application/problem+json"


async def test_resolution_options(svc) -> None:
    image = png_bytes(37, 53, seed=5)
    r = await svc.client.post(
        "/v1/depth?format=npy&processing_res=0", content=image, headers={"content-type": "image/png"}
    )
    assert read_npy(r.content).shape == (37, 53)
    r = await svc.client.post(
        "/v1/depth?format=json&match_input_resolution=false", content=image, headers={"content-type": "image/png"}
    )
    data = r.json()
    assert data["shape"] == [44, 64] == data["processing_size"]


async def test_seed_changes_lotus_g_and_request_id_is_echoed(svc) -> None:
    image = png_bytes(32, 32, seed=6)
    a = await svc.client.post(
        "/v1/depth?seed=5&format=npy", content=image, headers={"content-type": "image/png", "x-request-id": "abc-123"}
    )
    b = await svc.client.post("/v1/depth?seed=6&format=npy", content=image, headers={"content-type": "image/png"})
    assert a.headers["x-request-id"] == "abc-123"
    assert len(b.headers["x-request-id"]) == 32
    assert np.abs(read_npy(a.content) - read_npy(b.content)).max() > 1e-3


async def test_models_health_and_openapi(svc) -> None:
    models = (await svc.client.get("/v1/models")).json()["models"]
    by_id = {m["id"]: m for m in models}
    assert set(by_id) == {"lotus-g-depth", "lotus-g-normals", "lotus-d-depth"}
    m = by_id["lotus-g-normals"]
    assert (m["family"], m["task"], m["output_kind"], m["processing_res"]) == ("lotus-g", "normals", "normals", 64)
    assert (m["backend"], m["device"], m["dtype"], m["max_batch_size"]) == ("torch", "cpu", "float32", 8)
    assert (await svc.client.get("/healthz")).json() == {"status": "ok"}
    ready = (await svc.client.get("/readyz")).json()
    assert ready["ready"] and ready["worker"] == "ready" and all(ready["models"].values())
    spec = (await svc.client.get("/openapi.json")).json()
    op = spec["paths"]["/v1/depth"]["post"]
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert op["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert {"image/png", "application/x-npy", "application/json"} <= set(op["responses"]["200"]["content"])
    assert "application/problem+json" in op["responses"]["413"]["content"]
    assert "PredictionJSON" in spec["components"]["schemas"]
    assert (await svc.client.get("/docs")).status_code == 200


async def test_concurrent_requests_are_batched_and_each_gets_its_answer(tiny_dir, tiny_model) -> None:
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], max_queue_delay_ms=200) as svc:
        images = [png_bytes(48, 64, seed=100 + i) for i in range(16)]
        replies = await asyncio.gather(
            *(
                svc.client.post("/v1/depth?format=npy", content=img, headers={"content-type": "image/png"})
                for img in images
            )
        )
        sizes = svc.worker.stats.batch_sizes("lotus-d-depth")
        assert sum(sizes) == 16 and max(sizes) > 1, sizes
        assert max(int(r.headers["x-batch-size"]) for r in replies) > 1
        for img, r in zip(images, replies, strict=True):
            assert r.status_code == 200
            np.testing.assert_allclose(read_npy(r.content), direct(tiny_model, "lotus-d", "depth", img), atol=1e-5)


async def test_front_end_does_not_import_torch() -> None:
    code = "import sys, service.api.app, service.queue.memory; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
