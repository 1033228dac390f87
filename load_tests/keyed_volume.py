"""Keyed answers at production volume: the Python client's own defaults (an Idempotency-Key on every request)
against `dense-serve serve --queue redis` on default settings and a Redis capped at `maxmemory 256mb`.

    .venv/bin/python -m load_tests.keyed_volume [--images 240] [--concurrency 8] [--workers 1]   (make bench-keyed)

A private Redis (`maxmemory 256mb`, `noeviction`, as a cache-only deployment runs it), `dense-serve serve` on a
tiny checkpoint with every setting at its default, plus `--workers` extra `dense-serve worker` processes, and
`Client(base).predict_many(concurrency=...)` over `--images` 1920x1080 JPEGs with every client default except
`processing_res` (64: the answer is still a full 1080p map, 8.3 MB as NPY, while the model stays cheap on a CPU).
Redis `used_memory` is sampled every 20 ms. Reported: answers, errors, peak Redis memory, kept-answer bytes and
answers not kept (`/metrics`). `--grace-s` / `--budget-mib` set `answer_grace_s` / `answer_store_bytes`: the
second release's behaviour is `--grace-s 60 --budget-mib 100000` (every answer kept 60 s). Loopback only.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODEL = "lotus-d-depth"
RES = 64


@dataclass
class VolumeRun:
    images: int
    answered: int = 0
    full_size: int = 0  # answers whose map is the full 1920x1080
    errors: dict[str, int] = field(default_factory=dict)
    peak_used_mib: float = 0.0
    maxmemory_mib: float = 0.0
    not_kept: float = 0.0
    wall_s: float = 0.0


def photos(n_distinct: int = 24, size: tuple[int, int] = (1920, 1080), seed: int = 0) -> list[bytes]:
    """Distinct 1080p JPEGs: smooth random colour fields with noise, so each one encodes like a photo."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(n_distinct):
        coarse = rng.integers(0, 256, (9, 16, 3), dtype=np.uint8)
        field_ = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(field_ + rng.integers(-12, 13, field_.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def run(
    images: int = 240,
    concurrency: int = 8,
    workers: int = 1,
    grace_s: float | None = None,
    budget_mib: int | None = None,
) -> VolumeRun:
    from dense_serve_client import Client

    from models.tiny import make_tiny
    from tests.redis_server import RedisServer, free_port

    result = VolumeRun(images)
    server = RedisServer(args=("--maxmemory", "256mb", "--maxmemory-policy", "noeviction")).start()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_tiny(Path(tmp) / MODEL, "lotus-d", "depth"))
        env = {
            **os.environ,
            "DENSE_REDIS_PREFIX": "volume",
            "DENSE_LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
        env.pop("DENSE_API_KEYS", None)
        if grace_s is not None:
            env["DENSE_ANSWER_GRACE_S"] = str(grace_s)
        if budget_mib is not None:
            env["DENSE_ANSWER_STORE_BYTES"] = str(budget_mib * 2**20)
        port = free_port()
        log = Path(tmp) / "serve.log"
        queue = ["--queue", "redis", "--redis-url", server.url]
        procs.append(_start(["serve", *queue, "--model", model_dir, "--port", str(port), "--grpc-port", "0"], env, log))
        for i in range(workers):
            procs.append(_start(["worker", *queue, "--model", model_dir, "--name", f"extra-{i}"], env, log))
        base = f"http://127.0.0.1:{port}"
        sampling = threading.Event()
        peak = [0]

        def sample() -> None:
            r = server.client()
            while not sampling.is_set():
                peak[0] = max(peak[0], int(r.info("memory")["used_memory"]))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        try:
            _ready(base, procs, log)
            result.maxmemory_mib = int(server.client().config_get("maxmemory")["maxmemory"]) / 2**20
            jpegs = photos()
            sampler.start()
            t0 = time.perf_counter()
            with Client(base) as client:  # every client default: retries, an Idempotency-Key per image
                batch = (jpegs[i % len(jpegs)] for i in range(images))
                for prediction in client.predict_many(
                    batch, concurrency=concurrency, return_exceptions=True, processing_res=RES
                ):
                    if isinstance(prediction, BaseException):
                        name = type(prediction).__name__
                        result.errors[name] = result.errors.get(name, 0) + 1
                        continue
                    result.answered += 1
                    result.full_size += prediction.array.shape[:2] == (1080, 1920)
            result.wall_s = time.perf_counter() - t0
            sampling.set()
            sampler.join()
            result.peak_used_mib = peak[0] / 2**20
            result.not_kept = _metric(httpx.get(f"{base}/metrics").text, "dense_answers_not_kept_total")
        finally:
            sampling.set()
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            server.close()
    return result


def _ready(base: str, procs: list[subprocess.Popen[bytes]], log: Path, timeout_s: float = 180.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a process exited at start:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")


def report(run_: VolumeRun, args: argparse.Namespace) -> str:
    settings = "default settings" if args.grace_s is None and args.budget_mib is None else (
        f"answer_grace_s={args.grace_s}, answer_store_bytes={args.budget_mib} MiB"
    )  # fmt: skip
    errors = ", ".join(f"{n} {k}" for k, n in sorted(run_.errors.items())) or "none"
    return "\n".join(
        [
            f"{run_.images} x 1920x1080 JPEG, Client.predict_many(concurrency={args.concurrency}), client defaults, "
            f"serve --queue redis + {args.workers} worker(s), {settings}, Redis maxmemory {run_.maxmemory_mib:.0f} MiB",
            "",
            "| answered | full-size maps | errors | peak Redis used_memory | answers not kept | wall |",
            "|---:|---:|---|---:|---:|---:|",
            f"| {run_.answered} / {run_.images} | {run_.full_size} | {errors} | {run_.peak_used_mib:.0f} MiB | "
            f"{run_.not_kept:.0f} | {run_.wall_s:.0f} s |",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1, help="dense-serve worker processes beside serve's own")
    ap.add_argument("--grace-s", type=float, default=None, help="answer_grace_s (default: the setting's default)")
    ap.add_argument("--budget-mib", type=int, default=None, help="answer_store_bytes in MiB (default: the default)")
    ap.add_argument("--out", help="also write the Markdown here")
    args = ap.parse_args()
    result = run(args.images, args.concurrency, args.workers, args.grace_s, args.budget_mib)
    text = report(result, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result.answered == result.images else 1


if __name__ == "__main__":
    raise SystemExit(main())
