"""What the worker did, per model: batch sizes, forward passes, and outcomes (read by tests and metrics)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass
class WorkerStats:
    batch_sizes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    forwards: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def record_forward(self, model: str, batch_size: int) -> None:
        self.forwards[model] += 1
        self.batch_sizes[model].append(batch_size)

    def record_outcome(self, model: str, status: str) -> None:
        self.outcomes[(model, status)] += 1
