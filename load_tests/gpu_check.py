"""GPU check: verify and measure the GPU path in one command that fits a 15-minute device lease.

    python3 -m load_tests.gpu_check --out DIR            (on the lent GPU: DIR = $OUT; at most 500 s)
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

The command is a watchdog over a second process that runs the steps. There, a step that raises anything
(SystemExit too) is `failed` with its reason and the next step runs, and a step whose estimated cost does not fit
what is left of the budget is `skipped` with both figures. At `--budget-s` (500 s on the GPU, sized to the lease)
the watchdog stops the steps' process and every process under it, marks the step it was in `timed_out` and the
steps it never reached `skipped`, and writes the report. The logs of the processes the steps start (pytest, the
server, the compile and export children) and the steps' own output go to DIR/logs/, named in the report.
The watchdog never imports torch (only the steps' process and the children do), so it starts at once.
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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from load_tests.bench_sizes import SIZES, Sample, cn, direct_loop, encoded, photo, serving  # noqa: E402

if TYPE_CHECKING:  # torch is imported where it is used: the watchdog process never needs it
    import torch

    from models.inference import DensePredictor
    from models.runtime import Runtime

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
#: The steps' own output (this script's prints and tracebacks), beside the logs of the processes they start.
STEPS_LOG = "gpu-check.log"
#: The most of one log copied into the output folder (its head and tail beyond that): the device tool brings back
#: at most 8 files of 16 MiB each, and a full run leaves the report, the table and 6 logs.
LOG_CAP = 4 * 2**20


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
    #: The seconds each step needs to give a result (its first compile, export or server start included): a step
    #: is skipped, with both figures, when less than this is left of the budget. Guesses on the GPU until a lease
    #: has run; the steps table shows each step's seconds beside its estimate.
    estimates: dict[str, float]
    #: What the steps leave of `budget_s` for the watchdog's margin: shutdowns, kills and the last write.
    reserve_s: float
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
    # The lease: 15 minutes of device time with the machine's start (1-2 minutes); the documented command has
    # timeout_s 560 with about 20 s of install before this script, so its watchdog fires at 500 s and the steps
    # plan for 470 s.
    budget_s=500.0,
    caps={"cuda-tests": 100.0, "throughput": 110.0, "served": 100.0, "compile": 150.0, "exported": 150.0},
    estimates={
        "environment": 20.0,
        "cuda-tests": 30.0,
        "checkpoint": 20.0,
        "throughput": 40.0,
        "fp16-vs-fp32": 15.0,
        "served": 40.0,
        "compile": 60.0,
        "onnxruntime": 60.0,
        "tensorrt": 120.0,
    },
    reserve_s=30.0,
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
    estimates={
        "environment": 2.0,
        "cuda-tests": 8.0,
        "checkpoint": 1.0,
        "throughput": 2.0,
        "fp16-vs-fp32": 1.0,
        "served": 8.0,
        "compile": 10.0,
        "onnxruntime": 8.0,
        "tensorrt": 8.0,
    },
    reserve_s=15.0,
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
DTYPE_NAMES = {"fp16": "float16", "fp32": "float32"}


# ----------------------------------------------------------------------------------------------- results


@dataclass
class Step:
    name: str
    status: str = "pending"  # pending | running | ok | partial | skipped | failed | timed_out
    seconds: float = 0.0
    note: str = ""
    #: The profile's estimate of what the step needs: it is skipped when less is left of the budget.
    estimate_s: float = 0.0
    #: Seconds after the run's start when the step began (the watchdog times a step it stops from it).
    began_s: float | None = None
    #: The logs of the processes it started, relative to the output folder.
    logs: list[str] = field(default_factory=list)


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
    #: The steps' own output, relative to the output folder.
    log: str = ""
    #: What the watchdog did, when it did anything: stopped the run (at the budget, on a signal, or after the
    #: steps' process died) or killed processes the steps left running.
    watchdog: str = ""

    @classmethod
    def read(cls, out: Path) -> Report | None:
        """The report as `write` last left it in `out` (the watchdog completes it), or None when there is none."""
        try:
            data = json.loads((out / "gpu-check.json").read_text())
        except (OSError, ValueError):
            return None
        known = {f.name for f in fields(cls)}
        report = cls(**{k: v for k, v in data.items() if k in known})
        report.flops_per_img = {int(k): v for k, v in data.get("flops_per_img", {}).items()}
        report.steps = [Step(**s) for s in data.get("steps", [])]
        report.tests = [GpuTestOutcome(**t) for t in data.get("tests", [])]
        report.bench = [BenchRow(**r) for r in data.get("bench", [])]
        report.precision = [PrecisionRow(**p) for p in data.get("precision", [])]
        served = [{k: v for k, v in s.items() if k != "ratio_to_direct"} for s in data.get("served", [])]
        report.served = [ServedRow(**s) for s in served]
        return report

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
    """The steps' deadline, and each bounded step's share of what is left.

    `end` is a `time.monotonic()` reading taken in the watchdog's process: on Linux that clock is the machine's,
    the same in every process, so the steps' process keeps the watchdog's deadline, its own start-up included.
    """

    def __init__(self, seconds: float, end: float | None = None) -> None:
        self.end = time.monotonic() + seconds if end is None else end

    def left(self) -> float:
        return self.end - time.monotonic()

    def share(self, cap: float) -> float:
        """Seconds a step may use: its cap, or less when the whole budget is running out."""
        return max(0.0, min(cap, self.left()))


# ------------------------------------------------------------------------------------------ measurement


def sync(device: torch.device) -> None:
    import torch

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
    import torch

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
    import torch

    gen = torch.Generator("cpu").manual_seed(res * 1000 + batch)
    return torch.rand((batch, 3, res, res), generator=gen) * 2 - 1


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """TFLOP/s of an n^3 matmul on random data: the ceiling the FLOP fractions are taken against."""
    import torch

    a = torch.randn((n, n), device=device, dtype=dtype)
    b = torch.randn((n, n), device=device, dtype=dtype)
    timing, _ = measure(lambda: a @ b, device, warmup=3, target_s=0.5, deadline=time.monotonic() + 10)
    return 2 * n**3 / timing.median_s / 1e12


def count_flops(core: torch.nn.Module, res: int) -> float:
    """FLOPs of one image through encoder, UNet and decoder (torch's counter: what docs/performance.md used)."""
    import torch
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
    import torch
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
    import torch

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
    import torch

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
    report.peak_tflops = matmul_peak(device, profile.matmul_n, getattr(torch, DTYPE_NAMES[profile.matmul_dtype]))
    peak = f"{report.peak_tflops:.3g}"
    env["matmul peak measured (TFLOP/s)"] = f"{peak} ({profile.matmul_dtype} {profile.matmul_n}^3, random data)"
    return Outcome("ok", f"{env['gpu']}; matmul peak {peak} TFLOP/s")


def step_cuda_tests(ctx: Context) -> Outcome:
    """The suite's GPU tests, run here with pytest; outcomes from its JUnit XML, its output in logs/cuda-tests.log."""
    profile, report = ctx.profile, ctx.report
    junit = ctx.work / "pytest-gpu.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    cmd += ["--junitxml", str(junit), *GPU_TEST_FILES]
    timeout = ctx.budget.share(profile.caps["cuda-tests"])
    log = ctx.log("cuda-tests")
    code = run_logged(cmd, log, timeout)
    report.tests = parse_junit(junit) if junit.is_file() else []
    counts = {o: sum(t.outcome == o for t in report.tests) for o in ("passed", "failed", "error", "skipped")}
    summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n) or "no tests ran"
    if code is None:
        return Outcome("partial", f"stopped at its {timeout:.0f} s share; {summary}")
    if counts["failed"] or counts["error"] or not report.tests:
        return Outcome("failed", f"{summary}; pytest exited with {code}: {last_line(log)}")
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
    import torch

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


REFERENCE_FILE = "eager-outputs.safetensors"  # in the work folder: the eager outputs the children compare with


def save_reference(reference: dict[tuple[int, int], torch.Tensor], path: Path) -> None:
    """The eager outputs as safetensors (no pickle), one tensor per configuration named `RESxBATCH`."""
    from safetensors.torch import save_file

    save_file({f"{res}x{batch}": out.contiguous() for (res, batch), out in reference.items()}, str(path))


def load_reference(path: Path) -> dict[tuple[int, int], torch.Tensor]:
    """What `save_reference` wrote (an empty dict where the eager step left no file)."""
    from safetensors.torch import load_file

    if not path.is_file():
        return {}
    reference: dict[tuple[int, int], torch.Tensor] = {}
    for name, out in load_file(str(path)).items():
        res, batch = name.split("x")
        reference[(int(res), int(batch))] = out
    return reference


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
    #: The watchdog's `time.monotonic()` at the run's start (steps record when they began against it).
    t0: float = field(default_factory=time.monotonic)
    ckpt: Path | None = None
    model: DensePredictor | None = None
    #: The step running now: the one a log is named for.
    current: str = ""

    def log(self, name: str) -> Path:
        """The log file for a process the current step starts (work/logs/NAME.log). It is named in the report at
        once, so a run the watchdog stops still says whose log is whose, and copied to the output folder after the
        step (and by the watchdog)."""
        path = self.work / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        step = self.report.step(self.current)
        if f"logs/{path.name}" not in step.logs:
            step.logs.append(f"logs/{path.name}")
            self.report.write(self.out)
        return path

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
    import torch

    from models.runtime import TorchRuntime

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
    save_reference(reference, ctx.work / REFERENCE_FILE)  # the child processes compare against these
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
    import torch

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
    ready_s = max(30.0, deadline - time.monotonic())
    with serving(REPO, str(spec), ready_timeout_s=ready_s, log=ctx.log("served")) as base:
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
    rows_file = rows_path(ctx.work, variant)
    rows_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "load_tests.gpu_check", "--child", variant, "--ckpt", str(ctx.ckpt)]
    cmd += ["--rows", str(rows_file), "--work", str(ctx.work), "--deadline-s", str(share)]
    cmd += ["--cpu-smoke"] if profile.name == SMOKE.name else []
    cmd += ["--sizes", ",".join(map(str, profile.sizes)), "--batches", ",".join(map(str, profile.batches))]
    log = ctx.log(variant)
    started = time.monotonic()
    code = run_logged(cmd, log, share)  # its own session: inductor's compile workers go with it
    seconds = time.monotonic() - started
    if code is None:
        status, why = "not reached", f"the child was stopped at its {share:.0f} s share"
    elif code:
        status, why = "failed", "the child failed: " + last_line(log)
    else:
        status, why = "not reached", "the child ended before it"
    done, missing = child_rows(profile, variant, rows_file, status, why)
    for row in done + missing:
        ctx.keep(row)
    return rows_outcome(done + missing, f" in {seconds:.0f} s" + (f" ({why})" if missing else ""))


def rows_path(work: Path, variant: str) -> Path:
    return work / f"rows-{variant}.jsonl"


def child_rows(
    profile: Profile, variant: str, rows_file: Path, status: str, why: str
) -> tuple[list[BenchRow], list[BenchRow]]:
    """The rows a child wrote, and a row with `status` and `why` for each configuration it did not write."""
    done = []
    for line in rows_file.read_text().splitlines() if rows_file.is_file() else []:
        with contextlib.suppress(ValueError, TypeError):  # a line cut off by a kill is a configuration not reached
            done.append(BenchRow(**json.loads(line)))
    seen = {(r.res, r.batch) for r in done}
    return done, [BenchRow(variant, r, b, status, note=why) for r, b in configs(profile) if (r, b) not in seen]


def last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    return lines[-1][:200] if lines else "(no output)"


# ------------------------------------------------------------------------------------ processes and logs


def run_logged(cmd: list[str], log: Path, timeout: float | None) -> int | None:
    """Run `cmd` in a session of its own with its output in `log`: its exit status, or None when it ran past
    `timeout`. Whatever it started and left behind is killed with it (its whole process group), also when this
    process is interrupted while it waits."""
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def copy_logs(work: Path, out: Path) -> list[str]:
    """Copy every log in work/logs into out/logs (the head and tail of one over LOG_CAP); their names there."""
    src, dest = work / "logs", out / "logs"
    copied = []
    for log in sorted(src.glob("*.log")) if src.is_dir() else []:
        dest.mkdir(parents=True, exist_ok=True)
        size = log.stat().st_size
        if size <= LOG_CAP:
            shutil.copyfile(log, dest / log.name)
        else:
            with log.open("rb") as f:
                head = f.read(LOG_CAP // 4)
                f.seek(size - LOG_CAP // 2)
                tail = f.read(LOG_CAP // 2)
            cut = f"\n[... {size - len(head) - len(tail)} bytes left out: the whole log is {size} bytes ...]\n"
            (dest / log.name).write_bytes(head + cut.encode() + tail)
        copied.append(f"logs/{log.name}")
    return copied


def child_main(args: argparse.Namespace) -> int:
    """The child side of `step_child`: build the variant's runtime, then time every configuration."""
    import torch

    from models.runtime import TorchRuntime

    profile = profile_from(args)
    if profile.device == "cpu" and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    deadline = time.monotonic() + args.deadline_s
    ckpt, rows_file, work = Path(args.ckpt), Path(args.rows), Path(args.work)
    reference = load_reference(work / REFERENCE_FILE)
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
        *([f"**Watchdog**: {report.watchdog}", ""] if report.watchdog else []),
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in env.items()),
        "",
        f"Budget {report.budget_s:.0f} s; the steps' own output: {report.log or '-'}.",
        "",
        "| step | status | seconds | estimate (s) | note | logs |",
        "|---|---|---:|---:|---|---|",
        *(
            f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.estimate_s:.0f} | {s.note} | {', '.join(s.logs) or '-'} |"
            for s in report.steps
        ),
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
    """Run one step, record its status, time and note, copy its logs and write the results.

    Whatever the step raises is its failure, with the exception as the note, and the run goes on: SystemExit too
    (library code that calls sys.exit must not end the check). A KeyboardInterrupt is recorded the same way and
    then raised again, so Ctrl-C still stops a run of the steps by hand.
    """
    step = ctx.report.step(name)
    step.status, step.began_s, ctx.current = "running", time.monotonic() - ctx.t0, name
    ctx.report.write(ctx.out)
    started = time.monotonic()
    interrupted: KeyboardInterrupt | None = None
    try:
        outcome = fn()
    except KeyboardInterrupt as exc:
        outcome, interrupted = Outcome("failed", "interrupted (KeyboardInterrupt)"), exc
    except BaseException as exc:  # one broken step must not hide the others, whatever it raised
        traceback.print_exc()
        outcome = Outcome("failed", f"{type(exc).__name__}: {str(exc)[:300]}")
    step.status, step.note, step.seconds = outcome.status, outcome.note, time.monotonic() - started
    with contextlib.suppress(OSError):
        copy_logs(ctx.work, ctx.out)
    print(f"== {name}: {step.status} ({step.seconds:.0f} s) {step.note}", flush=True)
    ctx.report.write(ctx.out)
    if interrupted is not None:
        raise interrupted
    return outcome.status != "failed"


def skip_step(ctx: Context, name: str, why: str, rows_of: str | None = None) -> None:
    if rows_of:
        ctx.report.add_rows([BenchRow(rows_of, r, b, "skipped", note=why) for r, b in configs(ctx.profile)])
    step = ctx.report.step(name)
    step.status, step.note = "skipped", why
    ctx.report.write(ctx.out)


def _per_step(items: list[str] | None, defaults: dict[str, float]) -> dict[str, float]:
    """STEP=SECONDS options over a profile's table."""
    table = dict(defaults)
    for item in items or []:
        key, _, value = item.partition("=")
        table[key] = float(value)
    return table


def profile_from(args: argparse.Namespace) -> Profile:
    profile = SMOKE if args.cpu_smoke else GPU
    if args.sizes:
        profile = replace(profile, sizes=tuple(int(s) for s in args.sizes.split(",")))
    if args.batches:
        profile = replace(profile, batches=tuple(int(b) for b in args.batches.split(",")))
    if args.budget_s:
        profile = replace(profile, budget_s=args.budget_s)
    return replace(
        profile,
        caps=_per_step(getattr(args, "cap", None), profile.caps),
        estimates=_per_step(getattr(args, "estimate", None), profile.estimates),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="where gpu-check.json, gpu-table.md and logs/ go ($OUT on the device)")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same steps on the CPU, tiny model, one size")
    ap.add_argument("--work", type=Path, help="checkpoints, exports, logs (default: a temporary folder)")
    ap.add_argument(
        "--budget-s", type=float,
        help="the watchdog: at this many seconds the report is written with what finished, the step still running "
        "is marked timed_out and every process is stopped (gpu 500, cpu-smoke 220)",
    )  # fmt: skip
    ap.add_argument("--sizes", help="comma-separated square sizes (gpu 512,768; cpu-smoke 64)")
    ap.add_argument("--batches", help="comma-separated batch sizes (gpu 1,4,8,16; cpu-smoke 1,4)")
    ap.add_argument("--cap", action="append", help="STEP=SECONDS: the most a bounded step may take")
    ap.add_argument("--estimate", action="append", help="STEP=SECONDS: what a step needs; skipped if less is left")
    ap.add_argument("--skip", default="", help=f"comma-separated steps to leave out: {', '.join(STEPS)}")
    ap.add_argument("--drill", help=argparse.SUPPRESS)  # tests: steps that exercise the run machinery (DRILLS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-s", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--run-steps", action="store_true", help=argparse.SUPPRESS)  # the steps' process
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--steps-end", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--started", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.out is None:
        ap.error("--out is required")
    names = [s for s in (args.drill or "").split(",") if s] or list(STEPS)
    if unknown := set(names) - (set(DRILLS) if args.drill else set(STEPS)):
        ap.error(f"unknown steps in --drill: {', '.join(sorted(unknown))}")
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(names):
        ap.error(f"unknown steps in --skip: {', '.join(sorted(skip - set(names)))}")
    if args.run_steps:
        return steps_main(args, skip)
    return watch(args, argv)


STEPS = ("environment", "cuda-tests", "checkpoint", "throughput", "fp16-vs-fp32", "served", "compile")
STEPS += ("onnxruntime", "tensorrt")
#: Steps for the tests of the run machinery itself (`--drill NAME,...`): small and real, each doing what a step of
#: the check can do: raise SystemExit, run a child with a log, hang in a child (that started a process in a session
#: of its own) until the watchdog, end the steps' process at once as a crash in a native library would, or finish.
DRILLS = ("system-exit", "child-log", "hang", "crash", "ok")
HANG = (
    "import os, subprocess, sys, time\n"
    "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'], start_new_session=True)\n"
    "print('pids', os.getpid(), grandchild.pid, flush=True)\n"
    "time.sleep(3600)\n"
)
StepList = list[tuple[str, Callable[[], Outcome], str | None]]


def plan(ctx: Context) -> StepList:
    """The check's steps in order, each with the step whose result it needs."""
    steps: StepList = [
        ("environment", lambda: step_environment(ctx.profile, ctx.report), None),
        ("cuda-tests", lambda: step_cuda_tests(ctx), None),
        ("checkpoint", lambda: step_checkpoint(ctx), None),
        ("throughput", lambda: step_throughput(ctx), "checkpoint"),
        ("fp16-vs-fp32", lambda: step_precision(ctx), "throughput"),
        ("served", lambda: step_served(ctx), "throughput"),
        ("compile", lambda: step_child(ctx, "compile", ctx.profile.caps["compile"]), "checkpoint"),
    ]
    for name in ("onnxruntime", "tensorrt"):
        steps.append((name, lambda n=name: step_child(ctx, n, ctx.profile.caps["exported"]), "checkpoint"))
    return steps


def drill(ctx: Context, names: list[str]) -> StepList:
    """The DRILLS steps named, in that order."""

    def system_exit() -> Outcome:
        sys.exit(3)  # what library code that calls sys.exit (bench_sizes.serving once did) does to its caller

    def child_log() -> Outcome:
        code = run_logged([sys.executable, "-c", "print('the child ran')"], ctx.log("child-log"), 60.0)
        return Outcome("ok" if code == 0 else "failed", f"the child exited with {code}")

    def hang() -> Outcome:
        run_logged([sys.executable, "-c", HANG], ctx.log("hang"), None)
        return Outcome("failed", "the child that hangs ended")

    def crash() -> Outcome:
        os.kill(os.getpid(), signal.SIGKILL)  # no exception, no finally: what a segfault in a runtime leaves
        return Outcome("failed", "the steps' process is still alive")

    steps: dict[str, Callable[[], Outcome]] = {
        "system-exit": system_exit, "child-log": child_log, "hang": hang, "crash": crash,
        "ok": lambda: Outcome("ok", "ran"),
    }  # fmt: skip
    return [(name, steps[name], None) for name in names]


def run_all(ctx: Context, skip: set[str], steps: StepList) -> None:
    """The steps in order. A step is skipped, with why, when it was left out, when a step whose result it needs
    failed or was skipped, when it cannot run on this machine, and when less is left of the budget than its
    estimate."""
    for name, _, _ in steps:  # every step listed from the start: a run stopped early shows what it never reached
        ctx.report.step(name).estimate_s = ctx.profile.estimates.get(name, 0.0)
    ctx.report.write(ctx.out)
    missing: set[str] = set()
    for name, fn, needs in steps:
        variant = name if name in VARIANT_LABELS else None
        estimate, left = ctx.profile.estimates.get(name, 0.0), ctx.budget.left()
        if name in skip:
            skip_step(ctx, name, "left out (--skip)", variant)
            missing.add(name)
        elif needs and needs in missing:
            skip_step(ctx, name, f"needs the {needs} step", variant)
            missing.add(name)
        elif variant in ("onnxruntime", "tensorrt") and (why := exported_available(name, ctx.profile)):
            skip_step(ctx, name, why, variant)
        elif left <= 0 or left < estimate:
            skip_step(ctx, name, f"needs about {estimate:.0f} s, {max(0.0, left):.0f} s of the budget left", variant)
            missing.add(name)
        elif not run_step(ctx, name, fn):
            missing.add(name)
        if name == "served" and ctx.model is not None:  # the children need the device to themselves
            import torch

            ctx.model = None
            gc.collect()
            if ctx.profile.device == "cuda":
                torch.cuda.empty_cache()


def finish(report: Report, out: Path) -> int:
    report.write(out)
    print(render(report), flush=True)
    failed = [s.name for s in report.steps if s.status in ("failed", "timed_out")]
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def steps_main(args: argparse.Namespace, skip: set[str]) -> int:
    """The steps' process, started by `watch`: every step in order, the report written as it goes."""
    profile = profile_from(args)
    if profile.device == "cpu" and not args.drill:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = args.started or datetime.datetime.now().isoformat(timespec="seconds")
    report = Report(profile.name, started, profile.budget_s, log=f"logs/{STEPS_LOG}")
    budget = Budget(profile.budget_s) if args.steps_end is None else Budget(0.0, end=args.steps_end)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ctx = Context(profile, report, budget, args.out, work, t0=args.t0 or time.monotonic())
    run_all(ctx, skip, drill(ctx, args.drill.split(",")) if args.drill else plan(ctx))
    return finish(report, args.out)


# --------------------------------------------------------------------------------------------- watchdog


class Stop(Exception):
    """A signal (SIGTERM) that asks the watchdog to stop the run now."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def watch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the steps in a process of their own, and stop it with every process under it at the budget (or on
    SIGTERM or Ctrl-C); then complete the report it left, copy the logs, and write the report once more.

    The steps plan for the budget less the profile's reserve, so a run that goes to plan ends before the
    watchdog; the watchdog is for the step that does not (a hung server, a compile that ignores its share).
    """
    profile = profile_from(args)
    t0 = time.monotonic()
    deadline = t0 + profile.budget_s
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / "gpu-check.json", out / "gpu-table.md", *(out / "logs").glob("*.log")):
        stale.unlink(missing_ok=True)  # a report or a log of an earlier run must not pass for this one's
    become_subreaper()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    with contextlib.ExitStack() as stack:
        work = (args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))).resolve()
        logs = work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for stale in logs.glob("*.log"):
            stale.unlink()
        steps_end = deadline - min(profile.reserve_s, profile.budget_s / 4)
        cmd = [sys.executable, "-m", "load_tests.gpu_check", *argv, "--run-steps", "--out", str(out)]
        cmd += ["--work", str(work), "--t0", repr(t0), "--steps-end", repr(steps_end), "--started", started]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if profile.device == "cpu":
            # One thread per process (the steps', the server, the children inherit it): the smoke shares its cores
            # with CI's other test worker, and OpenMP threads that spin while a sibling is descheduled stall each
            # other.
            env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        assert proc.stdout is not None
        tee = threading.Thread(target=_tee, args=(proc.stdout, logs / STEPS_LOG), daemon=True)
        tee.start()
        stopped, status = "", "failed"
        previous = signal.signal(signal.SIGTERM, _raise_stop)
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped, status = f"the run reached its {profile.budget_s:.0f} s budget", "timed_out"
        except KeyboardInterrupt:
            stopped = "the run was interrupted (Ctrl-C)"
        except Stop as exc:
            stopped = f"the run was stopped by {exc}"
        finally:
            signal.signal(signal.SIGTERM, previous)
        killed = kill_below(proc)
        proc.wait()
        reap()
        tee.join(timeout=10)
        report = Report.read(out) or Report(profile.name, started, profile.budget_s)
        unfinished = any(s.status in ("running", "pending") for s in report.steps) or not report.steps
        if unfinished and not stopped:
            stopped = f"the steps' process ended ({exit_text(proc.returncode)}) before its steps did"
        if not report.steps:
            report.steps = [Step("start", "failed", note=f"{stopped}: {last_line(logs / STEPS_LOG)}")]
        complete(report, profile, work, t0, stopped, status)
        done = [stopped] if stopped else []
        done += [f"killed {len(killed)} processes: {', '.join(killed)}"] if killed else []
        report.watchdog = "; ".join(done)
        report.log = f"logs/{STEPS_LOG}"
        if report.watchdog:
            with (logs / STEPS_LOG).open("a") as log:
                log.write(f"== watchdog: {report.watchdog}\n")
        for name in copy_logs(work, out):
            owner = next((s for s in report.steps if f"logs/{s.name}.log" == name), None)
            if owner is not None and name not in owner.logs:
                owner.logs.append(name)
        report.write(out)
    if report.watchdog:
        print(render(report), flush=True)
        print(f"watchdog: {report.watchdog}", file=sys.stderr)
    if "Ctrl-C" in stopped:
        return 130
    return 1 if any(s.status in ("failed", "timed_out") for s in report.steps) else 0


def complete(report: Report, profile: Profile, work: Path, t0: float, stopped: str, status: str) -> None:
    """Finish what the steps' process left: the step it was in gets `status` (timed_out at the budget, failed
    otherwise) and the rows its child had written; the steps it never began are skipped, with why."""
    now = time.monotonic() - t0
    for step in report.steps:
        rows_missing = step.name in VARIANT_LABELS and not any(r.variant == step.name for r in report.bench)
        if step.status == "running":
            step.status, step.seconds = status, now - (step.began_s or 0.0)
            step.note = f"{stopped}, {step.seconds:.0f} s into this step"
            if rows_missing:
                rows = child_rows(profile, step.name, rows_path(work, step.name), "not reached", stopped)
                report.add_rows([*rows[0], *rows[1]])
        elif step.status == "pending":
            step.status, step.note = "skipped", f"not started: {stopped}"
            if rows_missing:
                report.add_rows([BenchRow(step.name, r, b, "skipped", note=step.note) for r, b in configs(profile)])


def become_subreaper() -> None:
    """Adopt the orphans of the processes this one starts (Linux), so the watchdog still finds them to stop."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def processes_below(root: int) -> dict[int, str]:
    """Every live process under `root`, through the parent links in /proc (Linux; none elsewhere), by name."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    entries: list[str] = []
    with contextlib.suppress(OSError):
        entries = os.listdir("/proc")
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue  # it ended while the others were read
        name, _, rest = stat.partition(" (")[2].rpartition(")")
        state, ppid = rest.split()[:2]
        if state not in ("Z", "X"):  # a zombie is already dead
            children.setdefault(int(ppid), []).append(int(entry))
            names[int(entry)] = name
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = names[pid]
                todo.append(pid)
    return found


def kill_below(proc: subprocess.Popen[bytes]) -> list[str]:
    """Stop, then kill, every process under this one: the steps' process, and the servers, pytest runs and
    children under it, those in sessions of their own and orphans this process adopted too. All are stopped
    first, so none can start another or leave the tree while the rest are found. Returns the others than the
    steps' process, as "name (pid)"."""
    stopped: dict[int, str] = {}
    for _ in range(50):
        found = {pid: name for pid, name in processes_below(os.getpid()).items() if pid not in stopped}
        if not found:
            break
        for pid, name in found.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            stopped[pid] = name
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:  # where there is no /proc to walk: the steps' process and its group at least
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return [f"{name} ({pid})" for pid, name in stopped.items() if pid != proc.pid]


def reap(timeout_s: float = 5.0) -> None:
    """Collect the processes this one adopted once they die, so that none is left behind as a zombie."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            if time.monotonic() > end:
                return
            time.sleep(0.02)


def _tee(stream: IO[bytes], log: Path) -> None:
    """The steps' output, line by line, to this process's stdout and to their log."""
    with log.open("ab") as f:
        for line in iter(stream.readline, b""):
            f.write(line)
            f.flush()
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()


def exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit status {code}"


if __name__ == "__main__":
    raise SystemExit(main())
