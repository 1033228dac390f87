"""Every error the REST API can answer, provoked for real against the embedded service (tiny checkpoints on CPU).

Each error is an RFC 9457 `application/problem+json` body with type, title, status, detail, instance and
request_id. Overload (429), deadlines (504) and model failures (500) are produced by really occupying the
worker with a slow multi-seed job, and by a fault injected into the loaded model itself.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from models.outputs import Family, Task
from service import codec
from service.config import CONFIG_ENV, Settings, load_settings
from tests.service_harness import (
    TEST_RES,
    Harness,
    model_calls,
    png_bytes,
    read_npy,
    running_service,
    submitted_jobs,
)

pytestmark = pytest.mark.anyio

TinyDir = Callable[[Family, Task], Path]
TinyModel = Callable[[Family, Task], Any]
PROBLEM_FIELDS = {"type", "title", "status", "detail", "instance", "request_id"}
PNG = {"content-type": "image/png"}
SLOW_JOB = "/v1/uncertainty?seeds=32&processing_res=256&format=json"  # ~1.5-4 s on one CPU thread


# --------------------------------------------------------------------------- helpers


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem with every member the service promises; returns the body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0].strip() == "application/problem+json", r.headers
    body = r.json()
    assert set(body) >= PROBLEM_FIELDS, body
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"].startswith("https://"), body
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["instance"] == r.request.url.path
    assert body["request_id"] and body["request_id"] == r.headers["x-request-id"]
    return body


def assert_field(body: dict[str, Any], field: str) -> None:
    """A 422 names the offending field in its detail, and in `field` / `errors` when those are present."""
    assert field in body["detail"], body
    if "field" in body:
        assert body["field"] == field, body
    if "errors" in body:
        assert any(e["field"] == field for e in body["errors"]), body


async def post_raw(h: Harness, url: str, data: bytes, ctype: str = "image/png", **headers: str) -> httpx.Response:
    return await h.client.post(url, content=data, headers={"content-type": ctype, **headers})


def jpeg_bytes(h: int, w: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR (with a correct CRC) claims `width x height`: a decompression-bomb header."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def direct(tiny_model: TinyModel, family: Family, task: Task, image: bytes) -> np.ndarray:
    model = tiny_model(family, task)
    seeds = 0 if family == "lotus-g" else None
    return model.predict([codec.decode_image(image)], processing_res=TEST_RES, seeds=seeds)[0].array


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():
        if loop.time() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def start_slow_job(h: Harness, model_id: str = "lotus-g-depth") -> asyncio.Task[httpx.Response]:
    """Occupy the model's lane with a real multi-seed job; return once the lane is computing it."""
    slow = asyncio.create_task(post_raw(h, SLOW_JOB, png_bytes(64, 64, seed=99)))
    lane = h.worker.lanes[model_id]
    await wait_until(lambda: lane.busy or slow.done(), "the slow job to occupy the lane")
    assert not slow.done(), f"the slow job ended before occupying the lane: {slow.result().text}"
    return slow


@pytest.fixture(scope="module")
async def svc(tiny_dir: TinyDir) -> AsyncIterator[Harness]:
    """The default three-model service, shared by the tests that only need plain request validation."""
    async with running_service(tiny_dir) as harness:
        yield harness


@pytest.fixture(scope="module")
async def small_uploads(tiny_dir: TinyDir) -> AsyncIterator[Harness]:
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], max_upload_bytes=50_000) as harness:
        yield harness


# --------------------------------------------------------------------------- 413


async def test_413_declared_content_length_over_the_limit(small_uploads: Harness) -> None:
    body = b"\x89PNG\r\n\x1a\n" + bytes(200_000)
    r = await post_raw(small_uploads, "/v1/depth", body, **{"x-request-id": "client-rid-413"})
    assert r.request.headers["content-length"] == str(len(body))
    problem = assert_problem(r, 413)
    assert "50000" in problem["detail"] and "max_upload_bytes" in problem["detail"], problem
    assert problem["limit"] == 50_000
    assert problem["request_id"] == "client-rid-413"  # the client's id, even from the size-limit middleware


async def test_413_image_just_over_the_limit_is_caught_by_the_handler(small_uploads: Harness) -> None:
    # Within the middleware's framing slack, so the handler's exact check on the image bytes answers.
    body = b"\x89PNG\r\n\x1a\n" + bytes(60_000)
    problem = assert_problem(await post_raw(small_uploads, "/v1/depth", body), 413)
    assert str(len(body)) in problem["detail"] and "50000" in problem["detail"], problem
    assert problem["limit"] == 50_000


async def test_413_streamed_body_without_content_length(small_uploads: Harness) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(25):
            sent += 8192
            yield bytes(8192)

    r = await small_uploads.client.post("/v1/depth", content=chunks(), headers=PNG)
    assert "content-length" not in r.request.headers
    problem = assert_problem(r, 413)
    assert "50000" in problem["detail"], problem
    assert sent < 25 * 8192, "the limit is enforced while streaming, before the whole body is read"


async def test_413_multipart_upload_over_the_limit(small_uploads: Harness) -> None:
    files = {"image": ("big.png", b"\x89PNG\r\n\x1a\n" + bytes(60_000), "image/png")}
    problem = assert_problem(await small_uploads.client.post("/v1/depth", files=files), 413)
    assert "50000" in problem["detail"]


async def test_413_base64_image_over_the_limit_in_json(small_uploads: Harness) -> None:
    # The JSON body may be a third larger (base64); the decoded image itself is held to the limit.
    image = b"\x89PNG\r\n\x1a\n" + bytes(50_001 - 8)
    r = await small_uploads.client.post("/v1/depth", json={"image": base64.b64encode(image).decode()})
    problem = assert_problem(r, 413)
    assert "50001" in problem["detail"] and "50000" in problem["detail"], problem


async def test_413_image_over_max_pixels(tiny_dir: TinyDir) -> None:
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], max_pixels=10_000) as h:
        problem = assert_problem(await post_raw(h, "/v1/depth", png_bytes(200, 200, seed=1)), 413)
        assert "40000" in problem["detail"] and "10000" in problem["detail"], problem
        assert problem["limit"] == 10_000
        # At the limit is fine.
        r = await post_raw(h, "/v1/depth?format=npy", png_bytes(100, 100, seed=1))
        assert r.status_code == 200, r.text
        assert read_npy(r.content).shape == (100, 100)


async def test_413_decompression_bomb_header(svc: Harness) -> None:
    """A header far past Pillow's own bomb guard: refused from the header, before anything is queued."""
    bomb = png_header_only(100_000, 100_000)
    assert len(bomb) < 100
    with submitted_jobs(svc) as seen:
        r = await post_raw(svc, "/v1/depth", bomb)
    assert seen.jobs == [], "the bomb reached the queue"
    problem = assert_problem(r, 413)
    assert "too large" in problem["detail"] and "pixels" in problem["detail"], problem
    assert problem["limit"] == svc.settings.max_pixels  # the edge's answer: the worker's carries no limit


async def test_413_bomb_under_pillows_guard_is_refused_by_max_pixels_at_the_edge(tiny_dir: TinyDir) -> None:
    """25 Mpx claimed in 81 bytes: under Pillow's guard, so only the service's own `max_pixels` refuses it,
    and at the front-end, from the header: no job is queued and the model never sees it."""
    assert (Image.MAX_IMAGE_PIXELS or 0) > 5000 * 5000
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], max_pixels=1_000_000) as h:
        bomb = png_header_only(5000, 5000)
        outcomes = dict(h.worker.stats.outcomes)
        with submitted_jobs(h) as seen, model_calls(h, "lotus-d-depth") as calls:
            replies = [
                await post_raw(h, "/v1/depth", bomb),
                # Multipart and JSON bodies are probed at the edge too.
                await h.client.post("/v1/depth", files={"image": ("bomb.png", bomb, "image/png")}),
                await h.client.post("/v1/depth", json={"image": base64.b64encode(bomb).decode()}),
            ]
        assert seen.jobs == [], "the bomb reached the queue"
        assert calls.calls == [] and dict(h.worker.stats.outcomes) == outcomes
        for r in replies:
            problem = assert_problem(r, 413)
            assert problem["type"].endswith("/payload_too_large"), problem
            assert "5000 x 5000 = 25000000 pixels" in problem["detail"] and "1000000" in problem["detail"], problem
            assert problem["limit"] == 1_000_000


# --------------------------------------------------------------------------- 415


async def test_415_non_image_bytes_labelled_png(svc: Harness) -> None:
    problem = assert_problem(await post_raw(svc, "/v1/depth", b"this is certainly not a PNG file" * 10), 415)
    assert "not a recognised image" in problem["detail"], problem


async def test_415_text_plain_request(svc: Harness) -> None:
    problem = assert_problem(await post_raw(svc, "/v1/depth", b"hello", ctype="text/plain"), 415)
    assert "text/plain" in problem["detail"] and "multipart/form-data" in problem["detail"], problem


async def test_415_request_without_content_type(svc: Harness) -> None:
    r = await svc.client.post("/v1/normals", content=png_bytes(16, 16))
    assert "content-type" not in r.request.headers
    problem = assert_problem(r, 415)
    assert "(none)" in problem["detail"], problem


async def test_415_truncated_jpeg(svc: Harness) -> None:
    jpeg = jpeg_bytes(128, 128, seed=3)
    assert codec.decode_image(jpeg).shape == (128, 128, 3)
    problem = assert_problem(await post_raw(svc, "/v1/depth", jpeg[: len(jpeg) // 2], ctype="image/jpeg"), 415)
    assert "truncated" in problem["detail"], problem


async def test_415_unsupported_image_format(svc: Harness) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, format="ICO")
    problem = assert_problem(await post_raw(svc, "/v1/depth", buf.getvalue(), ctype="image/x-icon"), 415)
    # Pillow's ICO reader never runs (Image.open(formats=...)), so the refusal names what is supported instead.
    assert "not one of the supported formats" in problem["detail"] and "PNG" in problem["detail"], problem


# --------------------------------------------------------------------------- 422


RAW_422 = [
    ("/v1/depth?processing_res=100", "processing_res"),
    ("/v1/depth?processing_res=2056", "processing_res"),  # a multiple of 8, over max_processing_res (2048)
    ("/v1/depth?processing_res=big", "processing_res"),
    ("/v1/depth?seed=-1", "seed"),
    ("/v1/normals?seed=4294967296", "seed"),
    ("/v1/depth?foo=1", "foo"),
    ("/v1/depth?timeout_ms=300001", "timeout_ms"),
    ("/v1/depth?timeout_ms=0", "timeout_ms"),
    ("/v1/depth?format=webp", "format"),
    ("/v1/uncertainty?seeds=1", "seeds"),
    ("/v1/uncertainty?seeds=33", "seeds"),
    ("/v1/uncertainty?task=segmentation", "task"),
]


@pytest.mark.parametrize(("url", "field"), RAW_422, ids=[u.split("/v1/")[1] for u, _ in RAW_422])
async def test_422_names_the_invalid_query_parameter(svc: Harness, url: str, field: str) -> None:
    with submitted_jobs(svc) as seen:
        problem = assert_problem(await post_raw(svc, url, png_bytes(16, 16)), 422)
    assert_field(problem, field)
    assert problem["type"].endswith("/invalid_parameter")
    assert seen.jobs == [], "refused, yet queued"


async def test_422_processing_res_limit_follows_settings(tiny_dir: TinyDir) -> None:
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], max_processing_res=64) as h:
        problem = assert_problem(await post_raw(h, "/v1/depth?processing_res=72", png_bytes(16, 16)), 422)
        assert_field(problem, "processing_res")
        assert "64" in problem["detail"], problem
        assert (await post_raw(h, "/v1/depth?processing_res=64", png_bytes(16, 16))).status_code == 200


async def test_422_multipart_without_image_field(svc: Harness) -> None:
    r = await svc.client.post("/v1/depth", files={"file": ("x.png", png_bytes(16, 16), "image/png")})
    assert_field(assert_problem(r, 422), "image")


async def test_422_invalid_form_field_in_multipart(svc: Harness) -> None:
    r = await svc.client.post(
        "/v1/depth", files={"image": ("x.png", png_bytes(16, 16), "image/png")}, data={"processing_res": "100"}
    )
    assert_field(assert_problem(r, 422), "processing_res")


async def test_422_json_with_invalid_base64(svc: Harness) -> None:
    r = await svc.client.post("/v1/depth", json={"image": "this is *not* base64!"})
    problem = assert_problem(r, 422)
    assert_field(problem, "image")
    assert "base64" in problem["detail"]


async def test_422_json_without_image_and_invalid_json(svc: Harness) -> None:
    assert_field(assert_problem(await svc.client.post("/v1/depth", json={"seed": 1}), 422), "image")
    r = await post_raw(svc, "/v1/depth", b"{not json", ctype="application/json")
    assert_field(assert_problem(r, 422), "body")


async def test_422_invalid_field_inside_json_body(svc: Harness) -> None:
    body = {"image": base64.b64encode(png_bytes(16, 16)).decode(), "seed": -1}
    assert_field(assert_problem(await svc.client.post("/v1/depth", json=body), 422), "seed")


async def test_422_empty_image(svc: Harness) -> None:
    assert_field(assert_problem(await post_raw(svc, "/v1/depth", b""), 422), "image")


async def test_404_model_that_does_not_serve_the_task(svc: Harness) -> None:
    problem = assert_problem(await post_raw(svc, "/v1/normals?model=lotus-d-depth", png_bytes(16, 16)), 404)
    assert problem["type"].endswith("/task_not_served")
    assert "lotus-d-depth" in problem["detail"] and "normals" in problem["detail"], problem
    r = await post_raw(svc, "/v1/uncertainty?task=normals&model=lotus-g-depth", png_bytes(16, 16))
    assert "lotus-g-depth" in assert_problem(r, 404)["detail"]


async def test_404_uncertainty_on_a_deterministic_model_says_why(svc: Harness) -> None:
    problem = assert_problem(await post_raw(svc, "/v1/uncertainty?model=lotus-d-depth", png_bytes(16, 16)), 404)
    assert problem["type"].endswith("/task_not_served")
    assert "deterministic" in problem["detail"] and "Lotus-G" in problem["detail"], problem


async def test_404_task_without_any_generative_model_for_uncertainty(tiny_dir: TinyDir) -> None:
    async with running_service(tiny_dir, models=[("lotus-d", "depth")]) as h:
        problem = assert_problem(await post_raw(h, "/v1/uncertainty", png_bytes(16, 16)), 404)
        assert "Lotus-G" in problem["detail"], problem
        problem = assert_problem(await post_raw(h, "/v1/normals", png_bytes(16, 16)), 404)
        assert "normals" in problem["detail"], problem


async def test_422_uncertainty_seed_limit_follows_settings(tiny_dir: TinyDir) -> None:
    async with running_service(tiny_dir, models=[("lotus-g", "depth")], uncertainty_max_seeds=4) as h:
        problem = assert_problem(await post_raw(h, "/v1/uncertainty?seeds=5", png_bytes(16, 16)), 422)
        assert_field(problem, "seeds")
        assert "4" in problem["detail"]
        assert (await post_raw(h, "/v1/uncertainty?seeds=4&format=json", png_bytes(16, 16))).status_code == 200


# --------------------------------------------------------------------------- 404, 405, 406, 503


async def test_404_unknown_model(svc: Harness) -> None:
    problem = assert_problem(await post_raw(svc, "/v1/depth?model=no-such-model", png_bytes(16, 16)), 404)
    assert problem["type"].endswith("/model_not_found")
    assert "no-such-model" in problem["detail"] and "lotus-g-depth" in problem["detail"], problem
    assert problem["model"] == "no-such-model"


async def test_unknown_route_and_wrong_method_are_problems(svc: Harness) -> None:
    assert_problem(await svc.client.get("/v1/nowhere"), 404)
    assert_problem(await svc.client.get("/v1/depth"), 405)


async def test_406_unacceptable_accept_header(svc: Harness) -> None:
    r = await post_raw(svc, "/v1/depth", png_bytes(16, 16), accept="text/html")
    assert_problem(r, 406)


async def test_503_before_the_models_are_ready(tiny_dir: TinyDir) -> None:
    async with running_service(tiny_dir, wait_ready=False) as h:
        r = await post_raw(h, "/v1/depth", png_bytes(16, 16))
        assert h.worker.state == "loading", "precondition: the request was answered while models still load"
        problem = assert_problem(r, 503)
        assert "try again" in problem["detail"]
        assert int(r.headers["retry-after"]) >= 1
        ready = await h.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False


# --------------------------------------------------------------------------- 429


async def test_429_queue_full_with_retry_after_while_the_worker_is_busy(tiny_dir: TinyDir) -> None:
    async with running_service(tiny_dir, models=[("lotus-g", "depth")], queue_max_jobs=1, max_batch_size=1) as h:
        slow = await start_slow_job(h)

        async def depth(i: int) -> tuple[httpx.Response, bool]:
            r = await post_raw(h, "/v1/depth?format=npy", png_bytes(32, 32, seed=i))
            return r, slow.done()  # whether the slow job had finished when this answer arrived

        results = await asyncio.gather(*(depth(i) for i in range(5)))
        statuses = [r.status_code for r, _ in results]
        assert set(statuses) <= {200, 429}, statuses
        rejected = [(r, slow_done) for r, slow_done in results if r.status_code == 429]
        accepted = [r for r, _ in results if r.status_code == 200]
        assert rejected and accepted, statuses
        for r, slow_done in rejected:
            assert not slow_done, "a 429 must come while the slow job holds the worker, not after"
            problem = assert_problem(r, 429)
            assert problem["type"].endswith("/queue_full")
            assert "limit 1" in problem["detail"], problem
            assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
        for r in accepted:
            assert read_npy(r.content).shape == (32, 32)
        assert (await slow).status_code == 200
        # Once the worker is free again the queue takes new work.
        assert (await post_raw(h, "/v1/depth", png_bytes(32, 32))).status_code == 200


async def test_429_with_an_idempotency_key_claims_no_key_so_the_retry_is_computed(tiny_dir: TinyDir) -> None:
    async with running_service(tiny_dir, models=[("lotus-g", "depth")], queue_max_jobs=1, max_batch_size=1) as h:
        slow = await start_slow_job(h)
        queued: list[asyncio.Task[httpx.Response]] = []
        for i in range(12):  # fill the lane's read-ahead and the queue until the queue refuses
            task = asyncio.create_task(post_raw(h, "/v1/depth", png_bytes(32, 32, seed=i)))
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done and task.result().status_code == 429:
                break
            queued.append(task)
        else:
            raise AssertionError("the queue never filled while the slow job held the lane")
        assert not slow.done(), "precondition: the queue is full because the slow job holds the lane"
        key = {"idempotency-key": "refused-1"}
        assert_problem(await post_raw(h, "/v1/depth", png_bytes(32, 32), **key), 429)
        assert (await slow).status_code == 200
        await asyncio.gather(*queued)
        retry = await post_raw(h, "/v1/depth?timeout_ms=10000", png_bytes(32, 32), **key)
        assert retry.status_code == 200, retry.text  # not a 504 spent waiting for the refused attempt


# --------------------------------------------------------------------------- 504


async def test_504_deadline_passes_while_queued_and_expired_job_is_never_computed(tiny_dir: TinyDir) -> None:
    async with running_service(tiny_dir, models=[("lotus-g", "depth")], max_batch_size=1) as h:
        stats = h.worker.stats
        with model_calls(h, "lotus-g-depth") as calls:
            slow = await start_slow_job(h)

            r = await post_raw(h, "/v1/depth?timeout_ms=300", png_bytes(32, 32, seed=1))
            assert not slow.done(), "the 504 must come while the slow job still runs"
            problem = assert_problem(r, 504)
            assert problem["type"].endswith("/deadline_exceeded")
            assert "deadline" in problem["detail"]

            r = await post_raw(h, "/v1/depth?timeout_ms=1", png_bytes(32, 32, seed=2))
            assert not slow.done()
            assert_problem(r, 504)

            # With an Idempotency-Key the broker keeps the job for the client's retry (it is not abandoned), so
            # only the worker's own deadline check keeps it from the model.
            r = await post_raw(h, "/v1/depth?timeout_ms=300", png_bytes(32, 32, seed=3), **{"idempotency-key": "e1"})
            assert not slow.done()
            assert_problem(r, 504)

            assert (await slow).status_code == 200
            slow_shapes = calls.shapes()
            # Enqueued after the expired jobs on a FIFO lane of batch size 1: once this one is answered, the lane
            # has read every one of them (and dropped them, or computed them had it not checked).
            last = await post_raw(h, "/v1/depth", png_bytes(32, 32, seed=4))
            assert last.status_code == 200, last.text
        (batch, *size), *_ = reversed(calls.calls)
        small = (size[0], size[1])
        assert small not in slow_shapes and batch == 1, calls.calls
        assert calls.images(small) == 1, f"an expired job reached the model: {calls.calls}"
        assert stats.outcomes[("lotus-g-depth", "ok")] == 2, stats.outcomes
        assert stats.outcomes[("lotus-g-depth", "expired")] >= 1, stats.outcomes  # the keyed one, at least


# --------------------------------------------------------------------------- 500


async def test_500_model_fault_fails_only_the_request_that_caused_it(tiny_dir: TinyDir, tiny_model: TinyModel) -> None:
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], max_queue_delay_ms=300) as h:
        encoder = h.worker.served["lotus-d-depth"].predictor.runtime.core.vae.encoder
        seen_batches: list[int] = []

        def fault(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            seen_batches.append(int(x.shape[0]))
            if bool((x.flatten(1) == -1.0).all(dim=1).any()):
                raise RuntimeError("injected fault")

        handle = encoder.register_forward_pre_hook(fault)
        try:
            images = [
                png_bytes(48, 64, seed=10),
                png_bytes(48, 64, value=0.0),
                png_bytes(48, 64, seed=11),
                png_bytes(48, 64, seed=12),
            ]
            replies = await asyncio.gather(*(post_raw(h, "/v1/depth?format=npy", img) for img in images))
            assert max(seen_batches) > 1, f"the requests were not batched together: {seen_batches}"
            problem = assert_problem(replies[1], 500)
            assert problem["type"].endswith("/model_failure")
            # The exception's text stays in the log; the client reads a generic line and its request id.
            assert "injected fault" not in problem["detail"] and problem["request_id"] in problem["detail"], problem
            for i in (0, 2, 3):
                assert replies[i].status_code == 200, replies[i].text
                expected = direct(tiny_model, "lotus-d", "depth", images[i])
                np.testing.assert_allclose(read_npy(replies[i].content), expected, atol=1e-5)
            assert h.worker.stats.outcomes[("lotus-d-depth", "error")] == 1
            assert h.worker.stats.outcomes[("lotus-d-depth", "ok")] == 3
        finally:
            handle.remove()
        # Without the fault the same black image is served: the worker survived its failure.
        assert (await post_raw(h, "/v1/depth", images[1])).status_code == 200


# --------------------------------------------------------------------------- 401


@pytest.fixture(scope="module")
async def keyed(tiny_dir: TinyDir) -> AsyncIterator[Harness]:
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], api_keys=["secret-1", "secret-2"]) as h:
        yield h


async def test_401_without_a_key(keyed: Harness) -> None:
    for r in (await post_raw(keyed, "/v1/depth", png_bytes(16, 16)), await keyed.client.get("/v1/models")):
        problem = assert_problem(r, 401)
        assert problem["type"].endswith("/unauthorized")
        assert "API key" in problem["detail"]
        assert r.headers["www-authenticate"].lower().startswith("bearer")


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer secret-3"},
        {"x-api-key": "secret"},
        {"authorization": "Basic c2VjcmV0LTE="},
        {"authorization": "Bearer "},
    ],
    ids=["wrong-bearer", "wrong-x-api-key", "basic-scheme", "empty-bearer"],
)
async def test_401_with_a_wrong_key(keyed: Harness, headers: dict[str, str]) -> None:
    r = await post_raw(keyed, "/v1/depth", png_bytes(16, 16), **headers)
    assert_problem(r, 401)
    assert "www-authenticate" in r.headers
    assert_problem(await keyed.client.get("/v1/models", headers=headers), 401)


async def test_valid_keys_are_accepted_either_way(keyed: Harness) -> None:
    r = await post_raw(keyed, "/v1/depth", png_bytes(16, 16), authorization="Bearer secret-2")
    assert r.status_code == 200, r.text
    r = await post_raw(keyed, "/v1/depth", png_bytes(16, 16), **{"x-api-key": "secret-1"})
    assert r.status_code == 200, r.text
    r = await keyed.client.get("/v1/models", headers={"authorization": "bearer secret-1"})
    assert r.status_code == 200 and r.json()["models"][0]["id"] == "lotus-d-depth"


async def test_health_is_exempt_by_default_but_models_is_not(keyed: Harness) -> None:
    assert (await keyed.client.get("/healthz")).status_code == 200
    assert (await keyed.client.get("/readyz")).status_code == 200
    assert_problem(await keyed.client.get("/v1/models"), 401)


async def test_401_on_health_when_not_exempt(tiny_dir: TinyDir) -> None:
    async with running_service(
        tiny_dir, models=[("lotus-d", "depth")], wait_ready=False, api_keys=["secret-1"], auth_exempt_health=False
    ) as h:
        key = {"x-api-key": "secret-1"}
        for path in ("/healthz", "/readyz"):
            r = await h.client.get(path)
            assert_problem(r, 401)
            assert "www-authenticate" in r.headers
        assert (await h.client.get("/healthz", headers=key)).status_code == 200
        loop = asyncio.get_running_loop()
        end = loop.time() + 60
        while (await h.client.get("/readyz", headers=key)).status_code != 200:
            assert loop.time() < end, "service not ready"
            await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- nothing else is lost


async def test_bad_requests_in_a_burst_do_not_disturb_good_ones(svc: Harness, tiny_model: TinyModel) -> None:
    good: list[tuple[str, bytes, Family, Task]] = [
        *[("/v1/depth?format=npy", png_bytes(40, 56, seed=200 + i), "lotus-g", "depth") for i in range(3)],
        *[
            ("/v1/depth?format=npy&model=lotus-d-depth", png_bytes(40, 56, seed=210 + i), "lotus-d", "depth")
            for i in range(3)
        ],
        *[("/v1/normals?format=npy", png_bytes(40, 56, seed=220 + i), "lotus-g", "normals") for i in range(2)],
    ]
    jpeg = jpeg_bytes(64, 64, seed=5)
    image = png_bytes(40, 56)
    bad: list[tuple[str, bytes, dict[str, str], int]] = [
        ("/v1/depth", b"garbage bytes, not an image", PNG, 415),
        ("/v1/depth", b"hello", {"content-type": "text/plain"}, 415),
        ("/v1/depth?model=lotus-d-depth", jpeg[: len(jpeg) // 2], {"content-type": "image/jpeg"}, 415),  # in worker
        ("/v1/normals", jpeg[: len(jpeg) // 2], {"content-type": "image/jpeg"}, 415),
        ("/v1/depth?seed=-1", image, PNG, 422),
        ("/v1/depth?processing_res=100", image, PNG, 422),
        ("/v1/normals?model=lotus-d-depth", image, PNG, 404),
        ("/v1/uncertainty?model=lotus-d-depth", image, PNG, 404),
        ("/v1/depth?model=nope", image, PNG, 404),
        ("/v1/depth", png_header_only(100_000, 100_000), PNG, 413),
        ("/v1/depth?timeout_ms=1", image, PNG, 504),
        ("/v1/depth", image, {**PNG, "accept": "text/html"}, 406),
    ]
    calls = []
    for i in range(max(len(good), len(bad))):  # interleaved, all in flight together
        if i < len(good):
            calls.append(post_raw(svc, good[i][0], good[i][1]))
        if i < len(bad):
            calls.append(svc.client.post(bad[i][0], content=bad[i][1], headers=bad[i][2]))
    replies = await asyncio.gather(*calls)
    good_replies = [r for r in replies if r.request.url.params.get("format") == "npy"]
    bad_replies = [r for r in replies if r.request.url.params.get("format") != "npy"]
    assert len(good_replies) == len(good) and len(bad_replies) == len(bad)
    for (url, image, family, task), r in zip(good, good_replies, strict=True):
        assert str(r.request.url).endswith(url) and r.request.content == image
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(read_npy(r.content), direct(tiny_model, family, task, image), atol=1e-5)
    for (url, _, _, status), r in zip(bad, bad_replies, strict=True):
        assert str(r.request.url).endswith(url)
        assert_problem(r, status)


# --------------------------------------------------------------------------- regressions of bugs found once


def lenient_client(h: Harness) -> httpx.AsyncClient:
    """A client over the same app that hands back the 500 response of an unhandled error instead of raising it."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=h.app, raise_app_exceptions=False), base_url="http://test"
    )


DEEP_JSON = b"[" * 5000 + b"]" * 5000  # 10 KB, far under the upload limit


async def test_deeply_nested_json_body_is_a_422_not_a_500(svc: Harness) -> None:
    async with lenient_client(svc) as client:
        r = await client.post("/v1/depth", content=DEEP_JSON, headers={"content-type": "application/json"})
    problem = assert_problem(r, 422)
    assert_field(problem, "body")


async def test_unhandled_error_response_still_carries_the_request_id_header(svc: Harness) -> None:
    """An unexpected exception (a route added to the real app that raises) is a 500 problem with the id."""

    async def boom() -> None:
        raise RuntimeError("unexpected failure")

    if not any(getattr(r, "path", None) == "/boom" for r in svc.app.routes):
        svc.app.add_api_route("/boom", boom)
    async with lenient_client(svc) as client:
        r = await client.get("/boom", headers={"x-request-id": "trace-42"})
    problem = assert_problem(r, 500)
    assert problem["request_id"] == "trace-42" and "trace-42" in problem["detail"]
    assert "unexpected failure" not in problem["detail"] and "RuntimeError" not in problem["detail"], problem
    assert r.headers.get("x-request-id") == "trace-42", dict(r.headers)


async def test_lowering_max_timeout_does_not_reject_requests_without_timeout(tiny_dir: TinyDir) -> None:
    # Below the default deadline alone, the configuration is refused up front, naming both settings...
    with pytest.raises(ValidationError, match=r"default_timeout_ms \(30000\) exceeds max_timeout_ms \(1000\)"):
        Settings(max_timeout_ms=1000)
    # ... and lowered consistently, a request without timeout_ms is served, while a longer one is refused.
    async with running_service(
        tiny_dir, models=[("lotus-d", "depth")], max_timeout_ms=20_000, default_timeout_ms=15_000
    ) as h:
        r = await post_raw(h, "/v1/depth", png_bytes(16, 16))
        assert r.status_code == 200, r.text
        too_long = await post_raw(h, "/v1/depth?timeout_ms=20001", png_bytes(16, 16))
        assert_field(assert_problem(too_long, 422), "timeout_ms")


async def test_uncertainty_max_seeds_above_32_is_refused_and_a_lower_one_takes_effect(tiny_dir: TinyDir) -> None:
    # A limit above the API's hard cap of 32 is refused up front rather than silently not honoured...
    with pytest.raises(ValidationError, match="uncertainty_max_seeds"):
        Settings(uncertainty_max_seeds=40)
    # ... and a lower one takes effect.
    async with running_service(tiny_dir, models=[("lotus-g", "depth")], uncertainty_max_seeds=4) as h:
        r = await post_raw(h, "/v1/uncertainty?seeds=4&format=json", png_bytes(16, 16))
        assert r.status_code == 200, r.text
        assert len(r.json()["seeds"]) == 4
        problem = assert_problem(await post_raw(h, "/v1/uncertainty?seeds=5&format=json", png_bytes(16, 16)), 422)
        assert_field(problem, "seeds")


# --------------------------------------------------------------------------- configuration


TOML_CONFIG = """
host = "0.0.0.0"
port = 9001
models = ["lotus-g-depth", "lotus-d-depth"]
max_pixels = 1234567
api_keys = ["from-file"]
max_queue_delay_ms = 7.5
"""

YAML_CONFIG = """
host: 0.0.0.0
port: 9001
models:
  - lotus-g-depth
  - lotus-d-depth
max_pixels: 1234567
api_keys: [from-file]
max_queue_delay_ms: 7.5
"""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("DENSE_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(("name", "text"), [("dense.toml", TOML_CONFIG), ("dense.yaml", YAML_CONFIG)])
def test_config_file_values_apply(tmp_path: Path, clean_env: pytest.MonkeyPatch, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    s = load_settings(path)
    assert (s.host, s.port, s.max_pixels, s.max_queue_delay_ms) == ("0.0.0.0", 9001, 1234567, 7.5)
    assert s.models == ["lotus-g-depth", "lotus-d-depth"]
    assert [k.get_secret_value() for k in s.api_keys] == ["from-file"]
    assert s.max_upload_bytes == 20 * 2**20  # untouched keys keep their defaults
    assert CONFIG_ENV not in os.environ, "load_settings leaves the environment as it found it"


@pytest.mark.parametrize(("name", "text"), [("dense.toml", TOML_CONFIG), ("dense.yml", YAML_CONFIG)])
def test_env_overrides_file_and_explicit_overrides_beat_env(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, name: str, text: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    clean_env.setenv("DENSE_PORT", "9100")
    clean_env.setenv("DENSE_MODELS", "a.toml, b.toml")
    clean_env.setenv("DENSE_API_KEYS", "k1,k2")
    s = load_settings(path)
    assert s.port == 9100 and s.models == ["a.toml", "b.toml"]
    assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"]
    assert s.max_pixels == 1234567  # still from the file

    clean_env.setenv("DENSE_MODELS", json.dumps(["x", "y", "z"]))
    assert load_settings(path).models == ["x", "y", "z"]

    s = load_settings(path, port=9200, models=["cli"], host=None)
    assert s.port == 9200 and s.models == ["cli"]
    assert s.host == "0.0.0.0", "a None override (flag not given) leaves the file/env value"


def test_env_without_a_file(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DENSE_MAX_PIXELS", "777")
    clean_env.setenv("DENSE_AUTH_EXEMPT_HEALTH", "false")
    s = load_settings()
    assert s.max_pixels == 777 and s.auth_exempt_health is False
    assert load_settings(max_pixels=5).max_pixels == 5


@pytest.mark.parametrize(
    ("name", "text"),
    [("bad.toml", "port = 9001\nbogus_key = 1\n"), ("bad.yaml", "port: 9001\nbogus_key: 1\n")],
)
def test_unknown_key_in_the_file_is_an_error(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, name: str, text: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValidationError, match="bogus_key"):
        load_settings(path)


def test_invalid_values_in_the_file_are_errors(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("max_processing_res = 100\n")
    with pytest.raises(ValidationError, match="multiple of 8"):
        load_settings(path)
    path.write_text("port = 70000\n")
    with pytest.raises(ValidationError, match="port"):
        load_settings(path)


def test_missing_or_unsupported_config_file(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path)  # a directory is not a config file
    other = tmp_path / "dense.ini"
    other.write_text("port = 1\n")
    with pytest.raises(ValueError, match=r"\.toml"):
        load_settings(other)
