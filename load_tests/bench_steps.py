"""Batching across denoising steps against grouping by step count, on a multi-step (Marigold) model.

    .venv/bin/python -m load_tests.bench_steps [--jobs 96] [--concurrency 16] [--model DIR]   (make bench-steps)

A closed loop of `--concurrency` clients, each sending its next job as soon as its last is answered, with
steps drawn from {1, 4, 10} (seeded). Both policies run the same jobs on the same model through the serving
code (`StepBatch`), with at most `--max-batch` members in flight per UNet call:

- continuous: one UNet call per step over every job in flight, each at its own timestep; a job leaves when
  its steps are done and a waiting job joins at the next step (what the worker's lane does);
- by-steps: each step count its own queue; a batch of one step count (the oldest job's) runs to completion
  before the next batch forms.

Reports jobs/s, mean and p95 latency and the mean members per UNet call for each, and the throughput ratio,
measured in one run. Default model: a tiny random-weight Marigold at 64 px on one CPU thread. On a CPU a UNet
call costs about in proportion to its members, so fuller calls gain little; a GPU runs 1 to 8 members in about
the same time. `--device-ms D` models that: every UNet call also waits D ms (a batch-insensitive device, as
the simulated backend of `bench_sizes`), and both policies are measured again with it, in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

STEP_CHOICES = (1, 4, 10)


@dataclass(eq=False)  # hashable by identity: it keys its trajectory
class Job:
    id: int
    steps: int
    seed: int
    issued: float = 0.0


def _jobs(n: int, seed: int) -> list[Job]:
    rng = np.random.default_rng(seed)
    return [Job(i, int(rng.choice(STEP_CHOICES)), i) for i in range(n)]


def run(
    model, image: np.ndarray, jobs: list[Job], concurrency: int, max_batch: int, policy: str, device_ms: float = 0.0
) -> dict[str, float]:
    from models.inference import BatchItem

    geometry = model.plan(image)
    pending = iter(jobs)
    queue: deque[Job] = deque()
    latencies: list[float] = []
    by_steps: dict[int, list[float]] = {n: [] for n in STEP_CHOICES}
    members_per_call: list[int] = []

    def issue() -> None:
        job = next(pending, None)
        if job is not None:
            job.issued = time.perf_counter()
            queue.append(job)

    def item(job: Job) -> BatchItem:
        return BatchItem(image, geometry, job.seed, True, "float32", job.steps)

    for _ in range(concurrency):
        issue()
    stepper = model.stepper()
    start = time.perf_counter()
    while queue or stepper.active:
        if policy == "continuous":
            joining = []
            while queue and stepper.members + len(joining) < max_batch:
                joining.append(queue.popleft())
            stepper.admit([(j, item(j)) for j in joining])
        elif not stepper.active:
            steps = queue[0].steps
            group = [j for j in queue if j.steps == steps][:max_batch]
            for j in group:
                queue.remove(j)
            stepper.admit([(j, item(j)) for j in group])
        members_per_call.append(stepper.members)
        finished = stepper.step()
        time.sleep(device_ms / 1000.0)
        for done in finished:
            model.finish_trajectory(done)
            latencies.append(time.perf_counter() - done.trajectory.key.issued)
            by_steps[done.trajectory.steps].append(latencies[-1])
            issue()
    elapsed = time.perf_counter() - start
    return {
        "jobs_per_s": len(jobs) / elapsed,
        "mean_ms": statistics.fmean(latencies) * 1000,
        "p95_ms": float(np.percentile(latencies, 95)) * 1000,
        "members_per_call": statistics.fmean(members_per_call),
        **{f"p50_{n}_ms": statistics.median(v) * 1000 for n, v in by_steps.items() if v},
        "unet_calls": len(members_per_call),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--model", type=Path, help="a Marigold checkpoint folder (default: a tiny one, built now)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each policy, interleaved; medians reported")
    parser.add_argument("--device-ms", type=float, default=50.0, help="batch-insensitive device time per UNet call")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from models.loading import load_model
    from models.spec import ModelSpec
    from models.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        source = args.model or make_tiny(Path(tmp) / "marigold", "marigold", "depth")
        model = load_model(ModelSpec(id="bench-marigold", source=str(source), device="cpu"))
        rng = np.random.default_rng(args.seed)
        image = rng.random((48, 64, 3), dtype=np.float32)
        run(model, image, _jobs(8, args.seed), 4, args.max_batch, "continuous")  # warm-up
        runs: dict[tuple[float, str], list[dict[str, float]]] = {}
        for device_ms in (0.0, args.device_ms):
            for _ in range(args.repeats):  # interleaved, so a busy machine slows both alike
                for policy in ("by-steps", "continuous"):
                    jobs = _jobs(args.jobs, args.seed)
                    runs.setdefault((device_ms, policy), []).append(
                        run(model, image, jobs, args.concurrency, args.max_batch, policy, device_ms)
                    )
        results = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
    print(
        f"{args.jobs} jobs, steps from {STEP_CHOICES}, c={args.concurrency}, at most {args.max_batch} members per "
        f"UNet call, {args.threads} CPU thread(s); medians of {args.repeats} interleaved runs"
    )
    print()
    print(
        "| device per UNet call | policy | jobs/s | mean ms | p95 ms | p50 ms, 1-step jobs | p50 ms, 10-step jobs "
        "| members per UNet call | UNet calls |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (device_ms, policy), r in results.items():
        device = "CPU only" if device_ms == 0 else f"CPU + {device_ms:.0f} ms"
        print(
            f"| {device} | {policy} | {r['jobs_per_s']:.2f} | {r['mean_ms']:.0f} | {r['p95_ms']:.0f} | "
            f"{r.get('p50_1_ms', 0):.0f} | {r.get('p50_10_ms', 0):.0f} | {r['members_per_call']:.2f} | "
            f"{r['unet_calls']:.0f} |"
        )
    print()
    for device_ms in (0.0, args.device_ms):
        ratio = results[(device_ms, "continuous")]["jobs_per_s"] / results[(device_ms, "by-steps")]["jobs_per_s"]
        device = "CPU only" if device_ms == 0 else f"CPU + {device_ms:.0f} ms per call"
        print(f"throughput, continuous / by-steps ({device}): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
