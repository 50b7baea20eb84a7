"""The learning-rate schedule: linear warmup from 0, then optional decay to 0, computed once per run."""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, decay: str = "none") -> float:
    """Learning rate for optimisation step ``step`` (0-based) of ``total_steps``."""
    if step < warmup_steps:  # step 0 gets 0, step warmup_steps the full rate
        return base_lr * step / warmup_steps
    if decay == "none":
        return base_lr
    # progress runs from 0 at the end of warmup to 1 at total_steps: the last step still learns a little
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        return base_lr * (1.0 - progress)
    if decay == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay {decay!r}: use none, cosine or linear")


@dataclass(frozen=True)
class Schedule:
    """A run's optimisation steps and learning rates, fixed before training starts.

    Attributes:
        images: training images per epoch.
        batch_size: images per (global) micro-batch.
        grad_accum_steps: micro-batches per optimisation step.
        epochs: passes over the training images.
        drop_last: whether an epoch's last, incomplete batch is dropped (else it is a smaller step).
        base_lr: the rate after warmup.
        warmup_fraction: the share of all steps spent warming up (0: no warmup).
        decay: ``none``, ``cosine`` or ``linear`` to 0 at the last step.
    """

    images: int
    batch_size: int
    grad_accum_steps: int
    epochs: int
    drop_last: bool
    base_lr: float
    warmup_fraction: float
    decay: str

    def __post_init__(self) -> None:
        if self.drop_last and self.images < self.batch_size:
            raise ValueError(f"{self.images} training images are fewer than one batch of {self.batch_size}: "
                             "with drop_last every batch would be dropped")

    @property
    def micro_batches(self) -> int:
        full, rest = divmod(self.images, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches / self.grad_accum_steps)

    @property
    def last_batch(self) -> int:
        """Images in an epoch's last micro-batch: a full batch, or the smaller remainder when it is kept."""
        rest = self.images % self.batch_size
        return rest if rest and not self.drop_last else min(self.batch_size, self.images)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_fraction * self.total_steps)

    def lr(self, step: int) -> float:
        return lr_at(step, self.base_lr, self.total_steps, self.warmup_steps, self.decay)
