"""The lane's measured cost of a denoising step, and `steps=auto`: the most steps that fit a job's deadline.

Measured, not configured: an exponential moving average of the UNet call over everything in flight (so it
rises under load, and auto answers degrade in quality instead of arriving late), plus the fixed part of a job
(its VAE encode and decode). Tests and operators may pin the per-step time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def auto_steps(remaining_s: float, per_step_s: float, fixed_s: float, max_steps: int) -> int:
    """The most steps (1 .. `max_steps`) whose estimate, `fixed_s` plus `per_step_s` per step, fits in
    `remaining_s`; 1 when even one does not (an answer with one step beats none)."""
    if per_step_s <= 0:
        return max_steps
    fit = math.floor((remaining_s - fixed_s) / per_step_s)
    return max(1, min(max_steps, fit))


@dataclass
class StepTimer:
    """Seconds per step and per job's fixed part, as the lane measured them (EMA with weight `alpha`)."""

    per_step_s: float | None = None
    fixed_s: float = 0.0
    alpha: float = 0.2
    pinned: bool = False

    def pin(self, per_step_s: float, fixed_s: float = 0.0) -> None:
        """Use these times and stop measuring (tests; a known device)."""
        self.per_step_s, self.fixed_s, self.pinned = per_step_s, fixed_s, True

    def observe_step(self, seconds: float) -> None:
        if not self.pinned:
            prev = self.per_step_s
            self.per_step_s = seconds if prev is None else prev + self.alpha * (seconds - prev)

    def observe_fixed(self, seconds: float) -> None:
        if not self.pinned:
            self.fixed_s = self.fixed_s + self.alpha * (seconds - self.fixed_s) if self.fixed_s else seconds

    def choose(self, remaining_s: float, max_steps: int) -> int:
        """`steps=auto` for a job with `remaining_s` left: `max_steps` until a step has been measured."""
        if self.per_step_s is None:
            return max_steps
        return auto_steps(remaining_s, self.per_step_s, self.fixed_s, max_steps)
