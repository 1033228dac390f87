"""GPU validation and benchmark of the runtimes (issue: export and accelerated runtimes).

On an SD2-sized model with random weights (the real architecture and cost) it measures images/s of the
graphs (encoder + UNet + decoder + post-processing, the part every runtime executes) at fixed resolutions and
batch sizes for: torch eager fp16, torch + torch.compile fp16, ONNX Runtime CUDA fp16 and TensorRT fp16, and
prints each as a fraction of the FLOP limit of docs/performance.md. Correctness (fp16 vs the fp32 predictor for
every runtime) is checked on the tiny checkpoints by the GPU tests in tests/test_export.py, which `--parity` runs.

    python -m load_tests.gpu_bench --work /tmp/gpu-bench [--resolutions 512,768] [--batches 1,4,8,16]
        [--backends torch,compile,onnxruntime,tensorrt] [--parity] [--out docs/gpu-table.md]
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

#: One single-step prediction of the SD2 architecture (docs/performance.md), in FLOPs.
FLOPS_PER_IMAGE = {512: 4.4e12, 768: 10.5e12}
#: H100 dense fp16 reached by large matmuls (docs/performance.md); the fraction is of this limit.
MATMUL_PEAK = 795e12


def timed(fn: Callable[[], torch.Tensor], warmup: int, iters: int) -> float:
    """Seconds per call, with CUDA events after warm-up (the first calls build kernels and engines)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def make_runtime(name: str, ckpt: Path, work: Path, resolutions: list[int], max_batch: int):
    from models.export.exporter import export_model
    from models.loading import load_model
    from models.spec import ModelSpec

    spec = ModelSpec(id="sd2-random", source=str(ckpt), task="depth", dtype="fp16", device="cuda")
    if name in ("torch", "compile"):
        return load_model(spec.model_copy(update={"compile": name == "compile"}), backend="torch").runtime
    fmt = "tensorrt" if name == "tensorrt" else "onnx"
    out = work / f"export-{fmt}-fp16"
    if not (out / "manifest.json").is_file():
        started = time.perf_counter()
        export_model(spec, fmt, out, dtype="fp16", max_batch=max_batch, resolutions=resolutions, device="cuda")
        print(f"# {fmt} export (+ engines) took {time.perf_counter() - started:.0f} s", flush=True)
    return load_model(ModelSpec(id="sd2-random", source=str(out), device="cuda"), backend=name).runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(".cache/gpu-bench"), help="checkpoint and exports")
    parser.add_argument("--resolutions", default="512,768")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--backends", default="torch,compile,onnxruntime,tensorrt")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--parity", action="store_true", help="also run the GPU parity tests on tiny checkpoints")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    resolutions = [int(r) for r in args.resolutions.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.parity:
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_export.py", "-k", "cuda or tensorrt"])
        if code:
            return code
    from models.tiny import make_tiny

    ckpt = args.work / "sd2-random-lotus-g-depth"
    if not (ckpt / "model_index.json").is_file():
        make_tiny(ckpt, "lotus-g", "depth", arch="sd2")
    gpu = torch.cuda.get_device_name()
    lines = [
        f"### Graph throughput, SD2-sized random weights, {gpu}, {datetime.date.today()}",
        "",
        "| backend | res | batch | img/s | ms / batch | fraction of the FLOP limit | vs torch eager b1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    baseline: dict[int, float] = {}
    for name in args.backends.split(","):
        try:
            runtime = make_runtime(name, ckpt, args.work, resolutions, max(batches))
        except Exception as exc:  # report and go on: one missing backend must not hide the others
            print(f"# {name}: unavailable: {type(exc).__name__}: {exc}", flush=True)
            continue
        for res in resolutions:
            h = w = res  # square, as docs/performance.md counts the FLOPs and the limit
            for batch in batches:
                images = torch.rand((batch, 3, h, w), device="cuda") * 2 - 1
                noise = runtime.make_noise(list(range(batch)), (h // 8, w // 8))
                try:
                    with torch.inference_mode():
                        seconds = timed(partial(runtime.run, images, noise), 2, args.iters)
                except Exception as exc:
                    print(f"# {name} {res} b{batch}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                ips = batch / seconds
                if name == "torch" and batch == 1:
                    baseline[res] = ips
                flops = FLOPS_PER_IMAGE.get(res, FLOPS_PER_IMAGE[768] * (res / 768) ** 2)
                frac = ips * flops / MATMUL_PEAK
                ratio = f"{ips / baseline[res]:.2f}x" if res in baseline else "-"
                row = f"| {name} | {res} | {batch} | {ips:.1f} | {seconds * 1e3:.1f} | {frac:.1%} | {ratio} |"
                lines.append(row)
                print(row, flush=True)
        runtime.close()
        torch.cuda.empty_cache()
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
