"""What a probe costs per image on each backend it runs on: torch (hooks) vs ONNX Runtime (its ONNX graph), and
on a Marigold base, next to the base model's own prediction.

    .venv/bin/python -m load_tests.probe_backends --probe DIR [--marigold-probe DIR2] [--res 128] [--batch 1]
        [--rounds 20] [--threads 2] [--engine-cache .cache/engines]

Every configuration runs once per round, interleaved (so a machine shared with other jobs slows them alike),
after one warm-up; reports the median wall and CPU milliseconds per image. Rows: base prediction, segment
alone, segment + the base map (`with_depth`). CPU time stays meaningful on a busy machine; wall time does not.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.inference import BatchItem
from models.probes.cli import _attached


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", type=Path, required=True, help="a probe trained on a single-step base")
    p.add_argument("--marigold-probe", type=Path, help="a probe trained on a Marigold base (torch only)")
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="torch threads (ONNX Runtime uses its default)")
    p.add_argument("--engine-cache", type=Path, default=Path(".cache/engines"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    image = np.random.default_rng(0).integers(0, 256, (args.res, args.res, 3), dtype=np.uint8)

    probes = {backend: _attached(args.probe, None, backend, args.engine_cache) for backend in ("torch", "onnxruntime")}
    if args.marigold_probe is not None:
        probes["torch (Marigold base)"] = _attached(args.marigold_probe, None, "torch", args.engine_cache)
    calls: dict[tuple[str, str], Callable[[], object]] = {}
    for name, probe in probes.items():
        items = [BatchItem(image, probe.base.plan(image, args.res), probe.base.resolve_seed(None))] * args.batch
        calls[(name, "base prediction")] = lambda b=probe.base, i=items: b.predict_batch(i)
        calls[(name, "segment")] = lambda pr=probe, i=items: pr.segment(i)
        calls[(name, "segment + depth")] = lambda pr=probe, i=items: pr.segment(i, with_depth=True)
    for call in calls.values():
        call()  # warm-up
    times: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in calls}
    for _ in range(args.rounds):
        for key, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            times[key].append((time.perf_counter() - wall, time.process_time() - cpu))
    print(f"{args.res} px, batch {args.batch}, {args.threads} torch threads, median of {args.rounds} rounds, per image")
    print("| backend | answer | wall ms | CPU ms |")
    print("|---|---|---:|---:|")
    for (name, what), samples in times.items():
        wall = statistics.median(s[0] for s in samples) * 1000 / args.batch
        cpu = statistics.median(s[1] for s in samples) * 1000 / args.batch
        print(f"| {name} | {what} | {wall:.1f} | {cpu:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
