"""The learning-rate schedule: linear warmup from 0, then optional decay to 0."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, decay: str = "none") -> float:
    """Learning rate for optimisation step ``step`` (0-based) of ``total_steps``."""
    # 1) linear warmup from 0: step 0 gets 0, step warmup_steps gets the full rate
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if decay == "none":
        return base_lr
    # 2) decay over the remaining steps; progress runs from 0 at the end of warmup to 1 at total_steps,
    #    so the rate reaches 0 just as training ends and the last step still learns a little
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        return base_lr * (1.0 - progress)
    if decay == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay {decay!r}: use none, cosine or linear")
