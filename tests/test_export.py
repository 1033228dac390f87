"""Exported backends on the CPU: ONNX export of every family, ONNX Runtime parity with the torch predictor,
manifests, Triton repositories, the engine cache, and the service end to end on `backend=onnxruntime`.

GPU-only paths (ONNX Runtime CUDA fp16, TensorRT, a Triton server) run when their hardware and software are
present and are skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from models.errors import ModelLoadError
from models.export import manifest as manifest_mod
from models.export.exporter import ExportError, export_model
from models.export.manifest import Manifest, checkpoint_hash
from models.export.profiles import bucket_profiles, pick_profile
from models.export.triton_repo import model_names, read_config
from models.inference import BatchItem
from models.loading import load_model
from models.runtime.base import BackendError
from models.spec import ModelSpec, resolve_spec
from service.config import Settings
from service.processes import serving_specs
from tests.conftest import random_image
from tests.service_harness import png_bytes, read_npy, running_service, specs_for

ALL_MODELS = [
    ("lotus-g", "depth"),
    ("lotus-g", "normals"),
    ("lotus-d", "depth"),
    ("lotus-d", "normals"),
    ("e2e-ft", "depth"),
    ("e2e-ft", "normals"),
]
HAS_CUDA = torch.cuda.is_available()
#: A module fixture trains or exports a model: run first, by one worker (WHOLE_MODULES in conftest.py).
pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """fp32 ONNX export of each tiny checkpoint, made once per module."""
    root = tmp_path_factory.mktemp("exports")
    done: dict[tuple[str, str], Path] = {}

    def get(family: str, task: str) -> Path:
        if (family, task) not in done:
            spec = resolve_spec(str(tiny_dir(family, task)))
            out = root / f"{family}-{task}"
            export_model(spec, "onnx", out, dtype="fp32", max_batch=4, resolutions=[64, 96])
            done[(family, task)] = out
        return done[(family, task)]

    return get


def _batch(model, images: list[np.ndarray], res: int, seeds: list[int]) -> list[np.ndarray]:
    items = [BatchItem(img, model.plan(img, res), model.resolve_seed(s)) for img, s in zip(images, seeds, strict=True)]
    return [m.array for m in model.predict_batch(items)]


@pytest.mark.parametrize(("family", "task"), ALL_MODELS)
def test_onnxruntime_cpu_equals_torch_at_two_resolutions_and_batch_1_and_3(family, task, exported, tiny_model):
    reference = tiny_model(family, task)
    onnx_model = load_model(resolve_spec(str(exported(family, task))))
    assert onnx_model.runtime.name == "onnxruntime" and onnx_model.runtime.device.type == "cpu"
    assert (onnx_model.family, onnx_model.output_kind) == (reference.family, reference.output_kind)
    for res, size in ((64, (48, 64)), (96, (70, 52))):  # the second is not a multiple of 8 and portrait
        for n in (1, 3):
            images = [random_image(*size, seed=10 * n + i) for i in range(n)]
            seeds = [3 + i for i in range(n)]
            want = _batch(reference, images, res, seeds)
            got = _batch(onnx_model, images, res, seeds)
            for w, g in zip(want, got, strict=True):
                assert g.shape == w.shape
                assert np.abs(g - w).max() <= 1e-4, (family, task, res, n)


def test_uncertainty_through_onnx_encodes_once_and_matches_torch(exported, tiny_model) -> None:
    reference = tiny_model("lotus-g", "depth")
    onnx_model = load_model(resolve_spec(str(exported("lotus-g", "depth"))))
    image = random_image(40, 56, seed=5)
    item = BatchItem(image, reference.plan(image, 64), 0)
    calls = {"encode": 0}
    encode = onnx_model.runtime.encode

    def counting(images):
        calls["encode"] += 1
        return encode(images)

    onnx_model.runtime.encode = counting
    got = onnx_model.predict_uncertainty(item, [1, 2, 3, 4], reduction="median")
    want = reference.predict_uncertainty(item, [1, 2, 3, 4], reduction="median")
    assert calls["encode"] == 1
    assert np.abs(got.uncertainty - want.uncertainty).max() <= 1e-4
    assert np.abs(got.prediction.array - want.prediction.array).max() <= 1e-4


def test_manifest_records_what_was_exported_and_how_close_it_is(exported, tiny_dir) -> None:
    folder = exported("lotus-g", "normals")
    m = Manifest.read(folder)
    data = json.loads((folder / "manifest.json").read_text())
    assert data["format_version"] == 1 and data["format"] == "onnx"
    assert (m.family, m.task, m.output_kind, m.generative) == ("lotus-g", "normals", "normals", True)
    assert m.model_hash == checkpoint_hash(tiny_dir("lotus-g", "normals"))
    assert (m.dtype, m.opset, m.max_batch, m.resolutions) == ("fp32", 17, 4, [64, 96])
    assert [p.max_hw for p in m.profiles] == [(64, 64), (96, 96)]
    assert "torch" in m.versions and "onnxruntime" in m.versions
    v = m.verification
    assert v is not None and v.passed and v.runtime == "onnxruntime" and v.provider == "CPUExecutionProvider"
    assert 0 <= v.max_abs_error <= v.tolerance == manifest_mod.TOLERANCE["fp32"]
    assert m.graphs["head"].inputs == {
        "latent": ["batch", 4, "latent_height", "latent_width"],
        "noise": ["batch", 4, "latent_height", "latent_width"],
    }
    assert m.graphs["head"].outputs == {"map": ["batch", 3, "height", "width"]}
    # The graph files say the same as the manifest: names and symbolic axes.
    for graph, spec in m.graphs.items():
        proto = onnx.load(str(folder / spec.file), load_external_data=False)
        onnx.checker.check_model(proto)
        got = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        assert got == spec.inputs, graph


def test_exported_attention_is_fused(exported) -> None:
    proto = onnx.load(str(exported("lotus-d", "depth") / "head.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert {"Attention", "MultiHeadAttention"} & ops, sorted(ops)


def test_fp16_export_keeps_norms_in_fp32_and_passes_its_tolerance(tiny_dir, tmp_path) -> None:
    spec = resolve_spec(str(tiny_dir("e2e-ft", "depth")))
    m = export_model(spec, "onnx", tmp_path / "fp16", dtype="fp16", max_batch=2, resolutions=[64], device="cpu")
    assert m.dtype == "fp16" and m.verification.passed
    assert 0 < m.verification.max_abs_error <= manifest_mod.TOLERANCE["fp16"]
    proto = onnx.load(str(tmp_path / "fp16" / "head.onnx"))
    types = {init.data_type for init in proto.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    # Graph boundary stays fp32, and every InstanceNormalization (the VAE's GroupNorm) reads fp32.
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in proto.graph.input)
    producers = {out: node for node in proto.graph.node for out in node.output}
    norms = [n for n in proto.graph.node if n.op_type == "InstanceNormalization"]
    assert norms
    for norm in norms:
        src = producers.get(norm.input[0])
        assert src is not None and src.op_type == "Cast", "norm input must be cast to fp32"
        assert next(a.i for a in src.attribute if a.name == "to") == onnx.TensorProto.FLOAT


def test_fp16_conversion_of_graphs_over_2gb_infers_types_without_the_weights(exported) -> None:
    """Models above protobuf's 2 GB limit take the weight-free shape inference path; it must give a graph as
    good as the normal path (forced here on a small graph)."""
    import onnxruntime as ort

    from models.export.onnx_export import to_fp16

    folder = exported("lotus-d", "normals")
    fp16 = to_fp16(onnx.load(str(folder / "head.onnx")), force_light_shape_inference=True)
    latent = np.random.default_rng(0).standard_normal((2, 4, 8, 6)).astype(np.float32)
    got = ort.InferenceSession(fp16.SerializeToString()).run(None, {"latent": latent})[0]
    want = ort.InferenceSession(str(folder / "head.onnx")).run(None, {"latent": latent})[0]
    assert np.abs(got - want).max() <= manifest_mod.TOLERANCE["fp16"]


def test_export_fails_above_tolerance_and_writes_nothing(tiny_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(manifest_mod.TOLERANCE, "fp16", 1e-9)  # fp16 cannot be that close: the check must fire
    spec = resolve_spec(str(tiny_dir("lotus-d", "depth")))
    with pytest.raises(ExportError, match="above the tolerance"):
        export_model(spec, "onnx", tmp_path / "out", dtype="fp16", resolutions=[64], device="cpu")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # staging folder cleaned up too


def test_triton_repository_layout_and_configs_parse(tiny_dir, tmp_path) -> None:
    spec = ModelSpec(id="lg-depth", source=str(tiny_dir("lotus-g", "depth")))
    repo = tmp_path / "repo"
    m = export_model(spec, "triton", repo, max_batch=8, resolutions=[64], device="cpu")
    names = model_names("lg-depth")
    assert sorted(p.name for p in repo.iterdir()) == sorted([*names.values(), "manifest.json"])
    assert m.format == "triton" and Manifest.read(repo).verification.passed
    enc, head, ens = (read_config(repo / names[k] / "config.pbtxt") for k in ("encoder", "head", "ensemble"))
    for cfg in (enc, head):
        assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 8
        assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
        assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
        assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
        accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP32"
        model_file = repo / cfg.name / "1" / "model.onnx"
        proto = onnx.load(str(model_file))
        assert [i.name for i in proto.graph.input] == [i.name for i in cfg.input]
        assert [o.name for o in proto.graph.output] == [o.name for o in cfg.output]
        assert [list(i.dims) for i in cfg.input] == [
            [d.dim_value or -1 for d in i.type.tensor_type.shape.dim][1:] for i in proto.graph.input
        ]
    assert [i.name for i in head.input] == ["latent", "noise"]
    assert ens.platform == "ensemble" and ens.max_batch_size == 8 and (repo / names["ensemble"] / "1").is_dir()
    assert [i.name for i in ens.input] == ["image", "noise"] and [o.name for o in ens.output] == ["map"]
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == [names["encoder"], names["head"]]
    assert dict(steps[0].output_map) == {"latent": "latent"} and dict(steps[1].input_map) == {
        "latent": "latent",
        "noise": "noise",
    }


def test_serving_a_checkpoint_on_onnxruntime_exports_once_into_the_cache(tiny_dir, tmp_path) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(tiny_dir("lotus-d", "normals"), src)
    spec = ModelSpec(
        id="ld-n", source=str(src), task="normals", backend="onnxruntime", engine_cache=str(tmp_path / "cache")
    )
    first = load_model(spec)
    folders = list((tmp_path / "cache").glob("ld-n-*/onnx-fp32"))
    assert len(folders) == 1 and first.runtime.name == "onnxruntime"
    stamp = (folders[0] / "manifest.json").stat().st_mtime_ns
    load_model(spec)
    assert (folders[0] / "manifest.json").stat().st_mtime_ns == stamp  # reused, not exported again
    # A changed checkpoint has another hash and never reuses the stale export.
    config = json.loads((src / "unet" / "config.json").read_text())
    (src / "unet" / "config.json").write_text(json.dumps({**config, "_note": "changed"}))
    load_model(spec)
    assert len(list((tmp_path / "cache").glob("ld-n-*/onnx-fp32"))) == 2


def test_backend_errors_are_clear(exported, tiny_dir) -> None:
    folder = str(exported("lotus-d", "depth"))
    with pytest.raises(ModelLoadError, match="is an export"):
        load_model(resolve_spec(folder, backend="torch"))
    with pytest.raises(ModelLoadError, match="triton_url"):
        load_model(resolve_spec(folder, backend="triton"))
    with pytest.raises(ModelLoadError, match="Triton repository"):
        load_model(resolve_spec(str(tiny_dir("lotus-d", "depth")), backend="triton"))
    if not HAS_CUDA:
        with pytest.raises(BackendError, match=r"TensorRT is not installed|CUDA"):
            load_model(resolve_spec(folder, backend="tensorrt"))
    with pytest.raises(BackendError, match=r"not reachable|has not loaded"):
        load_model(resolve_spec(folder, backend="triton", triton_url="127.0.0.1:1"))


def test_profiles_cover_buckets_and_refuse_what_no_engine_was_built_for() -> None:
    profiles = bucket_profiles([768, 512], max_batch=16)
    assert [p.max_hw for p in profiles] == [(512, 512), (768, 768)]
    assert profiles[0].opt_hw == (384, 512) and profiles[1].opt_hw == (576, 768)
    assert pick_profile(profiles, 8, (384, 512)) == 0
    assert pick_profile(profiles, 16, (512, 384)) == 0
    assert pick_profile(profiles, 1, (576, 768)) == 1
    with pytest.raises(ValueError, match="no engine profile covers batch 17"):
        pick_profile(profiles, 17, (64, 64))
    with pytest.raises(ValueError, match="1024x768"):
        pick_profile(profiles, 1, (768, 1024))
    with pytest.raises(ValueError, match="multiples of 8"):
        bucket_profiles([500], 4)


def test_backend_setting_reaches_every_served_spec(tiny_dir, tmp_path) -> None:
    spec_file = tmp_path / "lg.toml"
    spec_file.write_text(f'source = "{tiny_dir("lotus-g", "depth")}"\ntask = "depth"\n')
    settings = Settings(models=[str(spec_file)], backend="onnxruntime", engine_cache=tmp_path / "engines")
    specs, tiny = serving_specs(settings)
    assert not tiny and [(s.id, s.backend, s.engine_cache) for s in specs] == [
        ("lg", "onnxruntime", str(tmp_path / "engines"))
    ]


@pytest.mark.anyio
async def test_service_end_to_end_on_onnxruntime(tiny_dir, tiny_model, tmp_path) -> None:
    specs = [
        s.model_copy(update={"backend": "onnxruntime", "engine_cache": str(tmp_path / "engines")})
        for s in specs_for(tiny_dir, [("lotus-g", "depth"), ("e2e-ft", "normals")])
    ]
    async with running_service(tiny_dir, specs=specs) as svc:
        models = {m["id"]: m for m in (await svc.client.get("/v1/models")).json()["models"]}
        assert {m["backend"] for m in models.values()} == {"onnxruntime"}
        image = png_bytes(44, 60, seed=3)
        from service import codec

        for route, (family, task) in (("/v1/depth", ("lotus-g", "depth")), ("/v1/normals", ("e2e-ft", "normals"))):
            r = await svc.client.post(
                f"{route}?format=npy&seed=7", content=image, headers={"content-type": "image/png"}
            )
            assert r.status_code == 200, r.text
            want = tiny_model(family, task).predict([codec.decode_image(image)], processing_res=64, seeds=7)[0].array
            got = read_npy(r.content)
            assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
        r = await svc.client.post(
            "/v1/uncertainty?format=json&seeds=3", content=image, headers={"content-type": "image/png"}
        )
        assert r.status_code == 200, r.text


def test_export_command_line(tiny_dir, tmp_path) -> None:
    out = tmp_path / "cli-export"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "export", "--model", str(tiny_dir("e2e-ft", "depth")),
         "--format", "onnx", "--out", str(out), "--resolutions", "64", "--max-batch", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "max abs error" in proc.stdout and (out / "manifest.json").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "service.cli", "export", "--model", str(out), "--out", str(tmp_path / "again")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 1 and "already an export" in bad.stderr


# ---------------------------------------------------------------------------- GPU paths (run where present)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(("family", "task"), [("lotus-g", "depth"), ("e2e-ft", "normals")])
def test_onnxruntime_cuda_fp16_matches_torch(family, task, tiny_dir, tiny_model, tmp_path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    spec = resolve_spec(str(tiny_dir(family, task)))
    m = export_model(spec, "onnx", tmp_path / "fp16", dtype="fp16", max_batch=4, resolutions=[64])
    assert m.verification.passed and m.verification.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    model = load_model(resolve_spec(str(tmp_path / "fp16")), device="cuda")
    assert model.runtime.device.type == "cuda"
    images = [random_image(48, 64, seed=i) for i in range(3)]
    want = _batch(tiny_model(family, task), images, 64, [1, 2, 3])
    got = _batch(model, images, 64, [1, 2, 3])
    assert max(np.abs(g - w).max() for g, w in zip(got, want, strict=True)) <= manifest_mod.TOLERANCE["fp16"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_tensorrt_engine_builds_caches_and_matches_torch(tiny_dir, tiny_model, tmp_path) -> None:
    pytest.importorskip("tensorrt", reason="needs TensorRT (pip install tensorrt)")
    spec = resolve_spec(str(tiny_dir("lotus-g", "depth")))
    out = tmp_path / "trt"
    m = export_model(spec, "tensorrt", out, dtype="fp16", max_batch=4, resolutions=[64, 96])
    assert m.verification.passed
    engines = sorted((out / "engines").glob("*.plan"))
    assert len(engines) == 2
    stamps = [p.stat().st_mtime_ns for p in engines]
    model = load_model(resolve_spec(str(out)))  # loads the cached engines instead of rebuilding
    assert [p.stat().st_mtime_ns for p in sorted((out / "engines").glob("*.plan"))] == stamps
    images = [random_image(70, 52, seed=i) for i in range(3)]
    want = _batch(tiny_model("lotus-g", "depth"), images, 96, [1, 2, 3])
    got = _batch(model, images, 96, [1, 2, 3])
    assert max(np.abs(g - w).max() for g, w in zip(got, want, strict=True)) <= manifest_mod.TOLERANCE["fp16"]


@pytest.mark.skipif(shutil.which("tritonserver") is None, reason="needs a Triton server binary (tritonserver)")
def test_triton_server_serves_the_exported_repository(tiny_dir, tiny_model, tmp_path) -> None:
    import socket
    import time

    spec = ModelSpec(id="lg", source=str(tiny_dir("lotus-g", "depth")))
    repo = tmp_path / "repo"
    export_model(spec, "triton", repo, max_batch=4, resolutions=[64], triton_instance_kind="gpu" if HAS_CUDA else "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["tritonserver", f"--model-repository={repo}", f"--grpc-port={port}", "--allow-http=false",
         "--allow-metrics=false"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                model = load_model(resolve_spec(str(repo), backend="triton", triton_url=f"127.0.0.1:{port}"))
                break
            except BackendError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        images = [random_image(48, 64, seed=i) for i in range(2)]
        want = _batch(tiny_model("lotus-g", "depth"), images, 64, [1, 2])
        got = _batch(model, images, 64, [1, 2])
        assert max(np.abs(g - w).max() for g, w in zip(got, want, strict=True)) <= 1e-4
    finally:
        server.terminate()
        server.wait(30)


def test_provider_choice_follows_what_is_installed_and_carries_the_profiles(exported) -> None:
    from models.runtime.onnxruntime_runtime import pick_providers

    m = Manifest.read(exported("lotus-g", "depth"))
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = pick_providers("auto", gpu, Path("/tmp/cache"), m, "head")
    assert [p[0] if isinstance(p, tuple) else p for p in providers] == gpu
    trt = providers[0][1]
    assert trt["trt_engine_cache_enable"] and trt["trt_fp16_enable"] is False
    assert trt["trt_profile_max_shapes"] == "latent:4x4x8x8,noise:4x4x8x8,latent:4x4x12x12,noise:4x4x12x12"
    assert pick_providers("auto", ["CPUExecutionProvider"], None, m) == ["CPUExecutionProvider"]
    assert pick_providers("cpu", gpu, None, m) == ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        pick_providers("cuda:0", ["CPUExecutionProvider"], None, m)


@pytest.mark.anyio
async def test_sizes_beyond_the_engines_are_a_clear_422_not_a_model_failure(tiny_dir) -> None:
    """A TensorRT model only runs up to its largest profile; bigger requests are refused before compute."""
    async with running_service(tiny_dir, models=[("lotus-d", "depth")]) as svc:
        runtime = svc.worker.served["lotus-d-depth"].predictor.runtime
        runtime.max_hw = (64, 64)  # as a TensorRT runtime built for one 64 px bucket reports it
        try:
            image = png_bytes(48, 64, seed=1)
            ok = await svc.client.post(
                "/v1/depth?processing_res=64", content=image, headers={"content-type": "image/png"}
            )
            assert ok.status_code == 200
            big = await svc.client.post(
                "/v1/depth?processing_res=128", content=image, headers={"content-type": "image/png"}
            )
            assert big.status_code == 422, big.text
            assert "engines were built for (64x64)" in big.json()["detail"]
        finally:
            runtime.max_hw = None
