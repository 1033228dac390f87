"""Metrics and logs for real: requests through the running service move the Prometheus series they should,
the worker's HTTP side answers probes, and a request's id and traceparent reach the worker's log lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import logs, metrics
from service.worker.http import worker_app
from tests.service_harness import png_bytes, running_service

pytestmark = pytest.mark.anyio
MODEL = "lotus-g-depth"


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab))


@pytest.fixture(scope="module")
async def svc(tiny_dir):
    async with running_service(tiny_dir) as harness:
        yield harness


async def metrics_now(svc) -> dict:
    r = await svc.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return scrape(r.text)


async def test_requests_move_the_request_batch_stage_and_queue_series(svc) -> None:
    lane = svc.worker.lanes[MODEL]
    image = png_bytes(48, 64, seed=1)

    def post(body: bytes) -> asyncio.Task[httpx.Response]:
        return asyncio.create_task(svc.client.post("/v1/depth", content=body, headers={"content-type": "image/png"}))

    before = await metrics_now(svc)
    # A first request holds the device (its real UNet pass paused in a pre-hook) until the four others are read
    # and decoded: they then must form one batch however slowly this machine runs, with no timing window involved.
    with held_device(svc, MODEL) as (entered, release):
        first = post(png_bytes(64, 64, seed=7))
        await until(lambda: entered.is_set() or first.done(), "the first request reaches the device")
        assert not first.done(), first.result().text
        four = [post(image) for _ in range(4)]
        await until(lambda: len(lane._pending) == 4 and not lane._decoding, "the four requests wait, decoded")
        assert lane.busy
        release.set()
        replies = await asyncio.gather(first, *four)
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert svc.worker.stats.batch_sizes(MODEL)[-2:] == [1, 4]
    bad = await svc.client.post("/v1/depth", content=b"not an image", headers={"content-type": "image/png"})
    assert bad.status_code == 415
    after = await metrics_now(svc)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"frontend": "rest", "route": "/v1/depth", "model": MODEL, "task": "depth", "status": "200"}
    assert delta("dense_request_duration_seconds_count", **ok) == 5
    assert delta("dense_request_duration_seconds_sum", **ok) > 0
    assert delta("dense_request_duration_seconds_count", route="/v1/depth", status="415") == 1
    assert delta("dense_request_bytes_total", frontend="rest", route="/v1/depth") >= 4 * len(image)
    assert delta("dense_response_bytes_total", frontend="rest", route="/v1/depth") > 0
    assert value(after, "dense_requests_in_flight", frontend="rest") == 0  # a scrape does not count itself
    # Two forward passes: the first request alone, then the four that waited behind it together.
    assert delta("dense_batch_size_count", model=MODEL) == 2 and delta("dense_batch_size_sum", model=MODEL) == 5
    assert delta("dense_queue_wait_seconds_count", model=MODEL) == 5
    for stage in ("preprocess", "encode", "unet_decode", "postprocess", "output_encode"):
        assert delta("dense_compute_seconds_count", model=MODEL, stage=stage) == 2, stage
    assert delta("dense_compute_idle_seconds_count", model=MODEL) == 2
    assert delta("dense_jobs_total", model=MODEL, status="ok") == 5
    assert value(after, "dense_model_info", model=MODEL, backend="torch", device="cpu") == 1
    assert value(after, "dense_model_load_seconds", model=MODEL) > 0


@contextmanager
def held_device(svc, model_id: str) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Pause the served model's first UNet pass (a forward pre-hook on the module the worker runs, in the compute
    thread) until the test sets `release`; `entered` tells that the pass began. Later passes run freely."""
    unet = svc.worker.served[model_id].predictor.runtime.core.unet
    entered, release = threading.Event(), threading.Event()

    def hold(_module: object, _args: object) -> None:
        if not entered.is_set():
            entered.set()
            release.wait(60)

    handle = unet.register_forward_pre_hook(hold)
    try:
        yield entered, release
    finally:
        release.set()
        handle.remove()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll `condition` on the event loop (the service runs on it too) until it holds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not condition():
        assert loop.time() < end, f"timed out waiting: {what}"
        await asyncio.sleep(0.005)


async def test_expired_jobs_are_counted_and_queue_gauges_are_sampled(tiny_dir) -> None:
    async with running_service(
        tiny_dir, models=[("lotus-g", "depth")], max_batch_size=1, metrics_interval_s=0.05
    ) as svc:
        before = await metrics_now(svc)
        # A real multi-seed job occupies the device; the next request waits behind it past its deadline.
        slow = asyncio.create_task(
            svc.client.post(
                "/v1/uncertainty?seeds=32&processing_res=256&format=json",
                content=png_bytes(64, 64, seed=9),
                headers={"content-type": "image/png"},
            )
        )
        lane = svc.worker.lanes[MODEL]
        while not lane.busy:
            assert not slow.done(), slow.result().text
            await asyncio.sleep(0.01)
        r = await svc.client.post(
            "/v1/depth?timeout_ms=100", content=png_bytes(32, 32, seed=2), headers={"content-type": "image/png"}
        )
        assert r.status_code == 504
        assert not slow.done(), "the 504 must come while the slow job computes"
        assert (await slow).status_code == 200
        # The API gave up at the deadline, so the lane finds the job abandoned, or expired; never computed.
        gone = 0.0
        for _ in range(200):
            after = await metrics_now(svc)
            gone = sum(
                value(after, f"dense_jobs_{what}_total", model=MODEL)
                - value(before, f"dense_jobs_{what}_total", model=MODEL)
                for what in ("abandoned", "expired")
            )
            if gone:
                break
            await asyncio.sleep(0.02)
        assert gone == 1
        assert (
            value(after, "dense_jobs_total", model=MODEL, status="ok")
            - value(before, "dense_jobs_total", model=MODEL, status="ok")
            == 1
        )  # the slow job only
        assert delta_count(before, after, "dense_batch_size_count", model=MODEL) == 1
        assert ("dense_queue_depth", (("model", MODEL),)) in after
        assert (
            value(after, "dense_request_duration_seconds_count", route="/v1/depth", status="504")
            - value(before, "dense_request_duration_seconds_count", route="/v1/depth", status="504")
            == 1
        )


def delta_count(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_worker_http_side_answers_probes_and_metrics(tiny_dir) -> None:
    async with running_service(tiny_dir, models=[("lotus-d", "depth")]) as svc:
        app = worker_app(svc.worker)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as client:
            assert (await client.get("/healthz")).json()["status"] == "ready"
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["models"] == ["lotus-d-depth"]
            m = await client.get("/metrics")
            assert "dense_model_info" in m.text
        svc.worker.state = "failed"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as client:
            assert (await client.get("/healthz")).status_code == 503
            assert (await client.get("/readyz")).status_code == 503
        svc.worker.state = "ready"


async def test_request_id_and_traceparent_reach_the_worker_logs_as_json(svc) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logs.configure("debug", "json", role="serve")
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    try:
        r = await svc.client.post(
            "/v1/depth",
            content=png_bytes(40, 40, seed=3),
            headers={"content-type": "image/png", "x-request-id": "req-42", "traceparent": traceparent},
        )
        assert r.status_code == 200
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    lines = [json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]
    worker_lines = [x for x in lines if x["logger"] == "service.worker.lane" and x["request_id"] == "req-42"]
    assert worker_lines, lines
    assert worker_lines[0]["traceparent"] == traceparent and worker_lines[0]["role"] == "serve"
    assert {"time", "level", "message"} <= set(worker_lines[0])


async def test_malformed_traceparent_is_replaced_by_a_new_trace() -> None:
    assert logs.valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert logs.valid_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01") is None
    assert logs.valid_traceparent("garbage") is None
    assert logs.valid_traceparent(logs.new_traceparent())


async def test_grpc_calls_are_measured(tiny_dir) -> None:
    import grpc

    from service.grpc.stubs import dense_pb2 as pb
    from service.grpc.stubs import dense_pb2_grpc

    async with running_service(tiny_dir, models=[("lotus-d", "depth")], grpc_enabled=True, grpc_port=0) as svc:
        port = svc.app.state.grpc.port
        before = scrape((await svc.client.get("/metrics")).text)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = dense_pb2_grpc.DenseServiceStub(channel)
            reply = await stub.Predict(pb.PredictRequest(encoded=png_bytes(32, 48, seed=4), task=pb.TASK_DEPTH))
            assert reply.status == pb.FRAME_STATUS_OK
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Predict(pb.PredictRequest(encoded=b"nope", task=pb.TASK_DEPTH))
        after = scrape((await svc.client.get("/metrics")).text)
        ok = {"frontend": "grpc", "route": "Predict", "model": "lotus-d-depth", "status": "OK"}
        assert (
            value(after, "dense_request_duration_seconds_count", **ok)
            - value(before, "dense_request_duration_seconds_count", **ok)
            == 1
        )
        bad = {"frontend": "grpc", "route": "Predict", "status": "INVALID_ARGUMENT"}
        assert (
            value(after, "dense_request_duration_seconds_count", **bad)
            - value(before, "dense_request_duration_seconds_count", **bad)
            == 1
        )
        assert metrics.REQUESTS_IN_FLIGHT.labels("grpc")._value.get() == 0


async def test_otel_spans_join_api_and_worker_through_the_queue(svc) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service import tracing

    exporter = InMemorySpanExporter()
    tracing.setup(True, "serve", exporter=exporter)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        r = await svc.client.post(
            "/v1/depth",
            content=png_bytes(40, 40, seed=5),
            headers={"content-type": "image/png", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
        assert r.status_code == 200
    finally:
        tracing.setup(False, "serve")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"dense.request", "dense.queue", "dense.compute"}
    request, compute = spans["dense.request"], spans["dense.compute"]
    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {trace_id}
    assert request.parent.span_id == 0x00F067AA0BA902B7  # the client's span
    # The worker's spans are children of the API's span: the traceparent travelled inside the job.
    assert compute.parent.span_id == request.context.span_id == spans["dense.queue"].parent.span_id
    assert compute.attributes["model"] == MODEL and compute.attributes["batch_size"] == 1
    assert request.start_time <= spans["dense.queue"].start_time <= compute.end_time <= request.end_time
