"""Start-up and shutdown: readiness waits for warm-up, load failures are reported, SIGTERM drains."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import service.worker.registry as registry
from models.spec import ModelSpec
from service.defaults import default_for, default_models
from tests.conftest import SAMPLE
from tests.service_harness import png_bytes, running_service, until_ready


@pytest.mark.anyio
async def test_not_ready_until_models_are_loaded_and_warmed(tiny_dir, monkeypatch) -> None:
    gate = threading.Event()
    real_load = registry.load_model

    def gated_load(spec):
        gate.wait(timeout=60)
        return real_load(spec)

    monkeypatch.setattr(registry, "load_model", gated_load)
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], wait_ready=False) as svc:
        r = await svc.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["worker"] == "loading" and r.json()["models"] == {"lotus-d-depth": False}
        assert (await svc.client.get("/healthz")).status_code == 200
        r = await svc.client.post("/v1/depth", content=png_bytes(16, 16), headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        gate.set()
        await until_ready(svc.client)
        r = await svc.client.post("/v1/depth", content=png_bytes(16, 16), headers={"content-type": "image/png"})
        assert r.status_code == 200


@pytest.mark.anyio
async def test_load_failure_is_reported_by_readyz(tiny_dir, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_dir("lotus-d", "depth"), tmp_path / "lotus-d-depth")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    specs = [ModelSpec(id="broken", source=str(broken))]
    async with running_service(tiny_dir, specs=specs, wait_ready=False) as svc:
        for _ in range(200):
            body = (await svc.client.get("/readyz")).json()
            if body["worker"] == "failed":
                break
            await asyncio.sleep(0.05)
        assert body["worker"] == "failed" and not body["ready"]
        assert "model 'broken': cannot load" in body["error"]
        r = await svc.client.post("/v1/depth", content=png_bytes(16, 16), headers={"content-type": "image/png"})
        assert r.status_code == 503


@pytest.mark.anyio
async def test_api_answers_while_a_batch_computes(tiny_dir) -> None:
    async with running_service(tiny_dir, models=[("lotus-g", "depth")]) as svc:
        slow = asyncio.create_task(
            svc.client.post(
                "/v1/uncertainty?seeds=32&processing_res=256&format=json",
                content=png_bytes(96, 128),
                headers={"content-type": "image/png"},
            )
        )
        lane = svc.worker.lanes["lotus-g-depth"]
        while not lane.busy:
            await asyncio.sleep(0.005)
        assert (await svc.client.get("/healthz")).status_code == 200
        assert (await svc.client.get("/v1/models")).status_code == 200
        assert not slow.done(), "the health checks must not wait for the batch"
        assert (await slow).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches_started(base: str) -> float:
    """Batches the server's workers have started (the queue-wait histogram is observed as each one starts)."""
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("dense_queue_wait_seconds_count")
    )


def test_serve_process_tiny_default_then_sigterm_drains(tmp_path: Path) -> None:
    """The README command for real: a server process on loopback, curl-style upload, graceful SIGTERM."""
    port = _free_port()
    env = {
        **os.environ,
        "DENSE_TINY_DIR": str(tmp_path / "tiny"),
        "DENSE_SHUTDOWN_GRACE_S": "60",
        "DENSE_GRPC_PORT": str(_free_port()),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        r = httpx.post(f"{base}/v1/depth", files={"image": ("sample.png", SAMPLE.read_bytes(), "image/png")})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        defaults = default_models(tmp_path / "tiny")
        depth = default_for(defaults, "depth")
        assert depth is not None and depth.trained  # a trained demo serves depth first
        assert r.headers["x-model"] == depth.spec.id

        result: dict[str, httpx.Response] = {}

        def slow() -> None:
            result["r"] = httpx.post(
                f"{base}/v1/uncertainty?seeds=32&processing_res=256&format=json",
                content=png_bytes(96, 128),
                headers={"content-type": "image/png"},
                timeout=120,
            )

        batches = _batches_started(base)
        thread = threading.Thread(target=slow)
        thread.start()
        deadline = time.monotonic() + 60
        while _batches_started(base) == batches:  # until its batch computes (32 seeds at 256 px: seconds)
            assert time.monotonic() < deadline and thread.is_alive(), "the slow request never started computing"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=120)
        assert result["r"].status_code == 200, "the in-flight request finished before the server exited"
        # uvicorn re-raises the signal once it has shut down cleanly, so -SIGTERM is a clean exit too.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    # The first line: where it listens and what it serves; then which defaults are random weights.
    assert err.startswith(f"dense-serve listening on http://127.0.0.1:{port} and gRPC 127.0.0.1:"), err[:300]
    assert f"serving {', '.join(m.spec.id for m in defaults)}\n" in err
    for m in defaults:
        row = next(line for line in err.splitlines() if line.strip().startswith(m.spec.id))
        assert ("RANDOM WEIGHTS" in row) != m.trained, row
    assert "Application shutdown complete" in err and "did not drain" not in err


def test_serve_fails_fast_on_a_bad_model(tmp_path: Path) -> None:
    for model, message in [(str(tmp_path / "missing"), "does not exist"), ("org/not-here", "cannot fetch hub")]:
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--model", model, "--port", str(_free_port())],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "DENSE_GRPC_PORT": "0"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert message in result.stderr and result.stderr.startswith("error: ")
