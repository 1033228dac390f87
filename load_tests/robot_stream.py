"""Robot-style gRPC client: stream N frames at F fps, report achieved fps, per-frame latency and drops.

    .venv/bin/python -m load_tests.robot_stream --target 127.0.0.1:50051 --frames 200 --fps 10 [--drop-stale]
    .venv/bin/python -m load_tests.robot_stream --spawn --fps 5 --fps 40      # self-hosted, two frame rates

Frames come from `--folder` (images, cycled) or are generated. `--raw` sends uncompressed RGB, as a robot
would. `--spawn` starts a `dense-serve serve` on a tiny checkpoint on loopback for a self-contained run.
Bounded by --frames; loopback only unless you point --target elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.grpc.stubs import dense_pb2 as pb  # noqa: E402
from service.grpc.stubs.dense_pb2_grpc import DenseServiceStub  # noqa: E402


@dataclass
class StreamStats:
    fps_target: float
    sent: int = 0
    ok: int = 0
    dropped: int = 0
    errors: int = 0
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def row(self) -> str:
        fps = self.ok / self.wall_s if self.wall_s else 0.0
        return (
            f"| {self.fps_target:g} | {self.sent} | {self.ok} | {self.dropped} | {self.errors} | {fps:.1f} | "
            f"{self.p(50):.0f} / {self.p(95):.0f} / {self.p(99):.0f} |"
        )


HEADER = (
    "| target fps | frames sent | answered | dropped | errors | achieved fps (answered) | "
    "latency p50 / p95 / p99 (ms) |\n|---:|---:|---:|---:|---:|---:|---|"
)


def load_frames(folder: Path | None, count: int, size: tuple[int, int]) -> list[np.ndarray]:
    if folder:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths[:count]]
    rng = np.random.default_rng(0)
    h, w = size
    return [
        np.asarray(Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h)))
        for _ in range(min(count, 8))
    ]


async def stream(
    stub: DenseServiceStub,
    frames: list[np.ndarray],
    n: int,
    fps: float,
    raw: bool,
    drop_stale: bool,
    max_in_flight: int,
    processing_res: int,
    metadata: list[tuple[str, str]],
) -> StreamStats:
    stats = StreamStats(fps_target=fps)
    encoded = [_png(f) for f in frames]
    sent_at: dict[int, float] = {}

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=pb.StreamConfig(max_in_flight=max_in_flight, drop_stale=drop_stale))
        start = time.perf_counter()
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / fps - time.perf_counter()))
            img = frames[i % len(frames)]
            req = pb.PredictRequest(frame_id=i, timestamp_ns=time.time_ns(), processing_res=processing_res)
            if raw:
                req.raw.CopyFrom(pb.RawImage(height=img.shape[0], width=img.shape[1], data=img.tobytes()))
            else:
                req.encoded = encoded[i % len(encoded)]
            sent_at[i] = time.perf_counter()
            stats.sent += 1
            yield pb.StreamRequest(frame=req)

    t0 = time.perf_counter()
    async for reply in stub.StreamPredict(requests(), metadata=metadata):
        if reply.status == pb.FRAME_STATUS_OK:
            stats.ok += 1
            stats.latencies_ms.append((time.perf_counter() - sent_at[reply.frame_id]) * 1000.0)
        elif reply.status == pb.FRAME_STATUS_DROPPED:
            stats.dropped += 1
        else:
            stats.errors += 1
    stats.wall_s = time.perf_counter() - t0
    return stats


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    from models.tiny import make_tiny

    model = make_tiny(Path(tmp) / "lotus-d-depth", "lotus-d", "depth")
    port, http = _free_port(), _free_port()
    env = {**os.environ, "DENSE_GRPC_PORT": str(port), "DENSE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--model", str(model), "--port", str(http)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"127.0.0.1:{port}"


async def _wait_serving(channel: grpc.aio.Channel, timeout_s: float = 120) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the server did not become SERVING")


async def _main(args: argparse.Namespace) -> None:
    frames = load_frames(args.folder, args.frames, tuple(int(v) for v in args.size.split("x")))
    metadata = [("x-api-key", args.api_key)] if args.api_key else []
    async with grpc.aio.insecure_channel(args.target) as channel:
        await _wait_serving(channel)
        stub = DenseServiceStub(channel)
        print(
            f"### robot stream: {args.frames} frames of {args.size}, {'raw RGB' if args.raw else 'PNG'}, "
            f"drop_stale={args.drop_stale}, max_in_flight={args.max_in_flight}, processing_res="
            f"{args.processing_res or 'default'}\n"
        )
        print(HEADER)
        for fps in args.fps:
            result = await stream(
                stub,
                frames,
                args.frames,
                fps,
                args.raw,
                args.drop_stale,
                args.max_in_flight,
                args.processing_res,
                metadata,
            )
            print(result.row())
            if result.latencies_ms:
                statistics.mean(result.latencies_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--spawn", action="store_true", help="start a tiny-model server on loopback for the run")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--fps", type=float, action="append", help="frame rate (repeatable; default 10)")
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--size", default="96x128", help="generated frame size HxW")
    parser.add_argument("--raw", action="store_true", help="send uncompressed RGB instead of PNG")
    parser.add_argument("--drop-stale", action="store_true")
    parser.add_argument("--max-in-flight", type=int, default=2)
    parser.add_argument("--processing-res", type=int, default=0)
    parser.add_argument("--api-key")
    args = parser.parse_args()
    args.fps = args.fps or [10.0]
    if not args.spawn:
        asyncio.run(_main(args))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        proc, args.target = _spawn(tmp)
        try:
            asyncio.run(_main(args))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
