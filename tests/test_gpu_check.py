"""The GPU check is proven on the CPU before a lease: its smoke run covers every step, and what it cannot run
here (CUDA graphs, a GPU's compile) is reduced to what can be checked (capture hazards, the time bound)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from load_tests.gpu_check import GPU_TEST_FILES, NOT_ON_IMAGE, capture_hazards, inputs
from tests.conftest import REPO

SMOKE_LIMIT_S = 240  # the bound for `--cpu-smoke`


def _run(
    args: list[str], timeout: float, env: dict[str, str] | None = None, module: str = "load_tests.gpu_check"
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return proc, time.monotonic() - started


def _steps(out: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((out / "gpu-check.json").read_text())["steps"]}


def _alive(pid: int, marker: str) -> bool:
    """Whether `pid` is a live process whose command line holds `marker` (a zombie is dead; so is a reused pid)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return state not in ("Z", "X") and marker in cmdline


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
    assert steps["tensorrt"]["status"] == "skipped" and steps["tensorrt"]["note"] == NOT_ON_IMAGE
    assert report["env"]["dense-serve unmet requirements"] == "none" and report["peak_tflops"] > 0
    assert report["watchdog"] == "" and all(s["seconds"] >= 0 and s["estimate_s"] > 0 for s in steps.values())

    # Each process a step started left its log in out/logs, named by its step; the steps' own output beside them.
    # What comes back from the device: at most 8 files, two folders down, plain names.
    for name in ("cuda-tests", "served", "compile", "onnxruntime"):
        assert steps[name]["logs"] == [f"logs/{name}.log"] and (out / "logs" / f"{name}.log").stat().st_size > 0
    assert "5 skipped" in (out / "logs" / "cuda-tests.log").read_text()  # pytest's own summary line
    assert report["log"] == "logs/gpu-check.log" and "== onnxruntime: " in (out / "logs/gpu-check.log").read_text()
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(f.parts) <= 2 and re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files)

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


DRILL_BUDGET_S = 20


@pytest.fixture(scope="module")
def drill_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], float, Path]:
    """One run of the check's machinery over drill steps: one raises SystemExit, one runs a child that logs, one
    hangs in a child (which started a grandchild in a session of its own) until the watchdog, one comes after."""
    out = tmp_path_factory.mktemp("drill") / "out"
    args = ["--cpu-smoke", "--drill", "system-exit,child-log,hang,ok", "--budget-s", str(DRILL_BUDGET_S)]
    proc, seconds = _run([*args, "--out", str(out)], DRILL_BUDGET_S + 60)
    return proc, seconds, out


def test_a_step_that_raises_system_exit_is_failed_and_the_next_steps_run(drill_run) -> None:
    proc, _, out = drill_run
    steps = _steps(out)
    assert list(steps) == ["system-exit", "child-log", "hang", "ok"]
    assert steps["system-exit"]["status"] == "failed" and steps["system-exit"]["note"] == "SystemExit: 3"
    assert steps["child-log"]["status"] == "ok" and steps["child-log"]["note"] == "the child exited with 0"
    assert steps["hang"]["status"] == "timed_out"  # it ran too, up to the watchdog
    assert proc.returncode == 1, proc.stderr[-2000:]


def test_a_step_that_hangs_is_timed_out_and_the_report_is_complete_with_no_process_left(drill_run) -> None:
    """The watchdog at --budget-s: the report says what finished, the hung step is timed_out, the step never
    reached is skipped with why, the table is written, and the hung child and its grandchild are gone."""
    _, seconds, out = drill_run
    report = json.loads((out / "gpu-check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    budget = f"the run reached its {DRILL_BUDGET_S} s budget"
    assert steps["hang"]["note"].startswith(f"{budget}, ") and steps["hang"]["note"].endswith(" s into this step")
    assert 0 < steps["hang"]["seconds"] < DRILL_BUDGET_S
    assert steps["ok"] == {**steps["ok"], "status": "skipped", "note": f"not started: {budget}"}
    assert not {s["status"] for s in report["steps"]} & {"running", "pending"}
    assert report["watchdog"].startswith(f"{budget}; killed ") and "python" in report["watchdog"]
    assert DRILL_BUDGET_S <= seconds < DRILL_BUDGET_S + 30  # the kill and the last write are quick
    table = (out / "gpu-table.md").read_text()
    assert f"**Watchdog**: {budget}" in table and "| hang | timed_out |" in table and "| ok | skipped |" in table
    pids = (out / "logs" / "hang.log").read_text().split()
    assert pids[0] == "pids" and len(pids) == 3
    for pid in pids[1:]:
        assert f"({pid})" in report["watchdog"]
        assert not _alive(int(pid), "time.sleep(3600)")


def test_the_logs_of_the_processes_a_step_starts_are_copied_and_named(drill_run) -> None:
    _, _, out = drill_run
    steps = _steps(out)
    assert steps["child-log"]["logs"] == ["logs/child-log.log"] and steps["hang"]["logs"] == ["logs/hang.log"]
    assert (out / "logs" / "child-log.log").read_text() == "the child ran\n"
    assert steps["system-exit"]["logs"] == [] and steps["ok"]["logs"] == []
    own = (out / "logs" / "gpu-check.log").read_text()  # the steps' own output: the traceback, each step's line
    assert "SystemExit: 3" in own and "== child-log: ok" in own and "== watchdog: the run reached its" in own


def test_a_steps_process_that_dies_leaves_a_complete_report(tmp_path: Path) -> None:
    """A crash no exception reports (a signal, as from a segfault in a native runtime): the watchdog still
    completes the report, the step it died in failed with how, the rest skipped."""
    out = tmp_path / "out"
    proc, _ = _run(["--cpu-smoke", "--drill", "child-log,crash,ok", "--out", str(out)], 120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = _steps(out)
    died = "the steps' process ended (signal SIGKILL) before its steps did"
    assert steps["child-log"]["status"] == "ok" and steps["child-log"]["logs"] == ["logs/child-log.log"]
    assert steps["crash"]["status"] == "failed" and steps["crash"]["note"].startswith(f"{died}, ")
    assert steps["ok"]["status"] == "skipped" and steps["ok"]["note"] == f"not started: {died}"
    assert json.loads((out / "gpu-check.json").read_text())["watchdog"] == died
    assert (out / "logs" / "child-log.log").is_file()


def test_a_step_whose_estimate_is_more_than_the_budget_left_is_skipped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--cpu-smoke", "--drill", "child-log,ok", "--estimate", "ok=100000", "--budget-s", "60"]
    proc, _ = _run([*args, "--out", str(out)], 120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = _steps(out)
    assert steps["child-log"]["status"] == "ok"
    assert steps["ok"]["status"] == "skipped" and steps["ok"]["estimate_s"] == 100000
    left = re.fullmatch(r"needs about 100000 s, (\d+) s of the budget left", steps["ok"]["note"])
    assert left and 0 < int(left[1]) <= 60


def test_a_server_that_does_not_start_fails_the_served_step_and_the_run_goes_on(tmp_path: Path) -> None:
    """The issue's case: the served step's server exits at start (here a setting it refuses). The step is failed
    with the server's own words, its log is copied, and the compile step after it still runs."""
    out = tmp_path / "out"
    skip = "environment,cuda-tests,fp16-vs-fp32,onnxruntime,tensorrt"
    args = ["--cpu-smoke", "--skip", skip, "--cap", "compile=2", "--out", str(out)]
    proc, _ = _run(args, 180, env={"DENSE_MAX_BATCH_SIZE": "0"})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = _steps(out)
    served = steps["served"]
    assert served["status"] == "failed" and served["note"].startswith("ServerStartError: server exited with 2")
    assert "greater than or equal to 1" in served["note"] and served["logs"] == ["logs/served.log"]
    assert "max_batch_size" in (out / "logs" / "served.log").read_text()
    assert steps["throughput"]["status"] == "ok" and steps["compile"]["status"] == "partial"
    assert steps["compile"]["logs"] == ["logs/compile.log"]


def test_bench_sizes_cli_still_exits_with_the_message_when_its_server_does_not_start() -> None:
    """serving() raises ServerStartError for its callers; bench_sizes' own command ends with its message, status 1."""
    proc, _ = _run(["--only-simulated"], 180, env={"DENSE_MAX_BATCH_SIZE": "0"}, module="load_tests.bench_sizes")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("server exited with 2: ")


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
