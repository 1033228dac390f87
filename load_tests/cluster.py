"""Real multi-process deployments on loopback for load and failure runs: worker processes started with
`dense-serve worker`, an API app talking to them through Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def start_worker(
    redis_url: str, prefix: str, model_dir: str, name: str, log_file: Path | None = None, **env: str
) -> subprocess.Popen[str]:
    """A `dense-serve worker` process serving one local checkpoint. With `log_file` it logs every batch's
    requests and every reclaim there as JSON lines (what the chaos runs count); else warnings are dropped."""
    full_env = {
        **os.environ,
        "DENSE_REDIS_PREFIX": prefix,
        "DENSE_LOG_LEVEL": "debug" if log_file else "warning",
        "DENSE_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    log = log_file.open("a") if log_file else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [
                sys.executable, "-m", "service.cli", "worker", "--redis-url", redis_url, "--model", model_dir,
                "--name", name,
            ],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )  # fmt: skip
    finally:
        if log_file:
            log.close()  # the child keeps its own descriptor


def wait_for_workers(base_url_or_client: httpx.Client, names: list[str], timeout_s: float = 120.0) -> None:
    """Until /readyz is ok; the caller checks which workers serve."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if base_url_or_client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"workers {names} not ready")


def stop(proc: subprocess.Popen[str], timeout_s: float = 30.0) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=timeout_s)
