"""The Python client's overhead against hand-written httpx, for 1080p float32 NPY answers (8.3 MB each).

    .venv/bin/python -m load_tests.bench_client [--rounds 20]

One `dense-serve serve` on loopback (the shipped demo model at `processing_res` 64, so compute is small and
everything else shows), one 1920x1080 JPEG. Each round sends the same request three ways, in turn, c=1:

- raw: `httpx.Client.post(..., content=jpeg)` with `format=npy` and `Accept-Encoding: identity`, then
  `np.load` of the body: the least a hand-written client does to get the array;
- client: `Client.depth(jpeg, processing_res=64)` with its defaults (an `Idempotency-Key` per request, the
  answer decoded to a `Prediction` with its headers parsed);
- client, no key: the same with `idempotency=False` (the server then neither hashes the image nor keeps the
  answer for a retry).

Reports, per way, the median and p90 latency and the median CPU time of the calling thread (all of a sync
client's own work: building the request, httpx, reading and decoding the answer; robust to other load on the
machine, unlike latency), with their ratios to raw, measured in this one run.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "clients" / "python"))

from dense_serve_client import Client  # noqa: E402

from load_tests.bench_sizes import DEMO, encoded, photo, serving  # noqa: E402

RES = 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="requests per way (default 20)")
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    jpeg = encoded(photo(1080, 1920), "jpeg")
    with serving(REPO, str(DEMO)) as base:
        raw_http = httpx.Client(base_url=base, timeout=60, headers={"Accept-Encoding": "identity"})

        def raw() -> np.ndarray:
            r = raw_http.post(
                "/v1/depth",
                params={"processing_res": RES, "format": "npy"},
                content=jpeg,
                headers={"Content-Type": "image/jpeg"},
            )
            r.raise_for_status()
            return np.load(io.BytesIO(r.content), allow_pickle=False)

        keyed = Client(base)
        plain = Client(base, idempotency=False)
        ways: dict[str, Callable[[], np.ndarray]] = {
            "raw httpx + np.load": raw,
            "Client.depth": lambda: keyed.depth(jpeg, processing_res=RES).array,
            "Client.depth, idempotency=False": lambda: plain.depth(jpeg, processing_res=RES).array,
        }
        reference = raw()
        for name, fn in ways.items():
            for _ in range(args.warmup):
                assert np.array_equal(fn(), reference), name
        times: dict[str, list[float]] = {name: [] for name in ways}
        cpu: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, fn in ways.items():
                started, started_cpu = time.perf_counter(), time.thread_time()
                fn()
                cpu[name].append((time.thread_time() - started_cpu) * 1000.0)
                times[name].append((time.perf_counter() - started) * 1000.0)
        for c in (raw_http, keyed, plain):
            c.close()

    base_median = statistics.median(times["raw httpx + np.load"])
    base_cpu = statistics.median(cpu["raw httpx + np.load"])
    print(
        f"1920x1080 JPEG in ({len(jpeg) / 1e6:.2f} MB), float32 NPY out ({reference.nbytes / 1e6:.1f} MB); "
        f"demo model at processing_res {RES}; c=1, {args.rounds} rounds; {os.cpu_count()} cores"
    )
    print("| way | latency median (ms) | p90 (ms) | / raw | client CPU median (ms) | / raw |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in times.items():
        values.sort()
        median, cpu_median = statistics.median(values), statistics.median(cpu[name])
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        print(
            f"| {name} | {median:.1f} | {p90:.1f} | {median / base_median:.3f} "
            f"| {cpu_median:.1f} | {cpu_median / base_cpu:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
