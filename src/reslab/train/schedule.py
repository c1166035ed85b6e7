"""Learning-rate schedules as pure functions of the step (nanoGPT's shape).

A schedule returns a multiplier of each parameter group's base lr, so groups with different base
lrs (a head trained 10x faster, say) keep their ratio. Being pure functions of the step, they
need no state of their own: a resumed run recomputes the same lr from the step it resumes at.
"""

from __future__ import annotations

import math

# Paper section 4.2: "divide it by 10 at 32k and 48k iterations, and terminate training at 64k".
PAPER_MILESTONES = (0.5, 0.75)
# One-cycle starts at base/25 (torch's OneCycleLR div_factor), so the first steps do not explode.
ONECYCLE_START = 1 / 25


def lr_multiplier(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The multiplier of the base lr at optimizer step `step` (0-based) of `total_steps`."""
    total_steps = max(total_steps, 1)
    if schedule == "onecycle":
        # Linear up from base/25 to base over the warmup, then linearly down to zero.
        warm = max(warmup_steps, 1)
        if step < warm:
            return ONECYCLE_START + (1 - ONECYCLE_START) * step / warm
        return max(0.0, (total_steps - step) / max(total_steps - warm, 1))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "step":
        return 0.1 ** sum(step >= m * total_steps for m in PAPER_MILESTONES)
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


def set_lr(optimizer, multiplier: float) -> float:
    """Set every group's lr to its base lr times `multiplier`; returns the first group's lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
    return optimizer.param_groups[0]["lr"]
