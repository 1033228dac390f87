"""Start-up time and memory of the front-end processes (`dense-serve api`, `dense-serve grpc`).

Each role is started `--runs` times; the figures are the median time from spawn to the first 200 of /healthz and
the resident memory (VmRSS) then, with whether libtorch is mapped. `--repo` measures another checkout (e.g. a
`git worktree` of an older commit) with this interpreter, so before/after come from one run on one machine:

    python -m load_tests.frontend_footprint --repo /tmp/before --repo .
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass(frozen=True)
class Footprint:
    repo: str
    role: str
    startup_s: float
    rss_mb: float
    torch_mapped: bool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(repo: Path, role: str, redis_url: str) -> tuple[float, float, bool]:
    port = free_port()
    args = ["api", "--port", str(port)] if role == "api" else ["grpc", "--port", str(free_port())]
    if role == "grpc":
        args += ["--metrics-port", str(port)]
    # gRPC beside the api on a free port: 50051 may be held by another server (a taken port is refused).
    env = {**os.environ, "PYTHONPATH": str(repo), "DENSE_LOG_LEVEL": "warning", "DENSE_GRPC_PORT": "0"}
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args, "--queue", "redis", "--redis-url", redis_url, "--no-auth"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{role} in {repo} exited with {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
        mapped = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        return elapsed, rss_kb / 1024, mapped
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def measure(repo: Path, role: str, runs: int, redis_url: str) -> Footprint:
    samples = [start_once(repo, role, redis_url) for _ in range(runs)]
    return Footprint(
        str(repo),
        role,
        statistics.median(s[0] for s in samples),
        statistics.median(s[1] for s in samples),
        any(s[2] for s in samples),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, action="append", help="checkout to measure (repeatable; default .)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:1/0",
        help="the front-ends start without a reachable Redis; give a real one to include its handshake",
    )
    args = parser.parse_args(argv)
    print("| checkout | role | start-up to /healthz (median) | RSS | libtorch mapped |")
    print("|---|---|---:|---:|---|")
    for repo in args.repo or [Path(".")]:
        for role in ("api", "grpc"):
            f = measure(repo.resolve(), role, args.runs, args.redis_url)
            mapped = "yes" if f.torch_mapped else "no"
            print(f"| {repo} | {role} | {f.startup_s:.2f} s | {f.rss_mb:.0f} MB | {mapped} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
