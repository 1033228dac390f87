"""GPU check: verify and measure the GPU path in one command that fits a 15-minute device lease.

    python3 -m load_tests.gpu_check --out DIR            (on the lent GPU: DIR = $OUT; at most 8 minutes)
    .venv/bin/python -m load_tests.gpu_check --cpu-smoke --out DIR      (make gpu-check-smoke; under 4 minutes)

Steps, in the order they run; each writes DIR/gpu-check.json and DIR/gpu-table.md as it finishes (and the
throughput steps after every configuration), so a run cut short still leaves its results:

1. environment: GPU, driver, torch/CUDA/cuDNN versions, which optional runtimes import, unmet requirements of
   dense-serve, and the matmul peak measured here (fp16 8192^3 on the GPU), the ceiling every fraction uses;
2. the suite's CUDA tests (`pytest -m gpu`: fp16 vs fp32, device quantisation, ONNX Runtime CUDA, TensorRT),
   each skipped with its reason where its runtime is missing;
3. an SD2-sized random-weight checkpoint built here from a seed (`make_tiny(..., arch="sd2")`, never
   downloaded), timed at 512 and 768 px, batch 1/4/8/16, as torch eager fp16 (SDPA), CUDA graphs, and
   channels_last: ms/img, img/s, fraction of the counted FLOPs per image (10.5 TFLOP at 768 px) at the
   measured matmul peak, peak memory, and the largest difference from eager on the same inputs;
4. fp16 vs fp32 (TF32 off) on the same inputs: max, mean and relative error of the maps;
5. the served path: `dense-serve serve` (in-process queue) on loopback, 1080p JPEG requests at c=1 and c=16,
   PNG and NPY answers: img/s, and the ratio to the direct in-process batch-8 loop (load_tests/bench_sizes);
6. torch.compile (the served runtime's `compile = true`: dynamic shapes) in a child process killed at its share
   of the time, so a long compile cannot eat the lease; configurations it did not reach say so;
7. ONNX Runtime CUDA and TensorRT, exported and timed in a child process the same way, only where they import
   with a GPU provider; otherwise the table says they are not on the device image (the worker Docker image
   installs them).

`--cpu-smoke` runs the same steps on the CPU with the tiny checkpoint at 64 px (fp32; torch.compile with the
`eager` dynamo backend, since inductor's C++ build alone takes minutes on two cores; ONNX Runtime's CPU
provider stands in for CUDA; CUDA graphs are replaced by a check for the operations graph capture refuses), so
the script is proven before a lease. docs/benchmarks.md says how to run it with the device tool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from load_tests.bench_sizes import SIZES, Sample, cn, direct_loop, encoded, photo, serving  # noqa: E402
from models.inference import DensePredictor  # noqa: E402
from models.runtime import Runtime, TorchRuntime  # noqa: E402

#: The suite's GPU tests live in these files (marked `gpu`); tests/test_gpu_check.py keeps the list true.
GPU_TEST_FILES = ("tests/test_data_path.py", "tests/test_export.py", "tests/test_spec_loading.py")
#: The documented cost of one 768 px prediction on the SD2 architecture (docs/performance.md), for the table.
DOC_TFLOP_768 = 10.5
FAMILY, TASK = "lotus-g", "depth"
VARIANT_LABELS = {
    "eager": "torch eager (SDPA)",
    "cuda-graphs": "torch eager + CUDA graphs",
    "channels-last": "torch eager, channels_last",
    "compile": "torch.compile",
    "onnxruntime": "ONNX Runtime",
    "tensorrt": "TensorRT",
}
NOT_ON_IMAGE = "not on the device image (the worker Docker image installs onnxruntime-gpu and tensorrt)"


@dataclass(frozen=True)
class Profile:
    """What one mode runs: sizes, batches, and how the time is shared between the steps."""

    name: str
    device: str
    dtype: str
    arch: str
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    budget_s: float
    #: The most seconds each bounded step may take (it also never runs past the whole budget).
    caps: dict[str, float]
    compile_backend: str
    served_res: int
    c1_requests: int
    cn_requests: int
    concurrency: int
    precision_res: int
    precision_batch: int
    matmul_n: int
    matmul_dtype: str
    #: Seconds of timed calls per configuration (at least 3 calls), after `warmup` untimed ones.
    target_s: float
    warmup: int


GPU = Profile(
    name="gpu",
    device="cuda",
    dtype="fp16",
    arch="sd2",
    sizes=(512, 768),
    batches=(1, 4, 8, 16),
    budget_s=450.0,
    caps={"cuda-tests": 100.0, "throughput": 110.0, "served": 100.0, "compile": 150.0, "exported": 150.0},
    compile_backend="inductor",
    served_res=768,
    c1_requests=16,
    cn_requests=128,
    concurrency=16,
    precision_res=768,
    precision_batch=2,
    matmul_n=8192,
    matmul_dtype="fp16",
    target_s=0.25,
    warmup=2,
)
SMOKE = Profile(
    name="cpu-smoke",
    device="cpu",
    dtype="fp32",
    arch="tiny",
    sizes=(64,),
    batches=(1, 4),
    budget_s=220.0,
    caps={"cuda-tests": 60.0, "throughput": 30.0, "served": 45.0, "compile": 60.0, "exported": 45.0},
    compile_backend="eager",
    served_res=64,
    c1_requests=4,
    cn_requests=32,
    concurrency=16,
    precision_res=64,
    precision_batch=2,
    matmul_n=1024,
    matmul_dtype="fp32",
    target_s=0.1,
    warmup=1,
)
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------- results


@dataclass
class Step:
    name: str
    status: str = "pending"  # pending | running | ok | partial | skipped | failed
    seconds: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class Outcome:
    """What a step returns: its status and a one-line note for the steps table."""

    status: str
    note: str


@dataclass
class GpuTestOutcome:
    test: str
    outcome: str  # passed | failed | skipped | error
    seconds: float
    message: str = ""


@dataclass
class BenchRow:
    variant: str
    res: int
    batch: int
    status: str  # ok | failed | skipped (cannot run here) | not reached (its share of the time ran out)
    ms_per_img: float | None = None
    img_per_s: float | None = None
    flop_fraction: float | None = None
    peak_mem_gib: float | None = None
    first_call_s: float | None = None
    max_err_vs_eager: float | None = None
    note: str = ""


@dataclass
class PrecisionRow:
    res: int
    batch: int
    max_abs: float
    mean_abs: float
    rel_l2: float
    non_finite: int
    note: str = ""


@dataclass
class ServedRow:
    answer: str
    concurrency: int
    requests: int
    img_per_s: float
    p50_ms: float
    compute_ms: float
    batches: str
    direct_batch: int | None = None
    direct_img_per_s: float | None = None

    @property
    def ratio(self) -> float | None:
        return self.img_per_s / self.direct_img_per_s if self.direct_img_per_s else None


@dataclass
class Report:
    mode: str
    started: str
    budget_s: float
    env: dict[str, str] = field(default_factory=dict)
    peak_tflops: float | None = None
    flops_per_img: dict[int, float] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    tests: list[GpuTestOutcome] = field(default_factory=list)
    bench: list[BenchRow] = field(default_factory=list)
    precision: list[PrecisionRow] = field(default_factory=list)
    served: list[ServedRow] = field(default_factory=list)

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        self.steps.append(Step(name))
        return self.steps[-1]

    def add_rows(self, rows: list[BenchRow]) -> None:
        """Fill in the FLOP fraction (the parent has the counts and the peak) and keep the rows."""
        for row in rows:
            if row.img_per_s and self.peak_tflops and row.res in self.flops_per_img:
                row.flop_fraction = row.img_per_s * self.flops_per_img[row.res] / (self.peak_tflops * 1e12)
        self.bench.extend(rows)

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        for row, served in zip(data["served"], self.served, strict=True):
            row["ratio_to_direct"] = served.ratio
        _atomic_write(out / "gpu-check.json", json.dumps(data, indent=2) + "\n")
        _atomic_write(out / "gpu-table.md", render(self) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    """Write then rename: a run killed mid-write leaves the previous complete file, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Budget:
    """The whole run's deadline, and each bounded step's share of what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def share(self, cap: float) -> float:
        """Seconds a step may use: its cap, or less when the whole budget is running out."""
        return max(0.0, min(cap, self.left()))


# ------------------------------------------------------------------------------------------ measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    first_s: float
    median_s: float
    iters: int


def measure(
    fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, target_s: float, deadline: float
) -> tuple[Timing, torch.Tensor]:
    """Median seconds per call after warm-up (CUDA events on a GPU: device work is asynchronous).

    The first call is timed on its own: it includes kernel selection, and compilation for compiled runtimes.
    """
    start = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < 3 or (sum(times) < target_s and len(times) < 50 and time.monotonic() < deadline):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(first, statistics.median(times), len(times)), out


def inputs(res: int, batch: int) -> torch.Tensor:
    """Random images in [-1, 1], the same for every process and variant (never zeros: they flatter kernels)."""
    gen = torch.Generator("cpu").manual_seed(res * 1000 + batch)
    return torch.rand((batch, 3, res, res), generator=gen) * 2 - 1


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """TFLOP/s of an n^3 matmul on random data: the ceiling the FLOP fractions are taken against."""
    a = torch.randn((n, n), device=device, dtype=dtype)
    b = torch.randn((n, n), device=device, dtype=dtype)
    timing, _ = measure(lambda: a @ b, device, warmup=3, target_s=0.5, deadline=time.monotonic() + 10)
    return 2 * n**3 / timing.median_s / 1e12


def count_flops(core: torch.nn.Module, res: int) -> float:
    """FLOPs of one image through encoder, UNet and decoder (torch's counter: what docs/performance.md used)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = inputs(res, 1).to(core.device, core.dtype)
    noise = core.make_noise([0], (res // 8, res // 8))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        core.head(core.encode(x), noise)
    return float(counter.get_total_flops())


#: Operations CUDA graph capture refuses: host reads (`.item()`, `bool(t)`), tensors made from Python data (a
#: host copy and a sync on CUDA), and data-dependent shapes.
CAPTURE_HAZARDS = frozenset(
    {"item", "_local_scalar_dense", "is_nonzero", "equal", "lift_fresh", "lift_fresh_copy", "nonzero"}
    | {"masked_select", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"}
)


def capture_hazards(fn: Callable[[], torch.Tensor]) -> list[str]:
    """The hazardous operations one call of `fn` dispatches: what can be proven about graph capture on a CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func.overloadpacket.__name__
            indices = args[1] if name == "index" and len(args) > 1 and isinstance(args[1], list | tuple) else ()
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                name = "index with a boolean mask"  # its output's shape depends on the data
            if (name in CAPTURE_HAZARDS or name.startswith("index with")) and name not in seen:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    return seen


def graphed(
    run: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], x: torch.Tensor, noise: torch.Tensor | None
) -> Callable[[], torch.Tensor]:
    """`run` captured once as a CUDA graph on static inputs; returns a callable that replays it."""
    static_x = x.clone()
    static_noise = noise.clone() if noise is not None else None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the capture: cuDNN picks its algorithms here
        for _ in range(2):
            run(static_x, static_noise)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(static_x, static_noise)

    def replay() -> torch.Tensor:
        graph.replay()
        return static_out

    return replay


# ------------------------------------------------------------------------------------------------- steps


def optional_imports() -> dict[str, str]:
    """Version (or why not) of each runtime and serving package the check and the service may use."""
    found: dict[str, str] = {}
    for module in ("onnxruntime", "tensorrt", "triton", "diffusers", "transformers", "fastapi", "uvicorn", "redis"):
        try:
            mod = importlib.import_module(module)
            found[module] = str(getattr(mod, "__version__", "?"))
        except Exception as exc:  # any import failure means "not usable here"; say which
            found[module] = f"not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    with contextlib.suppress(Exception):
        import onnxruntime

        found["onnxruntime providers"] = ", ".join(onnxruntime.get_available_providers())
    return found


def unmet_requirements() -> list[str]:
    """dense-serve's requirements that the installed packages do not meet (empty when the install is whole)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in metadata.requires("dense-serve") or []]
    except metadata.PackageNotFoundError:
        return ["dense-serve itself is not installed (install the wheelhouse: docs/benchmarks.md)"]
    unmet = []
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{req} (missing)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{req} (have {version})")
    return unmet


def step_environment(profile: Profile, report: Report) -> Outcome:
    env = report.env
    env["python"] = platform.python_version()
    env["torch"] = torch.__version__
    env["cuda (torch build)"] = str(torch.version.cuda)
    env["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "-"
    env["cpu cores"] = str(os.cpu_count())
    device = torch.device(profile.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible to torch: run with --cpu-smoke, or on the lent GPU")
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["compute capability"] = f"{props.major}.{props.minor}"
        env["multiprocessors"] = str(props.multi_processor_count)
        env["gpu memory (GiB)"] = f"{props.total_memory / 2**30:.1f}"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["driver, max SM clock, power limit"] = smi.stdout.strip().splitlines()[0] if smi.stdout else "?"
    else:
        env["gpu"] = "none (CPU smoke)"
    env |= optional_imports()
    env["dense-serve unmet requirements"] = "; ".join(unmet_requirements()) or "none"
    report.peak_tflops = matmul_peak(device, profile.matmul_n, DTYPES[profile.matmul_dtype])
    peak = f"{report.peak_tflops:.3g}"
    env["matmul peak measured (TFLOP/s)"] = f"{peak} ({profile.matmul_dtype} {profile.matmul_n}^3, random data)"
    return Outcome("ok", f"{env['gpu']}; matmul peak {peak} TFLOP/s")


def step_cuda_tests(profile: Profile, report: Report, budget: Budget, work: Path) -> Outcome:
    """The suite's GPU tests, run here with pytest; outcomes from its JUnit XML."""
    junit = work / "pytest-gpu.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    cmd += ["--junitxml", str(junit), *GPU_TEST_FILES]
    timeout = budget.share(profile.caps["cuda-tests"])
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        tail, timed_out = proc.stdout[-1500:], False
    except subprocess.TimeoutExpired as exc:
        partial_out = exc.stdout or b""
        text = partial_out.decode(errors="replace") if isinstance(partial_out, bytes) else partial_out
        tail, timed_out = text[-1500:], True
    report.tests = parse_junit(junit) if junit.is_file() else []
    counts = {o: sum(t.outcome == o for t in report.tests) for o in ("passed", "failed", "error", "skipped")}
    summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n) or "no tests ran"
    if timed_out:
        return Outcome("partial", f"stopped at its {timeout:.0f} s share; {summary}")
    if counts["failed"] or counts["error"] or not report.tests:
        print(tail, file=sys.stderr)
        return Outcome("failed", summary)
    return Outcome("ok", summary)


def parse_junit(path: Path) -> list[GpuTestOutcome]:
    outcomes = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "").splitlines()[0][:160] if child.get("message") else ""
        outcomes.append(GpuTestOutcome(name, outcome, float(case.get("time", 0.0)), message))
    return outcomes


def checkpoint(profile: Profile, work: Path) -> Path:
    """The random-weight checkpoint of this profile's architecture, built once per work folder from seed 0."""
    from models.tiny import make_tiny

    path = work / f"{profile.arch}-{FAMILY}-{TASK}"
    if not (path / "model_index.json").is_file():
        make_tiny(path, FAMILY, TASK, seed=0, arch=profile.arch)
    return path


def load_torch(ckpt: Path, profile: Profile, dtype: str | None = None) -> DensePredictor:
    """The model as the service loads it (torch backend, SDPA attention), on the profile's device."""
    from models.loading import load_model
    from models.spec import ModelSpec

    spec = ModelSpec(
        id=f"{profile.arch}-random", source=str(ckpt), family=FAMILY, task=TASK, device=profile.device,
        dtype=dtype or profile.dtype, processing_res=profile.served_res,
    )  # fmt: skip
    return load_model(spec, backend="torch")


def configs(profile: Profile) -> Iterator[tuple[int, int]]:
    for res in profile.sizes:
        for batch in profile.batches:
            yield res, batch


def bench_variant(
    variant: str,
    runtime: Runtime,
    profile: Profile,
    deadline: float,
    reference: dict[tuple[int, int], torch.Tensor],
    on_row: Callable[[BenchRow], None],
    channels_last: bool = False,
) -> None:
    """Time `runtime.run` at every configuration of the profile. `reference` holds the eager outputs: filled in
    by the eager variant, compared against by the others (same inputs, same noise)."""
    device = runtime.device
    for res, batch in configs(profile):
        if time.monotonic() > deadline:
            on_row(BenchRow(variant, res, batch, "not reached", note="the step's share of the time ran out"))
            continue
        x = inputs(res, batch).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        noise = runtime.make_noise(list(range(batch)), (res // 8, res // 8))
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            started = time.perf_counter()
            fn = graphed(runtime.run, x, noise) if variant == "cuda-graphs" else partial(runtime.run, x, noise)
            capture_s = time.perf_counter() - started  # warm-up and capture, for CUDA graphs
            timing, out = measure(fn, device, profile.warmup, profile.target_s, deadline)
            out = out.float().cpu()
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        except Exception as exc:  # a configuration that fails (out of memory, capture refused) is a finding
            on_row(BenchRow(variant, res, batch, "failed", note=f"{type(exc).__name__}: {str(exc)[:200]}"))
            continue
        finally:
            fn = None  # frees a CUDA graph and its memory pool before the next configuration
        err = None
        if variant == "eager":
            reference[(res, batch)] = out
        elif (res, batch) in reference:
            err = float((out - reference[(res, batch)]).abs().max())
        on_row(
            BenchRow(
                variant, res, batch, "ok", ms_per_img=timing.median_s / batch * 1e3, img_per_s=batch / timing.median_s,
                peak_mem_gib=mem, first_call_s=capture_s + timing.first_s, max_err_vs_eager=err,
                note=f"median of {timing.iters}",
            )
        )  # fmt: skip


def rows_outcome(rows: list[BenchRow], extra: str = "") -> Outcome:
    """ok when every configuration that can run here was measured; partial when some failed or time ran out
    first; failed when none could be measured."""
    count = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "skipped", "not reached")}
    status = "failed" if count["failed"] and not count["ok"] else "ok"
    if status == "ok" and (count["failed"] or count["not reached"]):
        status = "partial"
    note = f"{count['ok']} of {len(rows)} configurations measured"
    note += "".join(f", {n} {s}" for s, n in count.items() if n and s != "ok")
    return Outcome(status, note + extra)


@dataclass
class Context:
    """What later steps take from earlier ones."""

    profile: Profile
    report: Report
    budget: Budget
    out: Path
    work: Path
    ckpt: Path | None = None
    model: DensePredictor | None = None

    def keep(self, row: BenchRow) -> None:
        """Record a measured row and write the results at once: a run cut short keeps it."""
        self.report.add_rows([row])
        print(format_row(row, self.profile), flush=True)
        self.report.write(self.out)


def step_checkpoint(ctx: Context) -> Outcome:
    started = time.monotonic()
    ctx.ckpt = checkpoint(ctx.profile, ctx.work)
    size = sum(p.stat().st_size for p in ctx.ckpt.rglob("*") if p.is_file())
    return Outcome("ok", f"{ctx.profile.arch}, seed 0, {size / 2**20:.1f} MiB, {time.monotonic() - started:.0f} s")


def step_throughput(ctx: Context) -> Outcome:
    """Eager, CUDA graphs and channels_last in this process; the eager model stays loaded for later steps."""
    assert ctx.ckpt is not None
    profile, report = ctx.profile, ctx.report
    ctx.model = load_torch(ctx.ckpt, profile)
    runtime = ctx.model.runtime
    assert isinstance(runtime, TorchRuntime)
    for res in profile.sizes:
        report.flops_per_img[res] = count_flops(runtime.core, res)
    deadline = time.monotonic() + ctx.budget.share(profile.caps["throughput"])
    reference: dict[tuple[int, int], torch.Tensor] = {}
    bench_variant("eager", runtime, profile, deadline, reference, ctx.keep)
    torch.save(reference, ctx.work / "eager-outputs.pt")  # the child processes compare against these
    if runtime.device.type == "cuda":
        bench_variant("cuda-graphs", runtime, profile, deadline, reference, ctx.keep)
    else:
        res, batch = profile.sizes[0], profile.batches[0]
        x, noise = inputs(res, batch), runtime.make_noise(list(range(batch)), (res // 8, res // 8))
        found = capture_hazards(lambda: runtime.run(x, noise))
        why = "needs CUDA; capture hazards in one call on the CPU: " + (", ".join(found) or "none")
        report.add_rows([BenchRow("cuda-graphs", r, b, "skipped", note=why) for r, b in configs(profile)])
    runtime.core.to(memory_format=torch.channels_last)
    try:
        bench_variant("channels-last", runtime, profile, deadline, reference, ctx.keep, channels_last=True)
    finally:
        runtime.core.to(memory_format=torch.contiguous_format)
    return rows_outcome([r for r in report.bench if r.variant in ("eager", "cuda-graphs", "channels-last")])


def step_precision(ctx: Context) -> Outcome:
    """fp16 maps against fp32 maps (TF32 off: a true fp32 reference) on the same inputs and noise."""
    assert ctx.ckpt is not None and ctx.model is not None
    profile = ctx.profile
    fp32 = load_torch(ctx.ckpt, profile, dtype="fp32")
    fp16 = ctx.model if profile.dtype == "fp16" else load_torch(ctx.ckpt, profile, dtype="fp16")
    res, batch = profile.precision_res, profile.precision_batch
    x, noise_hw = inputs(res, batch), (res // 8, res // 8)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        want = fp32.runtime.run(x, fp32.runtime.make_noise(list(range(batch)), noise_hw)).float().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    got = fp16.runtime.run(x, fp16.runtime.make_noise(list(range(batch)), noise_hw)).float().cpu()
    diff = got - want
    row = PrecisionRow(
        res, batch, max_abs=float(diff.abs().max()), mean_abs=float(diff.abs().mean()),
        rel_l2=float(diff.norm() / want.norm()), non_finite=int((~torch.isfinite(got)).sum()),
        note="maps in [0, 1]; the fp16 export tolerance is 3e-2; one 16-bit PNG step is 1.5e-5",
    )  # fmt: skip
    ctx.report.precision.append(row)
    status = "ok" if row.non_finite == 0 and row.max_abs <= 3e-2 else "failed"
    return Outcome(status, f"max {row.max_abs:.2e}, mean {row.mean_abs:.2e}, relative {row.rel_l2:.2e}")


def step_served(ctx: Context) -> Outcome:
    """`dense-serve serve` on loopback against the direct in-process batch-8 loop (bench_sizes' helpers)."""
    assert ctx.ckpt is not None and ctx.model is not None
    profile, report = ctx.profile, ctx.report
    spec = ctx.work / "served.toml"
    spec.write_text(
        f'id = "{profile.arch}-random"\nsource = "{ctx.ckpt}"\nfamily = "{FAMILY}"\ntask = "{TASK}"\n'
        f'device = "{profile.device}"\ndtype = "{profile.dtype}"\nprocessing_res = {profile.served_res}\n'
    )
    image = encoded(photo(*SIZES["1920x1080"], seed=3), "jpeg")
    deadline = time.monotonic() + ctx.budget.share(profile.caps["served"])
    res = profile.served_res
    runs = [(fmt, c, n) for fmt in ("png", "npy") for c, n in ((1, profile.c1_requests), (16, profile.cn_requests))]
    with serving(REPO, str(spec), ready_timeout_s=max(30.0, deadline - time.monotonic())) as base:
        for fmt, c, n in runs:
            if time.monotonic() > deadline:
                break
            samples: list[Sample] = []
            tput, batches = asyncio.run(cn(base, res, image, "jpeg", fmt, n, c, samples))
            report.served.append(
                ServedRow(
                    fmt, c, n, tput, statistics.median(s.latency_ms for s in samples),
                    statistics.median(s.timings.get("compute", float("nan")) for s in samples),
                    ", ".join(f"{k}: {v}" for k, v in sorted(batches.items())),
                )
            )  # fmt: skip
            print(f"served {fmt} c={c}: {tput:.1f} img/s", flush=True)
            report.write(ctx.out)
    for row in report.served:  # the same batching as the server forms: 1 at c=1, max_batch_size 8 under load
        if time.monotonic() > deadline:
            break
        batch = 1 if row.concurrency == 1 else 8
        row.direct_batch = batch
        row.direct_img_per_s = direct_loop(ctx.model, res, image, row.answer, max(8 * batch, row.requests // 2), batch)
        report.write(ctx.out)
    complete = len(report.served) == len(runs) and all(r.direct_img_per_s for r in report.served)
    return Outcome("ok" if complete else "partial", f"{len(report.served)} of {len(runs)} runs, processing_res {res}")


# ---------------------------------------------------------------------- child processes: compile, exports


def exported_available(name: str, profile: Profile) -> str | None:
    """None when the runtime can run here on the profile's device, else why not."""
    if name == "onnxruntime":
        try:
            import onnxruntime
        except ImportError:
            return NOT_ON_IMAGE
        if profile.device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "onnxruntime has no CUDA provider: " + NOT_ON_IMAGE
        return None
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return NOT_ON_IMAGE
    return None if profile.device == "cuda" else "TensorRT needs a GPU"


def step_child(ctx: Context, variant: str, cap: float) -> Outcome:
    """Run one variant in a child process, killed (with everything it started) at its share of the time.

    The child appends one JSON row per configuration as it finishes; what it did not reach is reported as such.
    """
    assert ctx.ckpt is not None
    profile = ctx.profile
    share = ctx.budget.share(cap)
    rows_file = ctx.work / f"rows-{variant}.jsonl"
    rows_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "load_tests.gpu_check", "--child", variant, "--ckpt", str(ctx.ckpt)]
    cmd += ["--rows", str(rows_file), "--work", str(ctx.work), "--deadline-s", str(share)]
    cmd += ["--cpu-smoke"] if profile.name == SMOKE.name else []
    cmd += ["--sizes", ",".join(map(str, profile.sizes)), "--batches", ",".join(map(str, profile.batches))]
    log = ctx.work / f"child-{variant}.log"
    started = time.monotonic()
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=share)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: inductor's compile workers go too
            proc.wait()
            killed = True
    seconds = time.monotonic() - started
    lines = rows_file.read_text().splitlines() if rows_file.is_file() else []
    done = [BenchRow(**json.loads(line)) for line in lines]
    if killed:
        status, why = "not reached", f"the child was stopped at its {share:.0f} s share"
    elif proc.returncode:
        status, why = "failed", "the child failed: " + last_line(log)
    else:
        status, why = "not reached", "the child ended before it"
    seen = {(r.res, r.batch) for r in done}
    missing = [BenchRow(variant, r, b, status, note=why) for r, b in configs(profile) if (r, b) not in seen]
    for row in done + missing:
        ctx.keep(row)
    return rows_outcome(done + missing, f" in {seconds:.0f} s" + (f" ({why})" if missing else ""))


def last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no output)"


def child_main(args: argparse.Namespace) -> int:
    """The child side of `step_child`: build the variant's runtime, then time every configuration."""
    profile = profile_from(args)
    if profile.device == "cpu" and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    deadline = time.monotonic() + args.deadline_s
    ckpt, rows_file, work = Path(args.ckpt), Path(args.rows), Path(args.work)
    reference_file = work / "eager-outputs.pt"
    reference = torch.load(reference_file) if reference_file.is_file() else {}
    started = time.monotonic()
    runtime: Runtime
    if args.child == "compile":
        core = load_torch(ckpt, profile).runtime.core  # type: ignore[attr-defined]
        runtime = TorchRuntime(core, compile=True, compile_backend=profile.compile_backend)
        note = f"backend {profile.compile_backend}, dynamic shapes"
    else:
        runtime = exported_runtime(args.child, ckpt, profile, work)
        note = f"{runtime.describe().dtype}, export and load {time.monotonic() - started:.0f} s"

    def keep(row: BenchRow) -> None:
        row = replace(row, note=f"{row.note}; {note}" if row.note else note)
        with rows_file.open("a") as f:
            f.write(json.dumps(asdict(row)) + "\n")

    bench_variant(args.child, runtime, profile, deadline, reference, keep)
    return 0


def exported_runtime(name: str, ckpt: Path, profile: Profile, work: Path) -> Runtime:
    """Export the checkpoint for `name` (ONNX, or TensorRT engines) at the profile's sizes and load it."""
    from models.export.exporter import export_model
    from models.loading import load_model
    from models.spec import ModelSpec

    fmt = "tensorrt" if name == "tensorrt" else "onnx"
    dtype = "fp16" if profile.device == "cuda" else "fp32"
    spec = ModelSpec(id=f"{profile.arch}-random", source=str(ckpt), family=FAMILY, task=TASK, device=profile.device)
    folder = work / f"export-{fmt}-{dtype}"
    if not (folder / "manifest.json").is_file():
        export_model(
            spec, fmt, folder, dtype=dtype, max_batch=max(profile.batches), resolutions=list(profile.sizes),
            device=profile.device,
        )  # fmt: skip
    return load_model(ModelSpec(id=spec.id, source=str(folder), device=profile.device), backend=name).runtime


# --------------------------------------------------------------------------------------------- the table


def flop_text(flops: float) -> str:
    return f"{flops / 1e12:.2f} TFLOP" if flops >= 1e11 else f"{flops / 1e9:.2f} GFLOP"


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def variant_label(row: BenchRow, profile: Profile) -> str:
    label = VARIANT_LABELS[row.variant]
    return f"{label} {profile.dtype}" if row.variant in ("eager", "cuda-graphs", "channels-last", "compile") else label


def format_row(row: BenchRow, profile: Profile) -> str:
    return (
        f"| {variant_label(row, profile)} | {row.res} | {row.batch} | {row.status} | {_f(row.ms_per_img, '.2f')} | "
        f"{_f(row.img_per_s, '.1f')} | {_f(row.flop_fraction and row.flop_fraction * 100, '.1f')} | "
        f"{_f(row.peak_mem_gib, '.2f')} | {_f(row.first_call_s, '.2f')} | {_f(row.max_err_vs_eager, '.1e')} | "
        f"{row.note} |"
    )


def render(report: Report) -> str:
    profile = GPU if report.mode == GPU.name else SMOKE
    env = report.env
    lines = [
        f"### GPU check ({report.mode}): {env.get('gpu', '?')}, {report.started}",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in env.items()),
        "",
        "| step | status | seconds | note |",
        "|---|---|---:|---|",
        *(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.note} |" for s in report.steps),
    ]
    if report.tests:
        lines += ["", "| GPU test | outcome | seconds | reason |", "|---|---|---:|---|"]
        lines += [f"| `{t.test}` | {t.outcome} | {t.seconds:.1f} | {t.message} |" for t in report.tests]
    if report.bench:
        counted = ", ".join(f"{r} px: {flop_text(f)}" for r, f in sorted(report.flops_per_img.items()))
        lines += [
            "",
            f"Throughput: {profile.arch} architecture, random weights, {FAMILY} {TASK}, square inputs. FLOPs per "
            f"image counted here: {counted} (docs/performance.md: {DOC_TFLOP_768} TFLOP at 768 px for SD2); "
            f"fraction = img/s x FLOPs / the measured matmul peak ({_f(report.peak_tflops, '.3g')} TFLOP/s).",
            "",
            "| runtime | res | batch | status | ms/img | img/s | % of FLOP limit | peak memory (GiB) | first call (s) "
            "| max abs diff vs eager | note |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
            *(format_row(r, profile) for r in report.bench),
        ]
    if report.precision:
        lines += [
            "",
            "| fp16 vs fp32 | batch | max abs | mean abs | relative L2 | non-finite | note |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {p.res} px | {p.batch} | {p.max_abs:.2e} | {p.mean_abs:.2e} | {p.rel_l2:.2e} | {p.non_finite} "
            f"| {p.note} |"
            for p in report.precision
        ]
    if report.served:
        lines += [
            "",
            f"Served: `dense-serve serve` (in-process queue, default settings), 1920x1080 JPEG requests at "
            f"processing_res {profile.served_res}; direct = an in-process loop over the decoded image with the same "
            "answer encoding, in batches of 1 (against c=1) and of 8, the server's max_batch_size (against c=16).",
            "",
            "| answer | concurrency | requests | img/s | p50 latency (ms) | compute per request (ms) | batch sizes "
            "| direct batch | direct (img/s) | served / direct |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        ]
        lines += [
            f"| {s.answer} | {s.concurrency} | {s.requests} | {s.img_per_s:.1f} | {s.p50_ms:.1f} | {s.compute_ms:.1f} "
            f"| {s.batches} | {s.direct_batch or '-'} | {_f(s.direct_img_per_s, '.1f')} | {_f(s.ratio, '.2f')} |"
            for s in report.served
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- driver


def run_step(ctx: Context, name: str, fn: Callable[[], Outcome]) -> bool:
    """Run one step, record its status, time and note, and write the results; a failure never stops the run."""
    step = ctx.report.step(name)
    step.status = "running"
    ctx.report.write(ctx.out)
    started = time.monotonic()
    try:
        outcome = fn()
    except Exception as exc:  # report it and go on: one broken step must not hide the others
        traceback.print_exc()
        outcome = Outcome("failed", f"{type(exc).__name__}: {str(exc)[:300]}")
    step.status, step.note, step.seconds = outcome.status, outcome.note, time.monotonic() - started
    print(f"== {name}: {step.status} ({step.seconds:.0f} s) {step.note}", flush=True)
    ctx.report.write(ctx.out)
    return outcome.status != "failed"


def skip_step(ctx: Context, name: str, why: str, rows_of: str | None = None) -> None:
    if rows_of:
        ctx.report.add_rows([BenchRow(rows_of, r, b, "skipped", note=why) for r, b in configs(ctx.profile)])
    step = ctx.report.step(name)
    step.status, step.note = "skipped", why
    ctx.report.write(ctx.out)


def profile_from(args: argparse.Namespace) -> Profile:
    profile = SMOKE if args.cpu_smoke else GPU
    if args.sizes:
        profile = replace(profile, sizes=tuple(int(s) for s in args.sizes.split(",")))
    if args.batches:
        profile = replace(profile, batches=tuple(int(b) for b in args.batches.split(",")))
    if args.budget_s:
        profile = replace(profile, budget_s=args.budget_s)
    if args.cap:
        caps = dict(profile.caps)
        for item in args.cap:
            key, _, value = item.partition("=")
            caps[key] = float(value)
        profile = replace(profile, caps=caps)
    return profile


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="where gpu-check.json and gpu-table.md go ($OUT on the device)")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same steps on the CPU, tiny model, one size")
    ap.add_argument("--work", type=Path, help="checkpoints, exports, logs (default: a temporary folder)")
    ap.add_argument("--budget-s", type=float, help="the whole run's seconds (gpu 450, cpu-smoke 220)")
    ap.add_argument("--sizes", help="comma-separated square sizes (gpu 512,768; cpu-smoke 64)")
    ap.add_argument("--batches", help="comma-separated batch sizes (gpu 1,4,8,16; cpu-smoke 1,4)")
    ap.add_argument("--cap", action="append", help="STEP=SECONDS: the most a bounded step may take")
    ap.add_argument("--skip", default="", help=f"comma-separated steps to leave out: {', '.join(STEPS)}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-s", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.out is None:
        ap.error("--out is required")
    profile = profile_from(args)
    if profile.device == "cpu":
        # One thread per process (this one, the server, the children inherit it): the smoke shares its cores with
        # CI's other test worker, and OpenMP threads that spin while a sibling is descheduled stall each other.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STEPS):
        ap.error(f"unknown steps in --skip: {', '.join(sorted(skip - set(STEPS)))}")
    report = Report(profile.name, datetime.datetime.now().isoformat(timespec="seconds"), profile.budget_s)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(profile, report, Budget(profile.budget_s), args.out, work)
        run_all(ctx, skip)
    return finish(report, args.out)


STEPS = ("environment", "cuda-tests", "checkpoint", "throughput", "fp16-vs-fp32", "served", "compile")
STEPS += ("onnxruntime", "tensorrt")


def run_all(ctx: Context, skip: set[str]) -> None:
    """The steps in order; a step that needs an earlier one's result is skipped, with why, when it failed."""
    steps: list[tuple[str, Callable[[], Outcome], str | None]] = [
        ("environment", lambda: step_environment(ctx.profile, ctx.report), None),
        ("cuda-tests", lambda: step_cuda_tests(ctx.profile, ctx.report, ctx.budget, ctx.work), None),
        ("checkpoint", lambda: step_checkpoint(ctx), None),
        ("throughput", lambda: step_throughput(ctx), "checkpoint"),
        ("fp16-vs-fp32", lambda: step_precision(ctx), "throughput"),
        ("served", lambda: step_served(ctx), "throughput"),
        ("compile", lambda: step_child(ctx, "compile", ctx.profile.caps["compile"]), "checkpoint"),
    ]
    for name in ("onnxruntime", "tensorrt"):
        steps.append((name, lambda n=name: step_child(ctx, n, ctx.profile.caps["exported"]), "checkpoint"))
    failed: set[str] = set()
    for name, fn, needs in steps:
        variant = name if name in VARIANT_LABELS else None
        if name in skip:
            skip_step(ctx, name, "left out (--skip)", variant)
        elif needs and (needs in failed or needs in skip):
            skip_step(ctx, name, f"needs the {needs} step", variant)
            failed.add(name)
        elif variant in ("onnxruntime", "tensorrt") and (why := exported_available(name, ctx.profile)):
            skip_step(ctx, name, why, variant)
        elif not run_step(ctx, name, fn):
            failed.add(name)
        if name == "served" and ctx.model is not None:  # the children need the device to themselves
            ctx.model = None
            gc.collect()
            if ctx.profile.device == "cuda":
                torch.cuda.empty_cache()


def finish(report: Report, out: Path) -> int:
    report.write(out)
    print(render(report), flush=True)
    failed = [s.name for s in report.steps if s.status == "failed"]
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
