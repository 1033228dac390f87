"""What the worker did, per model: recent batches, forward passes, outcomes and stage times.

Mirrored into the Prometheus metrics; the in-memory part is bounded (the last `RECENT` batches per model), so
a long-running worker holds no growing lists.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field

from service import metrics

RECENT = 1000


@dataclass(frozen=True)
class BatchRecord:
    """One forward pass: how many images, and how long the device had waited for it with work in hand."""

    size: int
    idle_s: float


@dataclass
class WorkerStats:
    batches: dict[str, deque[BatchRecord]] = field(default_factory=lambda: defaultdict(lambda: deque(maxlen=RECENT)))
    forwards: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def batch_sizes(self, model: str) -> list[int]:
        """Sizes of the model's recent batches, oldest first."""
        return [b.size for b in self.batches[model]]

    def record_forward(
        self, model: str, batch_size: int, stages: dict[str, float] | None = None, idle_s: float = 0.0
    ) -> None:
        self.forwards[model] += 1
        self.batches[model].append(BatchRecord(batch_size, idle_s))
        metrics.BATCH_SIZE.labels(model).observe(batch_size)
        metrics.COMPUTE_IDLE_SECONDS.labels(model).observe(idle_s)
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
