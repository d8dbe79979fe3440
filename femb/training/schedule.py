"""Learning-rate schedules stepped per optimizer step: linear warmup, then poly, cosine or step decay."""

from __future__ import annotations

import math
from collections.abc import Sequence

SCHEDULES = ("poly", "cosine", "step", "constant")


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "poly",
    power: float = 2.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_factor: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Warmup rises linearly from 1/warmup to 1; the poly schedule then follows arcface_torch's
    PolyScheduler, ``(1 - progress) ** power``; cosine decays to `min_factor`; step multiplies by
    `gamma` at each milestone (counted in optimizer steps from the start).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** sum(step >= m for m in milestones)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "poly":
        return min_factor + (1.0 - min_factor) * (1.0 - progress) ** power
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
