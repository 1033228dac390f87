"""What the worker did, per model: batch sizes, forward passes, outcomes and stage times.

Kept in memory for the tests and mirrored into the Prometheus metrics.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from service import metrics


@dataclass
class WorkerStats:
    batch_sizes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    forwards: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def record_forward(self, model: str, batch_size: int, stages: dict[str, float] | None = None) -> None:
        self.forwards[model] += 1
        self.batch_sizes[model].append(batch_size)
        metrics.BATCH_SIZE.labels(model).observe(batch_size)
        for stage, seconds in (stages or {}).items():
            metrics.COMPUTE_SECONDS.labels(model, stage).observe(seconds)

    def record_outcome(self, model: str, status: str) -> None:
        self.outcomes[(model, status)] += 1
        metrics.JOBS_DONE.labels(model, status).inc()
        if status == "expired":
            metrics.JOBS_EXPIRED.labels(model).inc()
        elif status == "dropped":
            metrics.JOBS_DROPPED.labels(model).inc()

    def record_queue_wait(self, model: str, seconds: float) -> None:
        metrics.QUEUE_WAIT_SECONDS.labels(model).observe(max(0.0, seconds))
