"""The gRPC front-end over a real channel: unary parity with REST, ordered streams, drop-stale, cancel,
bad frames, auth, health, reflection, the Redis queue, and the committed stubs."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

import service.worker.registry as registry
from service.grpc.codegen import meaning_differences
from service.grpc.stubs import dense_pb2 as pb
from service.grpc.stubs.dense_pb2_grpc import DenseServiceStub
from service.worker.float_maps import decode_exr, decode_tiff
from tests.service_harness import (
    Harness,
    model_calls,
    png_bytes,
    read_npy,
    running_service,
    submitted_jobs,
    until_ready,
)

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def grpc_service(tiny_dir, **kw) -> AsyncIterator[tuple[Harness, DenseServiceStub, grpc.aio.Channel]]:
    async with running_service(tiny_dir, grpc_enabled=True, grpc_port=0, **kw) as h:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{h.app.state.grpc.port}") as channel:
            yield h, DenseServiceStub(channel), channel


def frame(image: bytes, i: int, **kw) -> pb.StreamRequest:
    return pb.StreamRequest(frame=pb.PredictRequest(encoded=image, frame_id=i, timestamp_ns=1000 + i, **kw))


async def test_unary_equals_rest_and_raw_input_equals_encoded(tiny_dir) -> None:
    async with grpc_service(tiny_dir) as (h, stub, _):
        image = png_bytes(40, 56, seed=1)
        rest = await h.client.post("/v1/depth?format=npy&seed=3", content=image, headers={"content-type": "image/png"})
        reply = await stub.Predict(
            pb.PredictRequest(
                encoded=image, seed=3, frame_id=7, timestamp_ns=99, encoding=pb.OUTPUT_ENCODING_RAW_FLOAT32
            )
        )
        got = np.frombuffer(reply.data, dtype="<f4").reshape(tuple(reply.shape))
        np.testing.assert_array_equal(got, read_npy(rest.content))
        assert (reply.frame_id, reply.timestamp_ns, reply.status, reply.kind, reply.seed) == (7, 99, 0, "depth", 3)
        assert reply.model == "lotus-g-depth" and reply.compute_ms > 0 and reply.total_ms >= reply.compute_ms
        rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
        raw = await stub.Predict(
            pb.PredictRequest(
                raw=pb.RawImage(height=40, width=56, data=rgb.tobytes()),
                seed=3,
                encoding=pb.OUTPUT_ENCODING_RAW_FLOAT32,
            )
        )
        assert raw.data == reply.data
        half = await stub.Predict(pb.PredictRequest(encoded=image, seed=3, task=pb.TASK_NORMALS))
        assert half.dtype == "float16" and tuple(half.shape) == (40, 56, 3) and len(half.data) == 40 * 56 * 3 * 2
        for encoding, decode in (
            (pb.OUTPUT_ENCODING_EXR, decode_exr),
            (pb.OUTPUT_ENCODING_TIFF, decode_tiff),
        ):
            answer = await stub.Predict(pb.PredictRequest(encoded=image, seed=3, encoding=encoding))
            assert answer.encoding == encoding and answer.dtype == {4: "exr", 5: "tiff"}[encoding]
            tolerance = 2**-11 if encoding == pb.OUTPUT_ENCODING_EXR else 0.0
            assert np.abs(decode(answer.data).astype(np.float32) - got).max() <= tolerance
        models = await stub.ListModels(pb.ListModelsRequest())
        assert {m.id for m in models.models} == {"lotus-g-depth", "lotus-g-normals", "lotus-d-depth"}


async def test_unary_errors_are_status_codes(tiny_dir) -> None:
    async with grpc_service(tiny_dir) as (_h, stub, _):
        cases = [
            (pb.PredictRequest(encoded=b"not an image"), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.PredictRequest(), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.PredictRequest(encoded=png_bytes(8, 8), model="nope"), grpc.StatusCode.NOT_FOUND),
            (pb.PredictRequest(encoded=png_bytes(8, 8), processing_res=100), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.PredictRequest(raw=pb.RawImage(height=4, width=4, data=b"123")), grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for request, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(request)
            assert err.value.code() == code and err.value.details()


async def test_stream_of_100_frames_in_order(tiny_dir) -> None:
    """Frames of mixed sizes and resolutions: a batch takes jobs of one processing shape, so later frames finish
    before earlier ones; the answers still come in frame order, each with its own frame's map."""
    async with grpc_service(tiny_dir, models=[("lotus-d", "depth")], max_queue_delay_ms=20) as (h, stub, _):
        sizes = [(24, 32), (32, 24), (40, 40), (24, 32), (16, 48), (32, 24), (24, 32)]
        shapes = [sizes[i % len(sizes)] for i in range(100)]
        images = [png_bytes(hh, ww, seed=i) for i, (hh, ww) in enumerate(shapes)]
        res = [128 if i % 9 == 4 else 0 for i in range(100)]  # some frames cost 4x the others
        frame_of = {image: i for i, image in enumerate(images)}

        async def frames() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(config=pb.StreamConfig(max_in_flight=8))
            for i in range(100):
                yield frame(images[i], i, **({"processing_res": res[i]} if res[i] else {}))

        with submitted_jobs(h) as seen:
            replies = [r async for r in stub.StreamPredict(frames())]
        finished = [frame_of[job.image] for job in seen.answered]
        assert sorted(finished) == list(range(100))
        assert finished != sorted(finished), "every frame finished in order: the test would not see a reordering"
        assert [r.frame_id for r in replies] == list(range(100))
        assert all(r.status == pb.FRAME_STATUS_OK for r in replies)
        assert [tuple(r.shape) for r in replies] == shapes  # each answer is its own frame's map
        for i in (0, 1, 2, 4, 13):  # and equals the frame computed alone
            kw = {"processing_res": res[i]} if res[i] else {}
            alone = await stub.Predict(pb.PredictRequest(encoded=images[i], **kw))
            got, want = (np.frombuffer(r.data, dtype="<f2").astype(np.float32) for r in (replies[i], alone))
            np.testing.assert_allclose(got, want, atol=2e-3)
        assert max(h.worker.stats.batch_sizes("lotus-d-depth")) > 1  # the window lets frames batch


async def test_drop_stale_keeps_latency_bounded_under_a_slow_worker(tiny_dir) -> None:
    async with grpc_service(tiny_dir, models=[("lotus-d", "depth")]) as (h, stub, _):
        image = png_bytes(96, 128)

        async def frames() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(config=pb.StreamConfig(max_in_flight=1, drop_stale=True))
            for i in range(30):  # far faster than 256 px frames are served
                yield frame(image, i, processing_res=256)
                await asyncio.sleep(0.01)

        with model_calls(h, "lotus-d-depth") as calls:
            replies = [r async for r in stub.StreamPredict(frames())]
        ok = [r for r in replies if r.status == pb.FRAME_STATUS_OK]
        dropped = [r for r in replies if r.status == pb.FRAME_STATUS_DROPPED]
        assert [r.frame_id for r in replies] == list(range(30))
        assert len(ok) + len(dropped) == 30 and len(dropped) >= 10 and ok
        assert replies[-1].status == pb.FRAME_STATUS_OK  # the latest frame always wins
        assert calls.images() == len(ok), calls.calls  # dropped frames never reached the model
        # Bounded: a served frame waited behind at most the one frame in flight.
        assert max(r.queue_ms for r in ok) < 3 * max(r.compute_ms for r in ok) + 100


async def test_cancelling_a_stream_leaves_no_queued_work(tiny_dir) -> None:
    async with grpc_service(tiny_dir, models=[("lotus-d", "depth")], max_batch_size=1) as (h, stub, _):
        image = png_bytes(96, 128)
        sent = asyncio.Event()

        async def frames() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(config=pb.StreamConfig(max_in_flight=8))
            for i in range(8):
                yield frame(image, i, processing_res=256)
            sent.set()
            await asyncio.Event().wait()  # the stream stays open until the client cancels it

        with model_calls(h, "lotus-d-depth") as calls:
            call = stub.StreamPredict(frames())
            first = await call.read()
            assert first.frame_id == 0
            await asyncio.wait_for(sent.wait(), timeout=30)
            call.cancel()
            frame_shapes = calls.shapes()
            # A frame of another size, queued after the stream's on a FIFO lane of batch size 1: once it is answered,
            # the lane has read every frame the stream had queued, and dropped (or computed) it.
            last = await stub.Predict(pb.PredictRequest(encoded=png_bytes(24, 24)), timeout=60)
            assert last.status == pb.FRAME_STATUS_OK
        (batch, *size), *_ = reversed(calls.calls)
        assert batch == 1 and (size[0], size[1]) not in frame_shapes, calls.calls
        computed = calls.images() - 1
        assert 1 <= computed <= 3, calls.calls  # the answered frame and at most the batches already computing
        assert h.app.state.broker.depth("lotus-d-depth") == 0


async def test_bad_frames_mid_stream_and_the_stream_goes_on(tiny_dir) -> None:
    async with grpc_service(tiny_dir, models=[("lotus-d", "depth")]) as (_h, stub, _):
        good = png_bytes(24, 24)

        async def frames() -> AsyncIterator[pb.StreamRequest]:
            yield frame(good, 0)
            yield frame(b"garbage", 1)
            yield pb.StreamRequest(frame=pb.PredictRequest(raw=pb.RawImage(height=5, width=5, data=b"x"), frame_id=2))
            yield frame(good, 3, model="missing")
            yield frame(good, 4)

        replies = [r async for r in stub.StreamPredict(frames())]
        assert [r.frame_id for r in replies] == [0, 1, 2, 3, 4]
        assert [r.status for r in replies] == [0, 2, 2, 2, 0]
        assert replies[1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and replies[1].error_message
        assert replies[3].error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_auth_health_and_reflection(tiny_dir, monkeypatch) -> None:
    import threading

    gate = threading.Event()
    real = registry.load_model
    monkeypatch.setattr(registry, "load_model", lambda spec: (gate.wait(60), real(spec))[1])
    async with (
        running_service(
            tiny_dir,
            models=[("lotus-d", "depth")],
            wait_ready=False,
            grpc_enabled=True,
            grpc_port=0,
            api_keys=["k1"],
        ) as h,
        grpc.aio.insecure_channel(f"127.0.0.1:{h.app.state.grpc.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="dense.v1.DenseService")
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        gate.set()
        await until_ready(h.client)
        for _ in range(40):
            if (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.1)
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING

        stub = DenseServiceStub(channel)
        request = pb.PredictRequest(encoded=png_bytes(16, 16))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(request)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(request, metadata=[("x-api-key", "wrong")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await stub.Predict(request, metadata=[("authorization", "Bearer k1")])).status == 0
        assert (await stub.Predict(request, metadata=[("x-api-key", "k1")])).status == 0

        refl = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = [s.name async for r in refl.ServerReflectionInfo(ask()) for s in r.list_services_response.service]
        assert "dense.v1.DenseService" in names and "grpc.health.v1.Health" in names


async def test_works_on_the_redis_queue(tiny_dir, redis_url, redis_prefix) -> None:
    async with grpc_service(
        tiny_dir, models=[("lotus-d", "depth")], queue="redis", redis_url=redis_url, redis_prefix=redis_prefix
    ) as (_h, stub, _):
        reply = await stub.Predict(pb.PredictRequest(encoded=png_bytes(24, 24)))
        assert reply.status == pb.FRAME_STATUS_OK and reply.kind == "depth"

        async def frames() -> AsyncIterator[pb.StreamRequest]:
            for i in range(10):
                yield frame(png_bytes(24, 24, seed=i), i)

        assert [r.frame_id async for r in stub.StreamPredict(frames())] == list(range(10))


def test_committed_stubs_match_the_proto() -> None:
    """Messages, fields, enums, services, methods and comments, compared by meaning (not text: a grpcio-tools
    patch release rewrites only the banner); byte-identical codegen is tests/test_grpc_codegen.py's."""
    assert meaning_differences() == [], "the committed stubs are stale: run make proto"


async def test_standalone_grpc_process_serves_redis_workers(tiny_dir, redis_url, redis_prefix) -> None:
    """`dense-serve grpc` in its own process, a worker elsewhere, joined by Redis."""
    import os
    import signal
    import subprocess
    import sys

    from tests.redis_server import free_port

    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "grpc",
            "--redis-url",
            redis_url,
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--no-auth",
        ],
        env={**os.environ, "DENSE_REDIS_PREFIX": redis_prefix},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # never read: a pipe could fill and stall the process
    )
    try:
        async with (
            running_service(
                tiny_dir, models=[("lotus-d", "depth")], queue="redis", redis_url=redis_url, redis_prefix=redis_prefix
            ),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            end = asyncio.get_running_loop().time() + 120  # a process start on a loaded CI machine
            while asyncio.get_running_loop().time() < end:
                assert proc.poll() is None, "the gRPC process exited"
                try:
                    status = (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
            reply = await DenseServiceStub(channel).Predict(pb.PredictRequest(encoded=png_bytes(24, 24)), timeout=30)
            assert reply.status == pb.FRAME_STATUS_OK and reply.model == "lotus-d-depth"
            # Its HTTP side: probes and the gRPC request metrics of this process.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{metrics_port}") as http:
                assert (await http.get("/healthz")).status_code == 200
                assert (await http.get("/readyz")).json()["models"] == {"lotus-d-depth": True}
                text = (await http.get("/metrics")).text
                assert (
                    'dense_request_duration_seconds_count{frontend="grpc",model="lotus-d-depth",route="Predict"' in text
                )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_reflection_serves_the_proto_comments(tiny_dir) -> None:
    """A reflection client (what grpcurl describe, Postman or an IDE does) gets dense.proto with its comments,
    and still gets the other services' files (health, reflection) from the runtime's pool."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    from service.grpc.descriptors import comparable

    async with grpc_service(tiny_dir, models=[("lotus-d", "depth")]) as (h, _stub, _):

        def ask() -> tuple[descriptor_pb2.FileDescriptorProto, descriptor_pb2.FileDescriptorProto]:
            # the stock client is synchronous: it runs in a thread while this loop serves
            with grpc.insecure_channel(f"127.0.0.1:{h.app.state.grpc.port}") as channel:
                db = ProtoReflectionDescriptorDatabase(channel)
                assert "dense.v1.DenseService" in db.get_services()
                return db.FindFileContainingSymbol("dense.v1.DenseService"), db.FindFileContainingSymbol(
                    "grpc.health.v1.Health"
                )

        served, health_file = await asyncio.to_thread(ask)
    service = next(i for i, s in enumerate(served.service) if s.name == "DenseService")
    predict = next(i for i, m in enumerate(served.service[service].method) if m.name == "Predict")
    message = next(i for i, m in enumerate(served.message_type) if m.name == "PredictRequest")
    field = next(i for i, f in enumerate(served.message_type[message].field) if f.name == "processing_res")
    comments = {tuple(loc.path): loc for loc in served.source_code_info.location}
    # FileDescriptorProto: message_type = 4, service = 6; DescriptorProto.field = 2; ServiceDescriptorProto.method = 2
    assert comments[(6, service, 2, predict)].leading_comments == " One image, one map.\n"
    assert comments[(4, message)].leading_comments.startswith(" The same request vocabulary as REST")
    assert comments[(4, message, 2, field)].trailing_comments.startswith(" unset: the model's default")
    assert comparable(served) == comparable(descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb))
    assert [s.name for s in health_file.service] == ["Health"] and health_file.package == "grpc.health.v1"


def test_a_stale_descriptor_set_is_not_served() -> None:
    """A commented set that no longer matches the loaded stubs is left out: reflection serves the loaded file
    (without comments) rather than a description the server does not implement."""
    from google.protobuf import descriptor_pb2

    from service.grpc.descriptors import file_proto, reflection_pool
    from service.grpc.stubs.dense_descriptor_set import SERIALIZED

    stale = descriptor_pb2.FileDescriptorSet.FromString(SERIALIZED)
    stale.file[0].message_type[0].field[0].name = "renamed"
    pool = reflection_pool(stale.SerializeToString())
    served = descriptor_pb2.FileDescriptorProto()
    pool.FindFileContainingSymbol("dense.v1.DenseService").CopyToProto(served)
    assert served == file_proto(pb.DESCRIPTOR) and not served.source_code_info.location
    current = descriptor_pb2.FileDescriptorProto()
    reflection_pool().FindFileByName(pb.DESCRIPTOR.name).CopyToProto(current)
    assert current.source_code_info.location


async def test_processing_res_over_the_limit_says_what_rest_says(tiny_dir) -> None:
    """One sentence for a refused processing_res, from the request vocabulary both front-ends share: it names
    the server's limit (2048 by default), not the request model's hard cap (16384), without pydantic's
    "Value error, " prefix; INVALID_ARGUMENT over gRPC, 422 over REST, in a unary call and a stream frame."""
    for settings, values, limit in (({}, (2056, 4096, 20000, 100), 2048), ({"max_processing_res": 64}, (72,), 64)):
        async with grpc_service(tiny_dir, models=[("lotus-d", "depth")], **settings) as (h, stub, _):
            image = png_bytes(16, 16)
            for value in values:
                rest = await h.client.post(
                    f"/v1/depth?processing_res={value}", content=image, headers={"content-type": "image/png"}
                )
                assert rest.status_code == 422, rest.text
                detail = rest.json()["detail"]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Predict(pb.PredictRequest(encoded=image, processing_res=value))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details() == detail, (value, detail)
                assert dict(err.value.trailing_metadata())["dense-error-field"] == "processing_res"

                async def frames(image: bytes = image, v: int = value) -> AsyncIterator[pb.StreamRequest]:
                    yield frame(image, 0, processing_res=v)

                (answer,) = [r async for r in stub.StreamPredict(frames())]
                assert answer.status == pb.FRAME_STATUS_ERROR and answer.error_message == detail
                assert "Value error" not in detail and "16384" not in detail
                if value % 8 == 0:
                    assert detail == f"processing_res: Input should be less than or equal to {limit}"
                else:
                    assert detail == "processing_res: Input should be a multiple of 8"
