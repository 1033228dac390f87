"""Probes served beyond the embedded REST path: gRPC streams of segmentation frames, and front-ends that
declare a probe from its probe.toml so its jobs queue on Redis before any worker announced it."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from PIL import Image

from models.inference import BatchItem
from models.spec import load_spec_file
from service.grpc.stubs import dense_pb2 as pb
from service.grpc.stubs.dense_pb2_grpc import DenseServiceStub
from tests.service_harness import read_npy, read_png16, running_service
from tests.test_probes import CI_RES, DEMO_SPEC, _b64, _image, trained_probe  # noqa: F401  (trained_probe: a fixture)

pytestmark = pytest.mark.anyio


async def test_stream_of_segment_frames_equals_unary_answers(trained_probe, tiny_dir) -> None:  # noqa: F811
    """Frames of mixed sizes (several batches of one shape each), a depth frame among them on the same base
    queue, the stream's steps_auto on: every segment answer, in frame order, equals the unary gRPC Predict and the
    REST /v1/segment map."""
    folder, _ = trained_probe
    spec = load_spec_file(DEMO_SPEC)
    sizes = [(48, 64), (64, 48), (48, 64), (40, 40), (48, 64), (64, 48)]
    images = [_image(h, w, seed=20 + i)[0] for i, (h, w) in enumerate(sizes)]
    settings = {"grpc_enabled": True, "grpc_port": 0, "max_queue_delay_ms": 30}
    async with running_service(tiny_dir, specs=[spec], probes=[str(folder)], **settings) as h:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{h.app.state.grpc.port}") as channel:
            stub = DenseServiceStub(channel)

            async def frames() -> AsyncIterator[pb.StreamRequest]:
                yield pb.StreamRequest(config=pb.StreamConfig(max_in_flight=8, steps_auto=True))
                for i, image in enumerate(images):
                    yield pb.StreamRequest(
                        frame=pb.PredictRequest(encoded=image, frame_id=i, task=pb.TASK_SEGMENT, model="rooms-ci")
                    )
                    if i == 2:  # the base model's own task on the same queue, between probe frames
                        yield pb.StreamRequest(frame=pb.PredictRequest(encoded=image, frame_id=100))
                yield pb.StreamRequest(
                    frame=pb.PredictRequest(
                        encoded=images[0], frame_id=7, task=pb.TASK_SEGMENT, encoding=pb.OUTPUT_ENCODING_NPY
                    )
                )

            replies = [r async for r in stub.StreamPredict(frames())]
            assert [r.frame_id for r in replies] == [0, 1, 2, 100, 3, 4, 5, 7]
            assert all(r.status == pb.FRAME_STATUS_OK for r in replies), [r.error_message for r in replies]
            by_id = {r.frame_id: r for r in replies}
            assert by_id[100].kind == "disparity" and by_id[100].model == "lotus-d-synthetic-demo"
            for i, image in enumerate(images):
                streamed = by_id[i]
                assert streamed.kind == "segmentation" and streamed.model == "rooms-ci"
                assert streamed.encoding == pb.OUTPUT_ENCODING_PNG16 and tuple(streamed.shape) == sizes[i]
                unary = await stub.Predict(pb.PredictRequest(encoded=image, task=pb.TASK_SEGMENT))
                rest = await h.client.post("/v1/segment?format=npy", files={"image": ("f.png", image, "image/png")})
                labels = np.asarray(Image.open(io.BytesIO(streamed.data)))
                assert np.array_equal(labels, np.asarray(Image.open(io.BytesIO(unary.data))))
                assert np.array_equal(labels, read_npy(rest.content))
                assert dict(streamed.class_pixels) == dict(unary.class_pixels)
                assert list(streamed.classes) == list(unary.classes)
            assert np.array_equal(read_npy(by_id[7].data), np.asarray(Image.open(io.BytesIO(by_id[0].data))))
            assert max(h.worker.stats.batch_sizes("lotus-d-synthetic-demo")) > 1  # frames did batch


async def test_a_front_end_declares_a_probe_and_its_jobs_wait_for_a_later_worker(
    trained_probe,  # noqa: F811
    tiny_dir,
    redis_url,
    redis_prefix,
) -> None:
    """Scale from zero with a probe: the API process reads probe.toml (no worker has ever run), lists it as
    ready, queues a /v1/segment job on the base model's stream; a worker started later answers it."""
    folder, _ = trained_probe
    spec = load_spec_file(DEMO_SPEC)
    image, _ = _image(48, 64, seed=31)
    files = {"image": ("scene.png", image, "image/png")}
    redis = {"queue": "redis", "redis_url": redis_url, "redis_prefix": redis_prefix}
    front = {"specs": [spec], "probes": [str(folder)], "with_worker": False, "wait_ready": False, **redis}
    async with running_service(tiny_dir, **front) as plain:  # without scale_from_zero: refused, not queued
        assert (await plain.client.post("/v1/segment", files=files)).status_code == 503
    async with running_service(tiny_dir, scale_from_zero=True, **front) as api:
        broker = api.app.state.broker
        end = time.monotonic() + 10
        while (ready := await api.client.get("/readyz")).status_code != 200:
            assert time.monotonic() < end, ready.json()
            await asyncio.sleep(0.05)
        assert ready.json()["models"] == {"lotus-d-synthetic-demo": True, "rooms-ci": True}
        assert await broker.catalog() == []  # no worker has ever served either
        declared = {m.id: m for m in await broker.dormant_models()}
        probe = declared["rooms-ci"]
        assert (probe.task, probe.output_kind, probe.base_model) == ("segment", "segmentation", spec.id)
        assert probe.classes == ["sky", "floor", "ceiling", "wall", "box", "sphere"] and probe.family == "lotus-d"
        waiting = asyncio.create_task(api.client.post("/v1/segment?format=npy&timeout_ms=60000", files=files))
        while (await broker.queue_stats(spec.id)).lag != 1:  # on the base model's stream, where KEDA looks
            assert not waiting.done(), waiting.result().text
            await asyncio.sleep(0.05)
        async with running_service(tiny_dir, specs=[spec], probes=[str(folder)], **redis) as worker:
            reply = await asyncio.wait_for(waiting, timeout=60)
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-model"] == "rooms-ci"
            direct = await worker.client.post("/v1/segment?format=npy", files=files)
            assert np.array_equal(read_npy(reply.content), read_npy(direct.content))


def test_the_api_process_declares_a_probe_without_torch(trained_probe, redis_url, redis_prefix, tmp_path) -> None:  # noqa: F811
    """`dense-serve api --probe DIR` as a real process with torch unimportable: it reads probe.toml, declares
    the probe to Redis (where front-ends look for dormant models), and imports no model library."""
    import redis

    from service.queue.redis.keys import Keys
    from tests.redis_server import free_port
    from tests.test_lean_frontends import assert_lean, start_frontend, wait_http

    folder, _ = trained_probe
    port, log = free_port(), tmp_path / "api.log"
    api = start_frontend(
        "api", "--redis-url", redis_url, "--port", str(port), "--probe", str(folder), prefix=redis_prefix, log=log
    )
    wait_http(api, log, f"http://127.0.0.1:{port}/healthz")
    client = redis.Redis.from_url(redis_url)
    end = time.monotonic() + 10
    while not (known := client.hgetall(Keys(redis_prefix).known_models())):
        assert time.monotonic() < end, "the probe was never declared"
        time.sleep(0.05)
    info = json.loads(known[b"rooms-ci"])
    assert (info["task"], info["base_model"], info["classes"][0]) == ("segment", "lotus-d-synthetic-demo", "sky")
    assert_lean(api, log)


async def test_a_probe_on_an_onnxruntime_base_answers_as_on_torch(trained_probe, tiny_dir, tmp_path) -> None:  # noqa: F811
    """The base exported to ONNX and served on ONNX Runtime (CPU); the probe runs from its own ONNX graph,
    exported into the engine cache at attach time. Class maps agree with the torch backend's on >= 99.9 % of the
    pixels (two graphs of float math: a pixel whose two top classes tie to ~1e-5 may flip), depth from the same
    pass equals the ONNX base's own /v1/depth to one 16-bit PNG step. Measured: every pixel and depth value equal."""
    folder, _ = trained_probe
    torch_spec = load_spec_file(DEMO_SPEC)
    ort_spec = torch_spec.model_copy(update={"backend": "onnxruntime", "engine_cache": str(tmp_path / "engines")})
    images = [_image(h, w, seed=40 + i)[0] for i, (h, w) in enumerate([(48, 64), (80, 120), (48, 64)])]
    answers: dict[str, list[np.ndarray]] = {}
    for name, spec in (("torch", torch_spec), ("onnxruntime", ort_spec)):
        async with running_service(tiny_dir, specs=[spec], probes=[str(folder)]) as h:
            models = {m["id"]: m for m in (await h.client.get("/v1/models")).json()["models"]}
            assert models["rooms-ci"]["backend"] == name
            replies = await asyncio.gather(
                *(h.client.post("/v1/segment?format=npy", files={"image": ("f.png", im, "image/png")}) for im in images)
            )
            assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
            answers[name] = [read_npy(r.content) for r in replies]
            if name == "onnxruntime":
                graphs = list((tmp_path / "engines" / "probes").glob("rooms-ci-*/probe_head.onnx"))
                assert len(graphs) == 1 and graphs[0].with_name("probe_head.onnx.json").is_file()
                files = {"image": ("f.png", images[1], "image/png")}
                both = (await h.client.post("/v1/segment?format=json&with_depth=true", files=files)).json()
                depth = await h.client.post(f"/v1/depth?processing_res={CI_RES}", files=files)
                got = read_png16(_b64(both["outputs"]["depth"]["data"])).astype(np.int32)
                want = read_png16(depth.content).astype(np.int32)
                assert np.abs(got - want).max() <= 1  # measured: 0 (one 16-bit step allowed for the two graphs)
    for t, o in zip(answers["torch"], answers["onnxruntime"], strict=True):
        assert t.shape == o.shape
        agree = (t == o).mean()
        assert agree >= 0.999, agree


def test_the_probe_folders_own_graph_is_served_when_its_key_matches(trained_probe, tmp_path) -> None:  # noqa: F811
    """`dense-serve probe export DIR --out DIR/probe_head.onnx` writes the graph, its logits-only twin and the
    probe's key: attaching to an ONNX Runtime base then uses it as is (nothing exported into the cache); once the
    probe's files change, the key no longer matches and the graph is exported into the cache instead."""
    from models.loading import load_model, resolve_source
    from models.probes.heads import OnnxProbeHead
    from models.probes.segmenter import Probe
    from service.cli import main

    folder = tmp_path / "probe"
    shutil.copytree(trained_probe[0], folder)
    assert main(["probe", "export", str(folder), "--out", str(folder / "probe_head.onnx")]) == 0
    assert {p.name for p in folder.glob("probe_*.onnx*")} == {
        "probe_head.onnx",
        "probe_logits.onnx",
        "probe_head.onnx.json",
    }
    spec = load_spec_file(DEMO_SPEC).model_copy(
        update={"backend": "onnxruntime", "engine_cache": str(tmp_path / "engines")}
    )
    base = load_model(spec)
    probe = Probe.attach(folder, base, resolve_source(spec), tmp_path / "engines")
    assert isinstance(probe.head, OnnxProbeHead) and probe.head.graph == folder / "probe_head.onnx"
    assert not (tmp_path / "engines" / "probes").exists()
    with (folder / "probe.toml").open("a") as fh:
        fh.write("# edited\n")  # any change to the probe's files: the folder's graph is stale
    probe = Probe.attach(folder, base, resolve_source(spec), tmp_path / "engines")
    assert probe.head.graph.parent.parent == tmp_path / "engines" / "probes"
    image, _ = _image(48, 64, seed=50)
    items = [BatchItem(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")), base.plan_size(48, 64, CI_RES))]
    segments, _ = probe.segment(items)
    assert segments[0].labels.shape == (48, 64)
