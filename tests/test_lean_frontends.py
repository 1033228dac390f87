"""The front-end processes (`dense-serve api`, `dense-serve grpc`) carry no model library: started as real
processes with torch, diffusers, transformers and the worker's codecs made unimportable, they serve, and
neither their import list nor their memory map holds torch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from load_tests.cluster import start_worker, stop
from tests.conftest import REPO
from tests.redis_server import free_port
from tests.service_harness import png_bytes, read_npy

#: What a front-end must never even try to import: the [worker] extra's model libraries.
MODEL_LIBRARIES = (
    "torch",
    "diffusers",
    "transformers",
    "safetensors",
    "huggingface_hub",
    "OpenEXR",
    "tifffile",
    "scipy",
)
#: The worker's PNG deflate back-ends: `service.codec` falls back to zlib without them, so a front-end may try.
OPTIONAL_CODECS = ("isal", "deflate")
BLOCKED = MODEL_LIBRARIES + OPTIONAL_CODECS

# Runs the CLI with every model library unimportable, as on an install without the [worker] extra.
WITHOUT_MODEL_LIBRARIES = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed on a front-end)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from service.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_frontend(*args: str, prefix: str, log: Path) -> subprocess.Popen[str]:
    """stderr goes to a file: the import report alone would fill a pipe and block the process."""
    with log.open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-X", "importtime", "-c", WITHOUT_MODEL_LIBRARIES, *args],
            cwd=REPO,
            # gRPC on a free port: 50051 may be held by another server on the machine (a taken port is refused).
            env={
                "PATH": "/usr/bin:/bin",
                "DENSE_REDIS_PREFIX": prefix,
                "DENSE_LOG_LEVEL": "warning",
                "HOME": "/tmp",
                "DENSE_GRPC_PORT": "0",
                "DENSE_AUTH": "off",  # these tests are about imports, not keys (api/grpc need one or this)
            },
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )


def wait_http(proc: subprocess.Popen[str], log: Path, url: str, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the front-end exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


def imported_modules(proc: subprocess.Popen[str], log: Path) -> set[str]:
    """Every module the process imported or tried to, from `-X importtime`'s report (read after it exits)."""
    stop(proc)
    lines = log.read_text().splitlines()
    return {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}


def assert_lean(proc: subprocess.Popen[str], log: Path) -> set[str]:
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    assert "libtorch" not in maps, "libtorch is mapped into the front-end process"
    modules = imported_modules(proc, log)
    assert "fastapi" in modules or "grpc" in modules, "the import report was not captured"
    loaded = sorted(m for m in modules if m.split(".")[0] in MODEL_LIBRARIES)
    assert not loaded, f"the front-end imported {loaded}"
    return modules


def test_the_api_process_serves_predictions_without_torch(
    tiny_dir, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """`api --model DIR` takes what `worker --model` takes (the folder gives the id); a real worker computes."""
    model_dir = tiny_dir("lotus-d", "depth")
    port = free_port()
    log = tmp_path / "api.log"
    api = start_frontend(
        "api", "--redis-url", redis_url, "--port", str(port), "--model", str(model_dir), prefix=redis_prefix, log=log
    )
    worker = start_worker(redis_url, redis_prefix, str(model_dir), "lean-w0")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(api, log, f"{base}/healthz")
        assert httpx.get(f"{base}/openapi.json", timeout=10).status_code == 200
        wait_http(api, log, f"{base}/readyz", timeout_s=180)  # ready once the worker serves the named model
        ready = httpx.get(f"{base}/readyz", timeout=10).json()
        assert model_dir.name in ready["models"], ready
        image = png_bytes(40, 56, seed=4)
        r = httpx.post(
            f"{base}/v1/depth?format=npy&processing_res=64",
            content=image,
            headers={"content-type": "image/png"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        depth = read_npy(r.content)
        assert depth.shape == (40, 56) and np.isfinite(depth).all()
    finally:
        stop(worker)
    assert_lean(api, log)


def test_the_grpc_process_starts_without_torch(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    log = tmp_path / "grpc.log"
    proc = start_frontend(
        "grpc",
        "--redis-url",
        redis_url,
        "--port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        prefix=redis_prefix,
        log=log,
    )
    wait_http(proc, log, f"http://127.0.0.1:{metrics_port}/healthz")
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert_lean(proc, log)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("nope/../x", "does not exist"),
        ("bad id!", "give a model id"),
        ("/no/such/checkpoint/folder", "does not exist"),
    ],
)
def test_api_model_argument_errors_are_one_clear_line(model: str, expected: str, redis_url: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "api", "--redis-url", redis_url, "--port", "1", "--model", model],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert "validation error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
