"""A real Prometheus server scrapes real processes: a Redis server, a `dense-serve api` and a `dense-serve
worker` (with its metrics port). After a short load, PromQL over our histograms gives sensible answers and the
queue series move. Needs the `prometheus` and `promtool` binaries (Debian's `prometheus` package)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from load_tests.cluster import REPO, start_worker, stop
from tests.conftest import require_tool
from tests.service_harness import png_bytes

pytestmark = pytest.mark.anyio
SCRAPE = "1s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_config(path: Path, api_port: int, worker_port: int) -> Path:
    path.write_text(
        f"""global:
  scrape_interval: {SCRAPE}
  evaluation_interval: {SCRAPE}
scrape_configs:
  - job_name: dense-api
    static_configs: [{{targets: ["127.0.0.1:{api_port}"]}}]
  - job_name: dense-worker
    static_configs: [{{targets: ["127.0.0.1:{worker_port}"]}}]
"""
    )
    return path


def query(client: httpx.Client, expr: str) -> list[dict]:
    r = client.get("/api/v1/query", params={"query": expr})
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_until(what: str, check, timeout_s: float = 60.0):
    end = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.5)


async def test_prometheus_scrapes_api_and_worker_and_promql_answers(tiny_dir, redis_url, redis_prefix, tmp_path):
    prometheus_bin, promtool = require_tool("prometheus", "prometheus"), require_tool("promtool", "prometheus")
    api_port, worker_port, prom_port = free_port(), free_port(), free_port()
    config = prometheus_config(tmp_path / "prometheus.yml", api_port, worker_port)
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    env = {**os.environ, "DENSE_REDIS_PREFIX": redis_prefix, "DENSE_LOG_LEVEL": "warning", "OMP_NUM_THREADS": "1"}
    env["DENSE_GRPC_ENABLED"] = "false"  # the API's gRPC port would be 50051, which a server beside may hold
    model_dir = str(tiny_dir("lotus-d", "depth"))
    worker = start_worker(
        redis_url,
        redis_prefix,
        model_dir,
        "prom-w",
        DENSE_METRICS_PORT=str(worker_port),
        DENSE_MAX_QUEUE_DELAY_MS="50",
        DENSE_METRICS_INTERVAL_S="0.2",
    )
    api = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "api", "--redis-url", redis_url, "--port", str(api_port), "--no-auth"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prom = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=60) as client:
            end = time.monotonic() + 120
            while True:
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < end and worker.poll() is None and api.poll() is None, "services not up"
                await asyncio.sleep(0.3)
            image = png_bytes(48, 64, seed=7)
            for _ in range(3):  # a short load, spread over a few scrapes
                replies = await asyncio.gather(
                    *(
                        client.post("/v1/depth?processing_res=64", content=image, headers={"content-type": "image/png"})
                        for _ in range(12)
                    )
                )
                assert all(r.status_code == 200 for r in replies)
                await asyncio.sleep(1.2)

        with httpx.Client(base_url=f"http://127.0.0.1:{prom_port}", timeout=10) as prometheus:
            up = wait_until("both targets up", lambda: len(query(prometheus, "up == 1")) == 2 or None)
            assert up
            p95 = wait_until(
                "a p95 latency",
                lambda: query(
                    prometheus,
                    "histogram_quantile(0.95, sum by (le) (rate("
                    'dense_request_duration_seconds_bucket{route="/v1/depth", status="200"}[1m])))',
                ),
            )
            seconds = float(p95[0]["value"][1])
            assert 0.001 < seconds < 30, seconds
            # The worker's queue and batch series moved: every request waited in the queue, came in batches.
            waited = wait_until(
                "queue waits", lambda: query(prometheus, 'sum(dense_queue_wait_seconds_count{model="lotus-d-depth"})')
            )
            assert float(waited[0]["value"][1]) >= 36
            average_batch = query(
                prometheus,
                'sum(increase(dense_batch_size_sum{model="lotus-d-depth"}[1m])) / '
                'sum(increase(dense_batch_size_count{model="lotus-d-depth"}[1m]))',
            )
            assert 1.0 < float(average_batch[0]["value"][1]) <= 8.0
            # All answered and acknowledged: the sampled pending gauge comes back to zero.
            wait_until(
                "pending back to 0",
                lambda: [
                    r for r in query(prometheus, 'dense_queue_pending{model="lotus-d-depth"}') if r["value"][1] == "0"
                ],
            )
    finally:
        prom.terminate()
        prom.wait(10)
        stop(api)
        stop(worker)
