"""The data path at real sizes, through a real `dense-serve serve` on loopback: what a request costs besides
the model, per stage, at 640x480, 1920x1080 and 3840x2160, with default settings.

    .venv/bin/python -m load_tests.bench_sizes [--before REF] [--out bench-sizes.md]   (make bench-sizes)

- c=1: median latency per input size, input format (JPEG, PNG) and answer format (png, npy, exr, json), split
  into the stages the server reports in Server-Timing (decode, queue wait, preprocess, compute, postprocess,
  encode) and transport (client latency - server total); the ratio (latency - compute) / compute.
- c=16 at 1080p: throughput against a direct in-process loop over the same decoded images in batches of 8,
  with the same encoding (decode excluded from the loop, as the issue asks).
- idle dispatch: c=1 latency with `max_queue_delay_ms=60` minus with 0.
- a simulated device (`backend = "simulated"`: each batch sleeps S ms, no CPU): throughput against batch / S
  at c=16 and c=32, and the device's idle time per batch while work was in hand (the pipeline's stall). At
  c = 2 x batch a closed loop cannot keep a full batch waiting while the last one is answered (Little's law:
  at best 2S / (2S + R) of batch / S, R the answer time); c=32 shows the pipeline's own limit.
- with `--before REF`, the same c=1, c=16 and idle-dispatch runs against REF checked out in a temporary git
  worktree (same virtual environment), in the same run.

The model is the shipped demo (a Lotus-D) at `processing_res` 64, so compute is small and fixed and everything
else shows. Bounded in count and time; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from models.inference import DensePredictor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZES = {"640x480": (480, 640), "1920x1080": (1080, 1920), "3840x2160": (2160, 3840)}
DEMO = REPO / "models" / "demo" / "lotus-d-synthetic-demo.toml"
STAGES = ("decode", "queue", "preprocess", "compute", "postprocess", "encode")


@dataclass
class Sample:
    latency_ms: float
    timings: dict[str, float]
    batch: int


@dataclass
class Cell:
    """c=1 results of one (size, input, format) on one server."""

    samples: list[Sample] = field(default_factory=list)

    def median(self, key: str) -> float:
        if key == "latency":
            return statistics.median(s.latency_ms for s in self.samples)
        values = [s.timings[key] for s in self.samples if key in s.timings]
        return statistics.median(values) if values else float("nan")


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB image: a rendered synthetic scene, upscaled, with sensor-like noise."""
    from models.training.synthetic import generate

    base = generate(seed, min(height, 540), min(width, 960)).rgb
    img = Image.fromarray(np.round(base * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    noise = np.random.default_rng(seed).normal(0.0, 3.0, (height, width, 3))
    return np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)


def encoded(arr: np.ndarray, kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "jpeg":
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    else:
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ServerStartError(RuntimeError):
    """`dense-serve serve` exited or did not become ready. An error, not SystemExit: a caller that runs several
    measurements (the GPU check) records it and goes on; this module's own CLI turns it into its exit message."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(
    checkout: Path,
    model: str,
    env_extra: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    ready_timeout_s: float = 180.0,
    log: Path | None = None,
) -> Iterator[str]:
    """`dense-serve serve` from `checkout` (this repo, or a worktree of an older commit) on a free port.

    `checkout` goes first on PYTHONPATH, ahead of (not instead of) the caller's: packages installed with
    `pip --target` (the GPU check's wheelhouse, for one) stay importable by the server. With `log`, the server's
    stdout and stderr go to that file (else its stdout is dropped and its stderr is this process's). Raises
    ServerStartError when the server exits or is not ready in `ready_timeout_s`.
    """
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(checkout), os.environ.get("PYTHONPATH", "")) if p),
        "DENSE_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "warning"),
        "DENSE_GRPC_ENABLED": "false",
        "DENSE_QUEUE_MAX_JOBS": "1024",
        **(env_extra or {}),
    }
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", model, "--port", str(port), *(extra_args or [])]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("w")) if log is not None else None
        proc = subprocess.Popen(
            cmd, cwd=checkout, env=env, stdout=out or subprocess.DEVNULL, stderr=subprocess.STDOUT if out else None
        )
        base = f"http://127.0.0.1:{port}"
        try:
            end = time.monotonic() + ready_timeout_s
            while time.monotonic() < end:
                if proc.poll() is not None:
                    raise ServerStartError(f"server exited with {proc.returncode}{_log_end(log)}: {' '.join(cmd)}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                time.sleep(0.2)
            else:
                raise ServerStartError(f"server did not become ready in {ready_timeout_s:.0f} s{_log_end(log)}")
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a server that ignores SIGTERM must not outlive the measurement
                proc.kill()
                proc.wait()


def _log_end(log: Path | None, count: int = 3) -> str:
    """The last lines of the server's log, for an error message (empty without a log)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log else []
    return f" (its log ends: {' / '.join(lines[-count:])[-400:]})" if lines else ""


def _ctype(kind: str) -> str:
    return "image/jpeg" if kind == "jpeg" else "image/png"


async def _post(client: httpx.AsyncClient, res: int, image: bytes, kind: str, fmt: str) -> Sample:
    """`fmt` is an answer format, optionally `+zstd` / `+gzip` for a compressed body (Accept-Encoding)."""
    fmt, _, compression = fmt.partition("+")
    headers = {"content-type": _ctype(kind), "accept-encoding": compression or "identity"}
    t0 = time.perf_counter()
    r = await client.post(f"/v1/depth?processing_res={res}&format={fmt}", content=image, headers=headers)
    latency = (time.perf_counter() - t0) * 1000.0
    r.raise_for_status()
    timings = {}
    for part in r.headers.get("server-timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            timings[name] = float(dur)
    return Sample(latency, timings, int(r.headers.get("x-batch-size", "0")))


async def c1(base: str, res: int, image: bytes, kind: str, fmt: str, n: int) -> Cell:
    cell = Cell()
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        await _post(client, res, image, kind, fmt)  # warm this shape
        for _ in range(n):
            cell.samples.append(await _post(client, res, image, kind, fmt))
    return cell


async def cn(
    base: str, res: int, image: bytes, kind: str, fmt: str, n: int, c: int, samples: list[Sample] | None = None
) -> tuple[float, Counter[int]]:
    """Throughput (img/s) of `n` requests kept `c` at a time in flight, and the batch sizes seen."""
    sem = asyncio.Semaphore(c)
    batches: Counter[int] = Counter()
    samples = [] if samples is None else samples
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        await asyncio.gather(*(_post(client, res, image, kind, fmt) for _ in range(c)))  # warm

        async def one() -> None:
            async with sem:
                sample = await _post(client, res, image, kind, fmt)
            batches[sample.batch] += 1
            samples.append(sample)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - start), batches


def direct_loop(model_arg: str | DensePredictor, res: int, image: bytes, fmt: str, n: int, batch: int) -> float:
    """img/s of in-process batches of `batch` over already decoded images, with the same answer encoding.

    `model_arg` is a spec/folder to load, or a model already loaded (the GPU check reuses its own).
    """
    from models.inference import BatchItem
    from models.loading import load_model
    from models.spec import resolve_spec
    from service.worker.encode import FORM_OF, encode_prediction
    from service.worker.prepare import decode_for

    encoding = fmt
    model = load_model(resolve_spec(model_arg)) if isinstance(model_arg, str) else model_arg
    pixels, geometry = decode_for(model, image, res)
    items = [BatchItem(pixels, geometry, form=FORM_OF[encoding])] * batch
    for pred in model.predict_batch(items):  # warm
        encode_prediction(pred, encoding)
    rounds = max(1, n // batch)
    start = time.perf_counter()
    for _ in range(rounds):
        for pred in model.predict_batch(items):
            encode_prediction(pred, encoding)
    return rounds * batch / (time.perf_counter() - start)


@dataclass
class ServerResult:
    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)
    throughput: dict[str, tuple[float, Counter[int]]] = field(default_factory=dict)
    idle_delay: dict[float, float] = field(default_factory=dict)


def measure(checkout: Path, args: argparse.Namespace, images: dict[tuple[str, str], bytes]) -> ServerResult:
    out = ServerResult()
    with serving(checkout, args.model) as base:
        for (size, kind), image in images.items():
            for fmt in args.formats:
                out.cells[(size, kind, fmt)] = asyncio.run(c1(base, args.res, image, kind, fmt, args.c1_requests))
                print(
                    f"  {checkout.name} {size} {kind} {fmt}: {out.cells[(size, kind, fmt)].median('latency'):.0f} ms",
                    file=sys.stderr,
                )
        hd = images[("1920x1080", "jpeg")]
        for fmt in ("png", "npy"):
            out.throughput[fmt] = asyncio.run(cn(base, args.res, hd, "jpeg", fmt, args.requests, args.concurrency))
    for delay in (0.0, 60.0):
        with serving(checkout, args.model, {"DENSE_MAX_QUEUE_DELAY_MS": str(delay)}) as base:
            cell = asyncio.run(c1(base, args.res, images[("1920x1080", "jpeg")], "jpeg", "npy", args.c1_requests))
            out.idle_delay[delay] = cell.median("latency")
    return out


@dataclass
class SimulatedRun:
    concurrency: int
    throughput: float
    batches: Counter[int]
    idle_ms: float  # mean device idle per batch while its jobs were already in the worker
    device_ms: float  # median device stage per batch: the sleep plus pre- and post-processing on this CPU


def simulated(args: argparse.Namespace, image: bytes, batch_ms: float) -> list[SimulatedRun]:
    """The served path around a device that sleeps `batch_ms` per batch, at c=16 and at c=32."""
    spec = Path(tempfile.mkdtemp()) / "simulated.toml"
    source = (DEMO.parent / "model").resolve()
    spec.write_text(
        f'id = "simulated"\nsource = "{source}"\nfamily = "lotus-d"\ntask = "depth"\nbackend = "simulated"\n'
        f"simulated_batch_ms = {batch_ms}\nprocessing_res = {args.res}\n"
    )
    runs = []
    for c in (args.concurrency, 2 * args.concurrency):
        with serving(REPO, str(spec)) as base:
            samples: list[Sample] = []
            tput, batches = asyncio.run(cn(base, args.res, image, "jpeg", "png", args.requests, c, samples))
            idle = _metric_sum(base, "dense_compute_idle_seconds_sum") / max(
                1.0, _metric_sum(base, "dense_compute_idle_seconds_count")
            )
            device = statistics.median(
                sum(s.timings.get(k, 0.0) for k in ("preprocess", "compute", "postprocess")) for s in samples
            )
            runs.append(SimulatedRun(c, tput, batches, idle * 1000.0, device))
    return runs


def _metric_sum(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp()) / f"before-{ref.replace('/', '-')}"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=REPO, check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False, capture_output=True)


def report(
    args: argparse.Namespace, runs: dict[str, ServerResult], direct: dict[str, float], sim: list[SimulatedRun]
) -> str:
    lines = [
        f"Model: {Path(args.model).stem} at processing_res {args.res}; {os.cpu_count()} cores; default settings; "
        f"c=1 medians of {args.c1_requests}, c={args.concurrency} over {args.requests} requests.",
        "",
    ]
    for name, run in runs.items():
        lines += [
            f"#### {name}: c=1, per stage (ms, medians; compute = the model's graphs)",
            "",
            "| input | answer | latency | " + " | ".join(STAGES) + " | transport | (latency - compute) / compute |",
            "|---|---|---:|" + "---:|" * (len(STAGES) + 2),
        ]
        for (size, kind, fmt), cell in run.cells.items():
            lat, total, comp = cell.median("latency"), cell.median("total"), cell.median("compute")
            stages = " | ".join("-" if np.isnan(cell.median(s)) else f"{cell.median(s):.1f}" for s in STAGES)
            lines.append(
                f"| {size} {kind} | {fmt} | {lat:.1f} | {stages} | {lat - total:.1f} | {(lat - comp) / comp:.1f} |"
            )
        lines.append("")
    if runs:
        names = list(runs)
        lines += [
            "#### Targets (1920x1080 JPEG)",
            "",
            "| measure | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]

        def row(label: str, values: list[str]) -> None:
            lines.append(f"| {label} | " + " | ".join(values) + " |")

        def hd(run: ServerResult, fmt: str, key: str) -> float:
            return run.cells[("1920x1080", "jpeg", fmt)].median(key)

        row(
            "PNG answer latency / NPY answer latency",
            [f"{hd(r, 'png', 'latency') / hd(r, 'npy', 'latency'):.2f}x" for r in runs.values()],
        )
        row("PNG encode (ms)", [f"{hd(r, 'png', 'encode'):.1f}" for r in runs.values()])
        row(
            "c=1 latency, max_queue_delay_ms 60 minus 0 (ms)",
            [f"{r.idle_delay[60.0] - r.idle_delay[0.0]:+.1f}" for r in runs.values()],
        )
        for fmt in ("png", "npy"):
            row(
                f"c={args.concurrency} throughput, {fmt} answers (img/s)",
                [f"{r.throughput[fmt][0]:.1f}" for r in runs.values()],
            )
            row(
                f"... / direct batch-8 loop with the same encoding ({direct[fmt]:.1f} img/s)",
                [f"{r.throughput[fmt][0] / direct[fmt]:.2f}x" for r in runs.values()],
            )
            row(
                f"batch sizes at c={args.concurrency}, {fmt} (size: requests)",
                [", ".join(f"{k}: {v}" for k, v in sorted(r.throughput[fmt][1].items())) for r in runs.values()],
            )
    ideal = 8 / (args.simulate_ms / 1000.0)
    lines += [
        "",
        f"#### Simulated device ({args.simulate_ms:.0f} ms per batch of up to 8, no CPU), 1920x1080 JPEG -> PNG",
        "",
        "| concurrency | throughput (img/s) | batch / S (img/s) | ratio | device stage per batch (ms) "
        "| ratio to batch / device stage | device idle with work in hand (ms/batch) | batch sizes |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in sim:
        seen = ", ".join(f"{k}: {v}" for k, v in sorted(run.batches.items()))
        stage_bound = 8 / (run.device_ms / 1000.0)
        lines.append(
            f"| {run.concurrency} | {run.throughput:.1f} | {ideal:.1f} | {run.throughput / ideal:.2f} | "
            f"{run.device_ms:.0f} | {run.throughput / stage_bound:.2f} | {run.idle_ms:.1f} | {seen} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO), help="model spec/folder (default: the shipped demo model)")
    ap.add_argument("--res", type=int, default=64, help="processing_res (default 64: compute small and fixed)")
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--inputs", default="jpeg,png")
    ap.add_argument("--formats", default="png,npy,npy+zstd,exr,tiff,json", help="answer formats (+zstd, +gzip)")
    ap.add_argument("--c1-requests", type=int, default=7)
    ap.add_argument("--requests", type=int, default=64, help="requests per c=16 run")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--simulate-ms", type=float, default=250.0, help="simulated device: sleep per batch")
    ap.add_argument("--before", help="git ref to measure in the same run (e.g. the commit before a change)")
    ap.add_argument("--out", help="also write the Markdown here")
    ap.add_argument("--only-simulated", action="store_true", help="just the simulated-device runs")
    args = ap.parse_args()
    args.formats = [f for f in args.formats.split(",") if f]
    if args.only_simulated:
        sim = simulated(args, encoded(photo(*SIZES["1920x1080"], seed=3), "jpeg"), args.simulate_ms)
        print(report(args, {}, {}, sim))
        return 0
    images = {
        (size, kind): encoded(photo(*SIZES[size], seed=3), kind)
        for size in args.sizes.split(",")
        for kind in args.inputs.split(",")
    }
    hd_jpeg = images[("1920x1080", "jpeg")]
    direct = {fmt: direct_loop(args.model, args.res, hd_jpeg, fmt, 64, 8) for fmt in ("png", "npy")}
    runs: dict[str, ServerResult] = {}
    if args.before:
        with worktree(args.before) as old:
            before_formats = args.formats
            args.formats = [f for f in args.formats if f in ("png", "npy", "json")]  # what the old API knew
            runs[f"before ({args.before})"] = measure(old, args, images)
            args.formats = before_formats
    runs["after"] = measure(REPO, args, images)
    sim = simulated(args, images[("1920x1080", "jpeg")], args.simulate_ms)
    text = report(args, runs, direct, sim)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except ServerStartError as exc:  # the CLI's answer to a server that does not start: its message, exit status 1
        raise SystemExit(str(exc)) from None
    raise SystemExit(code)
