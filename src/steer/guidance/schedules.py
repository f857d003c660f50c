"""Guidance-scale schedules over the noise level (Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight
Schedulers", arXiv 2404.13040).

A schedule maps the nominal w-form scale ``w̄`` and the noise level σ̄ to the effective scale. Progress is
``τ = 1/(1 + σ̄)``: 0 at pure noise, 1 at clean data, path-independent (it is ``1 − t`` of the rectified flow
at the same noise level, so on a flow model's uniform grid it is the step fraction of the paper). The schedules
ramp the guidance increment ``w − 1`` and keep its mean over uniform τ equal to ``w̄ − 1``, so they compare with
constant CFG at the same mean scale, and an increasing schedule starts at the conditional model (``w = 1``: no
unconditional pass).

- ``linear`` (increasing): ``w = 1 + 2(w̄ − 1) τ``; ``linear_decreasing``: ``1 + 2(w̄ − 1)(1 − τ)``
- ``cosine`` (increasing): ``w = 1 + (w̄ − 1)(1 − cos πτ)``; ``cosine_decreasing``: ``1 + (w̄ − 1)(1 + cos πτ)``
- ``clamp_linear``: ``max(clamp, linear)``, ``clamp`` default 2 (a floor on w)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

__all__ = ["Schedule", "SCHEDULES", "get_schedule", "progress"]


def progress(sigma: float) -> float:
    return 0.0 if math.isinf(sigma) else 1.0 / (1.0 + sigma)


@dataclass(frozen=True)
class Schedule:
    name: str
    shape: Callable[[float], float]  # τ -> multiplier of (w̄ − 1), mean 1 over [0, 1]
    clamp: float | None = None

    def __call__(self, w: float, sigma: float) -> float:
        out = 1.0 + (w - 1.0) * self.shape(progress(sigma))
        return max(self.clamp, out) if self.clamp is not None else out


SCHEDULES = {
    "constant": lambda tau: 1.0,
    "linear": lambda tau: 2.0 * tau,
    "linear_decreasing": lambda tau: 2.0 * (1.0 - tau),
    "cosine": lambda tau: 1.0 - math.cos(math.pi * tau),
    "cosine_decreasing": lambda tau: 1.0 + math.cos(math.pi * tau),
}


def get_schedule(schedule, clamp: float = 2.0) -> Schedule | None:
    """A schedule from None, a Schedule, a callable ``(w, σ̄) -> w`` or a name."""
    if schedule is None or isinstance(schedule, Schedule):
        return schedule
    if callable(schedule):
        return _Custom(schedule)
    if schedule == "clamp_linear":
        return Schedule("clamp_linear", SCHEDULES["linear"], clamp)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join([*SCHEDULES, 'clamp_linear'])}")
    return Schedule(schedule, SCHEDULES[schedule])


class _Custom:
    def __init__(self, fn):
        self.fn, self.name = fn, getattr(fn, "__name__", "custom")

    def __call__(self, w, sigma):
        return float(self.fn(w, sigma))
