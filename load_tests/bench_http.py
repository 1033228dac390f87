"""Served vs direct, in one run: the same predictions through HTTP (a real `dense-serve serve` process on
loopback) and through a direct predictor call. Reports per-request overhead at concurrency 1, throughput
at concurrency C, latency percentiles and the batch sizes the worker formed.

    .venv/bin/python load_tests/bench_http.py [--model DIR] [--res 128] [--requests 64] [--concurrency 16]
                                              [--redis]

With --redis it also runs `serve --queue redis` (against REDIS_URL or a private server) in the same run, so
the Redis path's overhead is measured against the embedded one.

Bounded in count and time; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def direct_times(model_dir: str, image: bytes, res: int, n: int, batch: int) -> tuple[float, float]:
    """Per-image seconds of direct calls: one image per call, and `batch` images per call."""
    from models.loading import load_model
    from models.spec import resolve_spec
    from service.codec import decode_image

    model = load_model(resolve_spec(model_dir))
    img = decode_image(image)  # decoding is part of the work a request does, so time it too
    model.predict([img], processing_res=res)
    start = time.perf_counter()
    for _ in range(n):
        model.predict([decode_image(image)], processing_res=res)
    single = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(max(1, n // batch)):
        model.predict([decode_image(image) for _ in range(batch)], processing_res=res, batch_size=batch)
    batched = (time.perf_counter() - start) / (max(1, n // batch) * batch)
    return single, batched


async def http_run(base: str, image: bytes, res: int, n: int, concurrency: int) -> dict[str, object]:
    latencies: list[float] = []
    batches: Counter[int] = Counter()
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:

        async def one() -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(
                    f"/v1/depth?processing_res={res}&format=npy", content=image, headers={"content-type": "image/png"}
                )
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                batches[int(r.headers["x-batch-size"])] += 1

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - start
    return {"wall": wall, "latencies": latencies, "batches": batches}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="diffusers folder (default: a tiny lotus-d depth checkpoint)")
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--redis", action="store_true", help="also measure `serve --queue redis` in the same run")
    args = parser.parse_args()

    from tests.service_harness import png_bytes

    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model
    if model_dir is None:
        from models.tiny import make_tiny

        model_dir = str(make_tiny(Path(tmp.name) / "lotus-d-depth", "lotus-d", "depth"))
    image = png_bytes(args.res * 3 // 4, args.res, seed=1)
    single, batched = direct_times(model_dir, image, args.res, args.requests, args.max_batch)

    runs = {"embedded": _serve_and_load(model_dir, image, args, [])}
    if args.redis:
        from tests.redis_server import RedisServer, external_url

        server = None if external_url() else RedisServer().start()
        url = external_url() or server.url
        try:
            runs["redis"] = _serve_and_load(
                model_dir,
                image,
                args,
                ["--queue", "redis", "--redis-url", url],
                {"DENSE_REDIS_PREFIX": f"bench{os.getpid()}"},
            )
        finally:
            if server:
                server.close()
    _report(model_dir, args, single, batched, runs)
    return 0


def _serve_and_load(
    model_dir: str, image: bytes, args: argparse.Namespace, extra: list[str], env_extra: dict[str, str] | None = None
) -> tuple[dict, dict]:
    port = _free_port()
    env = {
        **os.environ,
        "DENSE_MAX_BATCH_SIZE": str(args.max_batch),
        "DENSE_MAX_QUEUE_DELAY_MS": str(args.delay_ms),
        "DENSE_LOG_LEVEL": "warning",
        "DENSE_GRPC_ENABLED": "false",
        "DENSE_QUEUE_MAX_JOBS": str(max(256, args.requests)),
        **(env_extra or {}),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--model", model_dir, "--port", str(port), *extra],
        cwd=REPO,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit("server did not become ready")
        asyncio.run(http_run(base, image, args.res, 4, 1))  # warm the connection path
        c1 = asyncio.run(http_run(base, image, args.res, args.requests, 1))
        cn = asyncio.run(http_run(base, image, args.res, args.requests, args.concurrency))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return c1, cn


def _report(
    model_dir: str, args: argparse.Namespace, single: float, batched: float, runs: dict[str, tuple[dict, dict]]
) -> None:
    direct_tput = 1.0 / single
    print(
        f"### served vs direct: {Path(model_dir).name}, {args.res} px, {args.requests} requests, "
        f"max batch {args.max_batch}, delay {args.delay_ms} ms, {os.cpu_count()} cores\n"
    )
    names = list(runs)
    print("| measure | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    rows: list[tuple[str, list[str]]] = [
        ("direct call, 1 image (ms)", [f"{single * 1e3:.1f}"] * len(names)),
        (f"direct call, batch {args.max_batch} (ms / image)", [f"{batched * 1e3:.1f}"] * len(names)),
    ]
    c = args.concurrency
    lat1 = [statistics.mean(c1["latencies"]) for c1, _ in runs.values()]
    rows += [
        ("HTTP, concurrency 1: mean latency (ms)", [f"{v * 1e3:.1f}" for v in lat1]),
        ("HTTP overhead per request at concurrency 1 (ms)", [f"{(v - single) * 1e3:.1f}" for v in lat1]),
        (
            f"HTTP, concurrency {c}: throughput (img/s)",
            [f"{args.requests / cn['wall']:.1f}" for _, cn in runs.values()],
        ),
        (
            f"throughput ratio: HTTP c={c} / direct unbatched",
            [f"{args.requests / cn['wall'] / direct_tput:.2f}x" for _, cn in runs.values()],
        ),
        (
            f"throughput ratio: HTTP c={c} / direct batch {args.max_batch}",
            [f"{args.requests / cn['wall'] * batched:.2f}x" for _, cn in runs.values()],
        ),
        (
            f"HTTP c={c} latency p50 / p95 / p99 (ms)",
            [
                f"{_percentile(cn['latencies'], 50) * 1e3:.0f} / {_percentile(cn['latencies'], 95) * 1e3:.0f} / "
                f"{_percentile(cn['latencies'], 99) * 1e3:.0f}"
                for _, cn in runs.values()
            ],
        ),
        (
            f"batch sizes seen at c={c} (size: requests)",
            [", ".join(f"{k}: {v}" for k, v in sorted(cn["batches"].items())) for _, cn in runs.values()],
        ),
        (
            "batch sizes seen at c=1",
            [", ".join(f"{k}: {v}" for k, v in sorted(c1["batches"].items())) for c1, _ in runs.values()],
        ),
    ]
    for label, values in rows:
        print(f"| {label} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
