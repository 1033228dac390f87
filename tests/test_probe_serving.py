"""Probes served beyond the embedded REST path: gRPC streams of segmentation frames, and front-ends that
declare a probe from its probe.toml so its jobs queue on Redis before any worker announced it."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.inference import BatchItem
from models.spec import load_spec_file
from service.grpc.stubs import dense_pb2 as pb
from service.grpc.stubs.dense_pb2_grpc import DenseServiceStub
from tests.service_harness import read_npy, read_png16, running_service
from tests.test_probes import CI_RES, DEMO_SPEC, _b64, _image, trained_probe  # noqa: F401  (trained_probe: a fixture)

#: A module fixture trains or exports a model: run first, by one worker (WHOLE_MODULES in conftest.py).
pytestmark = [pytest.mark.anyio, pytest.mark.heavy]


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


def test_marigold_features_tap_the_unet_on_the_image_latent_noised_to_t(tiny_model) -> None:
    """Marigold: the UNet reads [image latent, x_t] with x_t = scheduler.add_noise(image latent, fixed-seed
    noise, t); the configured blocks come back at the configured grid, per image, and depend on t and the seed."""
    from models.predictors.base import seeded_noise
    from models.probes.features import TapConfig, decoder_layers, extract, feature_dim, tapped
    from models.probes.marigold_features import MarigoldFeatureCore
    from models.probes.segmenter import torch_core

    base = tiny_model("marigold", "depth")
    core = torch_core(base)
    assert isinstance(core, MarigoldFeatureCore) and core.unet is base.core.unet  # shared, not copied
    taps = TapConfig(blocks=(1, 3), timesteps=(999, 250), stride=2, noise_seed=5)
    latent = core.encode(torch.rand(2, 3, 64, 96) * 2 - 1)
    with torch.inference_mode():
        feats, _ = extract(core, latent, taps)
        assert feats.shape == (2, feature_dim(core.unet, taps), 32, 48) == (2, 2 * (64 + 32), 32, 48)
        assert torch.isfinite(feats).all() and all(not layer._forward_hooks for layer in decoder_layers(core.unet))
        # The recipe, by hand: block 1 at t = 250 on [latent, add_noise(latent, seed-5 noise, 250)].
        noise = seeded_noise([5], (8, 12)).expand(2, -1, -1, -1)
        t = torch.full((2,), 250, dtype=torch.long)
        x_t = base.core.new_scheduler(4).add_noise(latent, noise, t)
        with tapped(core.unet, [1]) as captured:
            base.core.denoise(latent, x_t, t)
        by_hand = F.interpolate(captured[1].float(), size=(32, 48), mode="bilinear", align_corners=False)
        assert torch.allclose(feats[:, 96:160], by_hand, atol=1e-5)
        alone, _ = extract(core, latent[:1], taps)  # one fixed noise latent for the batch: per-image features
        assert torch.allclose(alone[0], feats[0], atol=1e-4)
        other_seed, _ = extract(core, latent, TapConfig(blocks=(1, 3), timesteps=(999, 250), stride=2, noise_seed=6))
        assert not torch.allclose(other_seed, feats)
        assert not torch.allclose(feats[:, :96], feats[:, 96:])  # t changes the features


@pytest.fixture(scope="module")
def marigold_probe(tiny_dir, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`probe train` with a tiny (random-weight) Marigold as the base: the artifacts, not a learning claim."""
    from models.probes.train import ProbeConfig, train_probe

    cfg = ProbeConfig.model_validate(
        {
            "id": "rooms-marigold",
            "base": str(tiny_dir("marigold", "depth")),
            "features": {"blocks": [1, 2, 3], "timesteps": [999, 250], "stride": 4, "processing_res": 64},
            "train_data": {"type": "synthetic", "count": 4, "height": 48, "width": 64, "seed": 301},
            "eval_data": {"type": "synthetic", "count": 2, "height": 48, "width": 64, "seed": 302},
            "train": {"members": 2, "hidden": [16, 8], "epochs": 1, "pixels_per_image": 128},
            "output_dir": str(tmp_path_factory.mktemp("probe") / "rooms-marigold"),
        }
    )
    return Path(cfg.output_dir), train_probe(cfg)


def test_training_a_probe_on_a_marigold_base(marigold_probe) -> None:
    from models.probes.artifact import ProbeManifest

    folder, report = marigold_probe
    manifest = ProbeManifest.read(folder)
    assert manifest.family == "marigold" and manifest.base_model == "marigold-depth"
    assert manifest.timesteps == [999, 250] and manifest.feature_dim == 2 * (64 + 32 + 32)
    assert report["images"] == 2 and 0.0 <= report["miou"] <= 1.0


async def test_segment_on_a_marigold_base_and_its_depth_from_its_own_run(marigold_probe, tiny_dir) -> None:
    """A probe on a served Marigold model: /v1/segment answers class maps at the input size; with_depth adds
    the base's own multi-step map (no shared pass: the features' input is not a denoising step), equal to
    /v1/depth with the same seed and steps; steps and seed reach that depth run."""
    folder, _ = marigold_probe
    image, _ = _image(40, 56, seed=60)
    files = {"image": ("f.png", image, "image/png")}
    async with running_service(tiny_dir, models=[("marigold", "depth")], probes=[str(folder)]) as h:
        models = {m["id"]: m for m in (await h.client.get("/v1/models")).json()["models"]}
        assert models["rooms-marigold"]["family"] == "marigold" and models["rooms-marigold"]["task"] == "segment"
        r = await h.client.post("/v1/segment?format=npy", files=files)
        assert r.status_code == 200, r.text
        labels = read_npy(r.content)
        assert labels.shape == (40, 56) and labels.max() < 6
        depths = []
        for query in ("seed=3", "seed=3&steps=2"):
            both = await h.client.post(f"/v1/segment?format=json&with_depth=true&{query}", files=files)
            assert both.status_code == 200, both.text
            body = both.json()
            seg = np.asarray(Image.open(io.BytesIO(_b64(body["outputs"]["prediction"]["data"]))))
            assert np.array_equal(seg, labels)
            depth = await h.client.post(f"/v1/depth?processing_res=64&{query}", files=files)
            want = read_png16(depth.content)
            got = read_png16(_b64(body["outputs"]["depth"]["data"]))
            assert got.shape == want.shape == (40, 56) and np.array_equal(got, want), query
            depths.append(got)
        assert not np.array_equal(depths[0], depths[1])  # steps=2 reached the depth run (4 by default)


def test_a_lotus_g_probe_on_onnxruntime_feeds_the_graph_its_fixed_noise(tiny_dir, tmp_path) -> None:
    """Lotus-G's UNet input holds noise: the ONNX graph gets the probe's fixed-seed latent, as the hooks do, so
    class maps and the combined depth (which reports that seed) agree with the torch backend's."""
    from models.loading import load_model, resolve_source
    from models.probes.heads import OnnxProbeHead
    from models.probes.segmenter import Probe
    from models.probes.train import ProbeConfig, train_probe
    from models.spec import resolve_spec

    source = str(tiny_dir("lotus-g", "depth"))
    cfg = ProbeConfig.model_validate(
        {
            "id": "g-probe",
            "base": source,
            "features": {"blocks": [1, 3], "timesteps": [999, 300], "stride": 2, "noise_seed": 7, "processing_res": 64},
            "train_data": {"type": "synthetic", "count": 3, "height": 48, "width": 64, "seed": 401},
            "eval_data": {"type": "synthetic", "count": 1, "height": 48, "width": 64, "seed": 402},
            "train": {"members": 2, "hidden": [16, 8], "epochs": 1, "pixels_per_image": 64},
            "output_dir": str(tmp_path / "g-probe"),
        }
    )
    train_probe(cfg)
    answers = []
    for backend in ("torch", "onnxruntime"):
        spec = resolve_spec(source, backend=backend, engine_cache=str(tmp_path / "engines"), device="cpu")
        base = load_model(spec)
        probe = Probe.attach(tmp_path / "g-probe", base, resolve_source(spec), tmp_path / "engines")
        assert isinstance(probe.head, OnnxProbeHead) == (backend == "onnxruntime") and probe.head.seeded
        image, _ = _image(48, 64, seed=70)
        rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
        items = [BatchItem(rgb, base.plan(rgb, 64), base.resolve_seed(None))] * 2
        segments, depth = probe.segment(items, with_depth=True)
        assert depth is not None and depth[0].seed == 7
        answers.append((segments[0].labels, depth[0].array))
    (labels_t, depth_t), (labels_o, depth_o) = answers
    assert (labels_t == labels_o).mean() >= 0.999
    assert np.abs(depth_t - depth_o).max() < 1e-4


def test_a_declared_probe_whose_base_the_front_end_does_not_name_is_refused(trained_probe, tmp_path) -> None:  # noqa: F811
    """`api --model X --probe DIR` where the probe runs on another model: one clear line, as `serve` says it;
    an unreadable folder names the file."""
    from models.errors import ModelLoadError, SpecError
    from models.spec import ModelSpec
    from service.processes import frontend_probes

    folder, _ = trained_probe
    other = ModelSpec(id="other-model", source="elsewhere")
    with pytest.raises(SpecError, match=r"runs on model 'lotus-d-synthetic-demo'.*add --model lotus-d-synthetic-demo"):
        frontend_probes([str(folder)], [other])
    assert [p.id for p in frontend_probes([str(folder)], [])] == ["rooms-ci"]  # no list: nothing to check against
    with pytest.raises(ModelLoadError, match=r"probe\.toml: not a readable probe manifest"):
        frontend_probes([str(tmp_path)], [])
