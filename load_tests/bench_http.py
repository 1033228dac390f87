"""Served vs direct, in one run: the same predictions through HTTP (a real `dense-serve serve` process on
loopback) and through a direct predictor call. Reports per-request overhead at concurrency 1, throughput
at concurrency C, latency percentiles and the batch sizes the worker formed.

    .venv/bin/python load_tests/bench_http.py [--model DIR] [--res 128] [--requests 64] [--concurrency 16]

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
    args = parser.parse_args()

    from tests.service_harness import png_bytes

    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model
    if model_dir is None:
        from models.tiny import make_tiny

        model_dir = str(make_tiny(Path(tmp.name) / "lotus-d-depth", "lotus-d", "depth"))
    image = png_bytes(args.res * 3 // 4, args.res, seed=1)
    single, batched = direct_times(model_dir, image, args.res, args.requests, args.max_batch)

    port = _free_port()
    env = {
        **os.environ,
        "DENSE_MAX_BATCH_SIZE": str(args.max_batch),
        "DENSE_MAX_QUEUE_DELAY_MS": str(args.delay_ms),
        "DENSE_LOG_LEVEL": "warning",
        "DENSE_QUEUE_MAX_JOBS": str(max(256, args.requests)),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--model", model_dir, "--port", str(port)], cwd=REPO, env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise SystemExit("server did not become ready")
        asyncio.run(http_run(base, image, args.res, 4, 1))  # warm the connection path
        c1 = asyncio.run(http_run(base, image, args.res, args.requests, 1))
        cn = asyncio.run(http_run(base, image, args.res, args.requests, args.concurrency))
    finally:
        server.terminate()
        server.wait(timeout=60)

    lat1 = c1["latencies"]
    latn = cn["latencies"]
    direct_tput = 1.0 / single
    print(
        f"### served vs direct: {Path(model_dir).name}, {args.res} px, {args.requests} requests, "
        f"max batch {args.max_batch}, delay {args.delay_ms} ms, {os.cpu_count()} cores\n"
    )
    print("| measure | value |\n|---|---:|")
    print(f"| direct call, 1 image (ms) | {single * 1e3:.1f} |")
    print(f"| direct call, batch {args.max_batch} (ms / image) | {batched * 1e3:.1f} |")
    print(f"| HTTP, concurrency 1: mean latency (ms) | {statistics.mean(lat1) * 1e3:.1f} |")
    print(f"| HTTP overhead per request at concurrency 1 (ms) | {(statistics.mean(lat1) - single) * 1e3:.1f} |")
    print(f"| HTTP, concurrency {args.concurrency}: throughput (img/s) | {args.requests / cn['wall']:.1f} |")
    print(
        f"| throughput ratio: HTTP c={args.concurrency} / direct unbatched | "
        f"{args.requests / cn['wall'] / direct_tput:.2f}x |"
    )
    print(
        f"| throughput ratio: HTTP c={args.concurrency} / direct batch {args.max_batch} | "
        f"{args.requests / cn['wall'] * batched:.2f}x |"
    )
    print(
        f"| HTTP c={args.concurrency} latency p50 / p95 / p99 (ms) | {_percentile(latn, 50) * 1e3:.0f} / "
        f"{_percentile(latn, 95) * 1e3:.0f} / {_percentile(latn, 99) * 1e3:.0f} |"
    )
    dist = ", ".join(f"{size}: {count}" for size, count in sorted(cn["batches"].items()))
    print(f"| batch sizes seen at c={args.concurrency} (size: requests) | {dist} |")
    dist1 = ", ".join(f"{size}: {count}" for size, count in sorted(c1["batches"].items()))
    print(f"| batch sizes seen at c=1 | {dist1} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
