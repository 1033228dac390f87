"""Predictor throughput at fixed resolutions and batch sizes, reported as per-image time and as the
batched-vs-unbatched ratio measured in the same run (absolute times only mean something on a GPU)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.inference import DensePredictor


@dataclass(frozen=True)
class BenchRow:
    resolution: int
    batch_size: int
    images: int
    seconds_per_image: float
    speedup_vs_batch1: float


def bench_predictor(
    model: DensePredictor,
    resolutions: Sequence[int],
    batch_sizes: Sequence[int],
    images_per_point: int = 16,
    warmup_batches: int = 1,
) -> list[BenchRow]:
    """Time `model.predict` on 4:3 images whose long edge equals the processing resolution."""
    rng = np.random.default_rng(0)
    rows: list[BenchRow] = []
    for res in resolutions:
        image = rng.random((res * 3 // 4, res, 3), dtype=np.float32)
        per_image: dict[int, float] = {}
        for bs in batch_sizes:
            n = max(images_per_point, bs)
            n -= n % bs
            model.predict([image] * (bs * warmup_batches), processing_res=res, batch_size=bs)
            start = time.perf_counter()
            model.predict([image] * n, processing_res=res, batch_size=bs)
            per_image[bs] = (time.perf_counter() - start) / n
            base = per_image.get(1, per_image[batch_sizes[0]])
            rows.append(BenchRow(res, bs, n, per_image[bs], base / per_image[bs]))
    return rows


def format_table(rows: Sequence[BenchRow], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| resolution | batch | images | ms / image | speed-up vs batch 1 |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.resolution} | {r.batch_size} | {r.images} | {r.seconds_per_image * 1e3:.2f} "
        f"| {r.speedup_vs_batch1:.2f}x |"
        for r in rows
    ]
    return "\n".join(lines)
