"""The GPU check is proven on the CPU before a lease: its smoke run covers every step, and what it cannot run
here (CUDA graphs, a GPU's compile) is reduced to what can be checked (capture hazards, the time bound)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from load_tests.gpu_check import GPU_TEST_FILES, NOT_ON_IMAGE, capture_hazards, inputs
from tests.conftest import REPO

SMOKE_LIMIT_S = 240  # the bound for `--cpu-smoke`


def _run(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "load_tests.gpu_check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - started


def test_cpu_smoke_runs_every_step_and_leaves_its_results(tmp_path: Path) -> None:
    """`make gpu-check-smoke`: every step of the GPU check on the CPU, within the issue's four minutes."""
    out = tmp_path / "out"
    proc, seconds = _run(["--cpu-smoke", "--out", str(out), "--work", str(tmp_path / "work")], SMOKE_LIMIT_S + 60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seconds < SMOKE_LIMIT_S
    report = json.loads((out / "gpu-check.json").read_text())
    table = (out / "gpu-table.md").read_text()
    steps = {s["name"]: s for s in report["steps"]}
    assert report["mode"] == "cpu-smoke"
    for name in ("environment", "cuda-tests", "checkpoint", "throughput", "fp16-vs-fp32", "served"):
        assert steps[name]["status"] == "ok", steps[name]
    # Bounded by their share of the time, so a loaded machine may cut them short, but never break them.
    assert steps["compile"]["status"] in ("ok", "partial") and steps["onnxruntime"]["status"] in ("ok", "partial")
    assert steps["tensorrt"] == {"name": "tensorrt", "status": "skipped", "seconds": 0.0, "note": NOT_ON_IMAGE}
    assert report["env"]["dense-serve unmet requirements"] == "none" and report["peak_tflops"] > 0

    # Without CUDA, every GPU test of the suite is collected and skipped, and says why.
    assert {t["test"].split("::")[0] for t in report["tests"]} == set(GPU_TEST_FILES)
    assert all(t["outcome"] == "skipped" and "CUDA" in t["message"] for t in report["tests"])

    rows = report["bench"]
    by = {(r["variant"], r["res"], r["batch"]): r for r in rows}
    assert set(by) == {(v, 64, b) for v in ("eager", "cuda-graphs", "channels-last", "compile") for b in (1, 4)} | {
        (v, 64, b) for v in ("onnxruntime", "tensorrt") for b in (1, 4)
    }
    flops = report["flops_per_img"]["64"]
    for batch in (1, 4):
        eager = by[("eager", 64, batch)]
        assert eager["status"] == "ok" and eager["ms_per_img"] > 0
        assert eager["flop_fraction"] == pytest.approx(eager["img_per_s"] * flops / (report["peak_tflops"] * 1e12))
        graphs = by[("cuda-graphs", 64, batch)]
        assert graphs["status"] == "skipped" and graphs["note"].endswith("capture hazards in one call on the CPU: none")
        assert by[("channels-last", 64, batch)]["max_err_vs_eager"] < 1e-4
    for row in rows:
        if row["variant"] in ("compile", "onnxruntime") and row["status"] == "ok":
            assert row["max_err_vs_eager"] < 1e-4 and row["ms_per_img"] > 0
        elif row["variant"] in ("compile", "onnxruntime"):
            assert row["status"] == "not reached" and "share" in row["note"]

    (precision,) = report["precision"]
    assert precision["non_finite"] == 0 and 0 < precision["max_abs"] < 3e-2

    served = {(s["answer"], s["concurrency"]): s for s in report["served"]}
    assert set(served) == {("png", 1), ("png", 16), ("npy", 1), ("npy", 16)}
    for (_, concurrency), row in served.items():
        assert row["img_per_s"] > 0 and row["direct_img_per_s"] > 0
        assert row["ratio_to_direct"] == pytest.approx(row["img_per_s"] / row["direct_img_per_s"])
        assert row["direct_batch"] == (1 if concurrency == 1 else 8)
    assert max(int(b.split(":")[0]) for b in served[("png", 16)]["batches"].split(", ")) > 1  # it batched

    for heading in ("| step | status |", "| GPU test |", "| runtime | res | batch |", "| fp16 vs fp32 |", "| answer |"):
        assert heading in table


def test_a_child_over_its_share_is_stopped_and_its_rows_say_so(tmp_path: Path) -> None:
    """torch.compile runs in a child killed at its share: a compile that runs long cannot eat the lease."""
    out = tmp_path / "out"
    skip = "cuda-tests,throughput,onnxruntime,tensorrt"
    proc, _ = _run(["--cpu-smoke", "--out", str(out), "--skip", skip, "--cap", "compile=2"], 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    step = next(s for s in report["steps"] if s["name"] == "compile")
    assert step["status"] == "partial" and step["seconds"] < 6
    compiled = [r for r in report["bench"] if r["variant"] == "compile"]
    assert len(compiled) == 2
    assert all(r["status"] == "not reached" and "stopped at its 2 s share" in r["note"] for r in compiled)
    skipped = {s["name"]: s["note"] for s in report["steps"] if s["status"] == "skipped"}
    assert skipped["fp16-vs-fp32"] == "needs the throughput step" and skipped["throughput"] == "left out (--skip)"


def test_capture_hazards_are_found_and_the_predictor_has_none(tiny_model) -> None:
    """What graph capture refuses is visible on the CPU: host reads and tensors made from Python numbers."""
    x = torch.ones(3)
    assert capture_hazards(lambda: x * torch.tensor([2.0]) + x.sum().item()) == ["lift_fresh", "_local_scalar_dense"]
    assert capture_hazards(lambda: x[x > 0]) == ["index with a boolean mask"]
    assert capture_hazards(lambda: torch.nonzero(x)) == ["nonzero"]
    for family, task in (("lotus-g", "depth"), ("lotus-d", "normals"), ("e2e-ft", "depth")):
        runtime = tiny_model(family, task).runtime
        images = inputs(64, 2)
        noise = runtime.make_noise([0, 1], (8, 8))
        assert capture_hazards(lambda runtime=runtime, images=images, noise=noise: runtime.run(images, noise)) == []


def test_the_gpu_tests_carry_the_marker_and_live_where_the_check_looks() -> None:
    """`pytest -m gpu` over GPU_TEST_FILES must be every test skipped for want of CUDA."""
    marked, cuda_skipped = set(), set()
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            decorators = [ast.unparse(d) for d in node.decorator_list]
            where = f"tests/{path.name}::{node.name}"
            if "pytest.mark.gpu" in decorators:
                marked.add(where)
            if any("skipif" in d and ("cuda" in d.lower()) for d in decorators):
                cuda_skipped.add(where)
    assert cuda_skipped and cuda_skipped <= marked
    assert {m.split("::")[0] for m in marked} == set(GPU_TEST_FILES)
