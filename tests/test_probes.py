"""Diffusion-feature probes: feature taps per family, a learning test on labelled synthetic scenes, the hash
check, and `/v1/segment` through the real embedded service."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.errors import ModelLoadError
from models.probes.features import TapConfig, decoder_layers, extract, feature_dim, layer_channels
from models.spec import load_spec_file
from tests.service_harness import read_npy, read_png16, running_service

ROOT = Path(__file__).resolve().parent.parent
DEMO_SPEC = ROOT / "models" / "demo" / "lotus-d-synthetic-demo.toml"
CI_RES = 96
#: A module fixture trains or exports a model: run first, by one worker (WHOLE_MODULES in conftest.py).
pytestmark = pytest.mark.heavy


@pytest.mark.parametrize("family", ["lotus-g", "lotus-d", "e2e-ft"])
def test_extraction_returns_the_configured_blocks_at_the_right_shapes(tiny_model, family) -> None:
    base = tiny_model(family, "depth")
    core = base.runtime.core
    unet = core.unet
    assert len(decoder_layers(unet)) == 4 and layer_channels(unet) == [64, 64, 32, 32]
    taps = TapConfig(blocks=(1, 3), timesteps=(999, 500), stride=2)
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    latent = core.encode(images)
    feats, x0 = extract(core, latent, taps)
    assert feats.shape == (2, feature_dim(unet, taps), 32, 48) == (2, 2 * (64 + 32), 32, 48)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
    # The t = 999 pass is the prediction's own pass (same x0), and the taps leave no hooks behind.
    noise = core.make_noise([0, 0], (8, 12))
    assert torch.allclose(x0, core.predict_latent(latent, noise), atol=1e-6)
    assert all(not layer._forward_hooks for layer in decoder_layers(unet))
    # Each image's features are its own (Lotus-G's fixed noise is one latent for the whole batch).
    alone, _ = extract(core, latent[:1], taps)
    assert torch.allclose(alone[0], feats[0], atol=1e-4)
    # Timesteps change the features; stride sets the grid.
    only_999, _ = extract(core, latent, TapConfig(blocks=(1, 3), timesteps=(999,), stride=4))
    assert only_999.shape == (2, 96, 16, 24)
    assert not torch.allclose(feats[:, 96:, ::2, ::2], feats[:, :96, ::2, ::2])
    with pytest.raises(ValueError, match=r"layers 0\.\.3"):
        extract(core, latent, TapConfig(blocks=(4,)))


def test_labelled_folder_round_trip_and_clear_errors(tmp_path: Path) -> None:
    from models.probes.data import read_folder, synthetic, write_folder

    classes, images = synthetic(3, 24, 32, seed=7)
    assert classes == ["sky", "floor", "ceiling", "wall", "box", "sphere"]
    assert all(img.labels.max() < len(classes) and img.rgb.dtype == np.uint8 for img in images)
    write_folder(tmp_path / "set", classes, images)
    read_classes, read_images = read_folder(tmp_path / "set")
    assert read_classes == classes
    for a, b in zip(images, read_images, strict=True):
        assert a.name == b.name and np.array_equal(a.rgb, b.rgb) and np.array_equal(a.labels, b.labels)
    assert len(read_folder(tmp_path / "set", limit=2)[1]) == 2
    bad = images[0].labels.copy()
    bad[0, 0] = 9
    Image.fromarray(bad, mode="L").save(tmp_path / "set" / "labels" / f"{images[0].name}.png")
    with pytest.raises(ValueError, match=r"class indices \[9\] but classes.json names 6"):
        read_folder(tmp_path / "set")
    (tmp_path / "set" / "labels" / f"{images[0].name}.png").unlink()
    with pytest.raises(FileNotFoundError, match="needs its label PNG"):
        read_folder(tmp_path / "set")


def test_train_from_a_labelled_folder_writes_probe_toml_weights_and_eval(tiny_dir, tmp_path: Path) -> None:
    """The folder source end to end, on a tiny Lotus-G (noise input) with two timesteps: the artifacts only."""
    from models.probes.artifact import ProbeManifest, load_probe
    from models.probes.data import synthetic, write_folder
    from models.probes.train import ProbeConfig, train_probe

    classes, images = synthetic(4, 32, 40, seed=11)
    write_folder(tmp_path / "set", classes, images)
    cfg = ProbeConfig.model_validate(
        {
            "id": "folder-probe",
            "base": str(tiny_dir("lotus-g", "depth")),
            "features": {"blocks": [1, 2], "timesteps": [999, 300], "stride": 4, "processing_res": 32},
            "train_data": {"type": "folder", "path": str(tmp_path / "set"), "limit": 3},
            "eval_data": {"type": "synthetic", "count": 2, "height": 24, "width": 24, "seed": 12},
            "train": {"members": 2, "hidden": [16, 8], "epochs": 1, "pixels_per_image": 64},
            "output_dir": str(tmp_path / "probe"),
        }
    )
    report = train_probe(cfg)
    manifest, ensemble = load_probe(tmp_path / "probe")
    assert manifest == ProbeManifest.read(tmp_path / "probe")
    assert manifest.classes == classes and manifest.timesteps == [999, 300] and manifest.family == "lotus-g"
    assert manifest.feature_dim == 2 * (64 + 32) and len(ensemble.members) == 2 and len(manifest.base_hash) == 64
    assert report["train_images"] == 3 and report["images"] == 2
    assert {"miou", "per_class_iou", "pixel_accuracy", "majority_baseline"} <= set(report)


def test_majority_vote_counts_members_and_breaks_ties_by_probability() -> None:
    from models.probes.mlp import PixelEnsemble, vote

    class Fixed(PixelEnsemble):
        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return features  # the "features" are the members' logits here: [M, B, C, h, w]

    # Pixel 0: two members say class 2 (barely), one says class 0 (very sure): the vote is 2.
    # Pixel 1: one vote each for classes 0 and 1 and 2 (a tie): the most probable on average wins (class 1).
    logits = torch.tensor(
        [
            [[0.0, 0.0], [0.0, 5.0], [0.1, 0.0]],
            [[0.0, 0.0], [0.0, 0.0], [0.1, 4.0]],
            [[9.0, 3.0], [0.0, 0.0], [0.0, 0.0]],
        ]
    ).reshape(3, 1, 3, 1, 2)
    labels = vote(Fixed(1, 3, members=3).scores(logits, (1, 2)))
    assert labels.tolist() == [[[2, 1]]]


@pytest.fixture(scope="module")
def trained_probe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A small probe on the shipped demo model, trained as `dense-serve probe train` does (the CI learning run)."""
    from models.probes.train import ProbeConfig, train_probe

    cfg = ProbeConfig.model_validate(
        {
            "id": "rooms-ci",
            "base": str(DEMO_SPEC),
            "features": {"blocks": [0, 1, 2, 3], "timesteps": [999], "stride": 2, "processing_res": CI_RES},
            "train_data": {"type": "synthetic", "count": 12, "height": CI_RES, "width": CI_RES, "seed": 101},
            "eval_data": {"type": "synthetic", "count": 8, "height": CI_RES, "width": CI_RES, "seed": 202},
            "train": {"members": 3, "hidden": [64, 32], "epochs": 3, "pixels_per_image": 512, "threads": 1},
            "output_dir": str(tmp_path_factory.mktemp("probe") / "rooms-ci"),
        }
    )
    report = train_probe(cfg)
    return Path(cfg.output_dir), report


def test_probe_learns_classes_well_above_the_majority_class(trained_probe) -> None:
    folder, report = trained_probe
    assert json.loads((folder / "eval.json").read_text()) == report
    manifest = (folder / "probe.toml").read_text()
    assert 'base_model = "lotus-d-synthetic-demo"' in manifest and "base_hash" in manifest
    majority = report["majority_baseline"]
    # The majority class (wall) everywhere: mIoU 0.045, accuracy 0.27 on these scenes. Measured for the probe
    # (3 MLPs on 12 scenes): mIoU 0.23, accuracy 0.59; the tiny demo UNet knows geometry more than objects.
    assert report["majority_class"] == "wall"
    assert majority["miou"] < 0.06 and majority["pixel_accuracy"] < 0.35
    assert report["miou"] > 0.15 and report["miou"] > 3 * majority["miou"]
    assert report["pixel_accuracy"] > majority["pixel_accuracy"] + 0.15
    assert set(report["per_class_iou"]) <= {"sky", "floor", "ceiling", "wall", "box", "sphere"}


def test_a_probe_refuses_another_base_checkpoint(trained_probe, tmp_path: Path) -> None:
    from models.loading import load_model, resolve_source
    from models.probes.segmenter import Probe

    folder, _ = trained_probe
    spec = load_spec_file(DEMO_SPEC)
    source = resolve_source(spec)
    base = load_model(spec)
    assert Probe.attach(folder, base, source).classes[0] == "sky"  # its own base: fine
    other = tmp_path / "model"
    shutil.copytree(source, other)
    from safetensors.torch import load_file, save_file

    weights = other / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    first = next(iter(state))
    state[first] = state[first] + 1e-3  # a fine-tuned sibling: same architecture, other weights
    save_file(state, str(weights))
    with pytest.raises(ModelLoadError, match="only works on the exact base"):
        Probe.attach(folder, base, other)


def _image(h: int, w: int, seed: int = 3) -> tuple[bytes, np.ndarray]:
    from models.probes.data import synthetic

    _, images = synthetic(1, h, w, seed)
    buf = io.BytesIO()
    Image.fromarray(images[0].rgb).save(buf, format="PNG")
    return buf.getvalue(), images[0].labels


@pytest.mark.anyio
async def test_segment_endpoint_formats_models_and_combined_pass(trained_probe, tiny_dir) -> None:
    folder, _ = trained_probe
    spec = load_spec_file(DEMO_SPEC)
    data, truth = _image(80, 120)
    async with running_service(tiny_dir, specs=[spec], probes=[str(folder)], grpc_enabled=True, grpc_port=0) as h:
        models = (await h.client.get("/v1/models")).json()["models"]
        probe = next(m for m in models if m["id"] == "rooms-ci")
        assert probe["task"] == "segment" and probe["output_kind"] == "segmentation"
        assert probe["classes"] == ["sky", "floor", "ceiling", "wall", "box", "sphere"]
        assert probe["base_model"] == "lotus-d-synthetic-demo"

        files = {"image": ("scene.png", data, "image/png")}
        r = await h.client.post("/v1/segment", files=files)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.headers["x-output-kind"] == "segmentation"
        index = np.asarray(Image.open(io.BytesIO(r.content)))
        assert index.dtype == np.uint8 and index.shape == (80, 120) and index.max() < 6
        assert (index == truth).mean() > 0.5  # a real map of the scene, at the input size

        r = await h.client.post("/v1/segment?format=npy", files=files)
        assert np.array_equal(read_npy(r.content), index)

        r = await h.client.post("/v1/segment?format=color", files=files)
        overlay = Image.open(io.BytesIO(r.content))
        assert overlay.mode == "RGB" and overlay.size == (120, 80)

        r = await h.client.post("/v1/segment?format=json", files=files)
        body = r.json()
        assert body["kind"] == "segmentation" and body["classes"][0] == "sky"
        assert sum(body["class_pixels"].values()) == 80 * 120
        assert body["class_pixels"] == {c: int((index == i).sum()) for i, c in enumerate(body["classes"])}

        # One UNet pass for both answers equals two separate requests.
        r = await h.client.post("/v1/segment?format=json&with_depth=true", files=files)
        both = r.json()
        assert both["depth_kind"] == "disparity"
        seg = np.asarray(Image.open(io.BytesIO(_b64(both["outputs"]["prediction"]["data"]))))
        assert np.array_equal(seg, index)
        depth = await h.client.post(f"/v1/depth?processing_res={CI_RES}", files=files)
        assert np.array_equal(read_png16(_b64(both["outputs"]["depth"]["data"])), read_png16(depth.content))

        # A 1080p image: the class map comes back at 1080p (the votes are resized, one member at a time).
        big = io.BytesIO()
        Image.fromarray(np.asarray(Image.open(io.BytesIO(data)).resize((1920, 1080)))).save(big, format="PNG")
        r = await h.client.post("/v1/segment?format=npy", files={"image": ("big.png", big.getvalue(), "image/png")})
        assert r.status_code == 200 and read_npy(r.content).shape == (1080, 1920)

        # gRPC: the same request vocabulary (task TASK_SEGMENT), the same map.
        import grpc

        from service.grpc.stubs import dense_pb2 as pb
        from service.grpc.stubs.dense_pb2_grpc import DenseServiceStub

        async with grpc.aio.insecure_channel(f"127.0.0.1:{h.app.state.grpc.port}") as channel:
            stub = DenseServiceStub(channel)
            listed = {m.id: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
            assert list(listed["rooms-ci"].classes) == probe["classes"] and listed["rooms-ci"].task == "segment"
            reply = await stub.Predict(pb.PredictRequest(encoded=data, task=pb.TASK_SEGMENT))
            assert reply.kind == "segmentation" and reply.encoding == pb.OUTPUT_ENCODING_PNG16
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(reply.data))), index)
            assert dict(reply.class_pixels) == body["class_pixels"] and list(reply.classes) == body["classes"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(
                    pb.PredictRequest(encoded=data, task=pb.TASK_SEGMENT, encoding=pb.OUTPUT_ENCODING_EXR)
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # Clear errors.
        r = await h.client.post("/v1/segment?format=exr", files=files)
        assert r.status_code == 422 and "format" in r.text
        r = await h.client.post("/v1/segment?with_depth=true&format=png", files=files)
        assert r.status_code == 422 and "with_depth" in r.text
        r = await h.client.post("/v1/depth?model=rooms-ci", files=files)  # a model that does not serve the task
        assert r.status_code == 404 and "segmentation, not depth" in r.text
        r = await h.client.post("/v1/segment?model=lotus-d-synthetic-demo", files=files)
        assert r.status_code == 404 and "not segment" in r.text


def _b64(data: str) -> bytes:
    import base64

    return base64.b64decode(data)


def test_onnx_export_of_taps_and_mlps_matches_torch(tiny_model, tmp_path: Path) -> None:
    """`probe_head.onnx`: the base map, the taps and every member's logits, equal to the eager pass."""
    import onnxruntime as ort

    from models.probes.export import OUTPUTS, ProbeHeadGraph, export_probe_onnx
    from models.probes.mlp import PixelEnsemble

    core = tiny_model("lotus-g", "depth").runtime.core  # generative: the graph takes noise too
    taps = TapConfig(blocks=(0, 2, 3), timesteps=(999, 400), stride=2)
    torch.manual_seed(0)
    ensemble = PixelEnsemble(feature_dim(core.unet, taps), 5, members=3, hidden=(32, 16)).eval()
    path = export_probe_onnx(core, taps, ensemble, tmp_path / "probe_head.onnx", latent_hw=(5, 7))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    latent, noise = torch.randn((2, 4, 8, 12), generator=gen), torch.randn((2, 4, 8, 12), generator=gen)
    got = session.run(list(OUTPUTS), {"latent": latent.numpy(), "noise": noise.numpy()})
    with torch.inference_mode():
        want = ProbeHeadGraph(core, taps, ensemble)(latent, noise)
    for name, g, w in zip(OUTPUTS, got, want, strict=True):
        assert g.shape == tuple(w.shape), name
        assert np.abs(g - w.numpy()).max() < 1e-3, name
    assert got[1].shape == (2, 2 * (64 + 32 + 32), 32, 48) and got[2].shape == (3, 2, 5, 32, 48)


@pytest.mark.anyio
async def test_segment_on_the_redis_queue_equals_the_embedded_queue(trained_probe, tiny_dir, redis_url, redis_prefix):
    """A probe's jobs travel on its base model's Redis stream; the worker publishes the probe in its heartbeat."""
    folder, _ = trained_probe
    spec = load_spec_file(DEMO_SPEC)
    data, _ = _image(48, 64, seed=5)
    files = {"image": ("scene.png", data, "image/png")}
    answers = []
    for queue in ({}, {"queue": "redis", "redis_url": redis_url, "redis_prefix": redis_prefix}):
        async with running_service(tiny_dir, specs=[spec], probes=[str(folder)], **queue) as h:
            models = {m["id"]: m for m in (await h.client.get("/v1/models")).json()["models"]}
            assert models["rooms-ci"]["classes"][0] == "sky"
            r = await h.client.post("/v1/segment?format=npy", files=files)
            assert r.status_code == 200, r.text
            answers.append(read_npy(r.content))
    assert np.array_equal(answers[0], answers[1])
