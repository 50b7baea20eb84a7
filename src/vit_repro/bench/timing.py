"""Timing: ``torch.utils.benchmark.Timer`` around a ``Job``, interleaved rounds, throughput rows against the
matmul ceilings, and TF32 off while timing."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class Job:
    """One thing to time: ``fn`` does ``images`` images' worth of work (0 for a matmul) in ``flops`` FLOPs."""

    section: str
    model: str
    precision: str
    fn: Callable[[], Any]
    images: int
    flops: float
    threads: int | None = None  # default: torch's current thread count

    @property
    def name(self) -> str:
        return f"{self.section}/{self.model}/{self.precision}"


def timer(job: Job):
    import torch
    from torch.utils.benchmark import Timer

    return Timer(stmt="fn()", globals={"fn": job.fn}, num_threads=job.threads or torch.get_num_threads(),
                 label=job.section, sub_label=job.model, description=job.precision)


def measure(job: Job, min_run_time: float) -> list[float]:
    """Seconds per call of ``job``: ``Timer.blocked_autorange`` (one untimed warm-up call, then calls until
    ``min_run_time`` has passed; a call slower than that is timed once)."""
    m = timer(job).blocked_autorange(min_run_time=min_run_time)
    return list(m.times)


def interleaved(jobs: list[Job], rounds: int, min_run_time: float, log: Callable[[str], None] = lambda _: None,
                ) -> dict[str, list[list[float]]]:
    """Per job, the seconds per call of each round; the jobs run round-robin, so load that drifts hits all alike."""
    timers = {job.name: timer(job) for job in jobs}
    times: dict[str, list[list[float]]] = {job.name: [] for job in jobs}
    for r in range(rounds):
        for job in jobs:
            times[job.name].append(list(timers[job.name].blocked_autorange(min_run_time=min_run_time).times))
        log(f"[bench]   round {r + 1}/{rounds} done")
    return times


def throughput_row(job: Job, rounds: list[list[float]], ceiling: dict[str, list[float]] | None) -> dict[str, Any]:
    """img/s and GFLOP/s of a job from all its timed calls (median), and its fraction of the ceiling: the median
    over rounds of (this round's GFLOP/s / the same round's ceiling GFLOP/s)."""
    every = [t for r in rounds for t in r]
    seconds = statistics.median(every)
    row = {"section": job.section, "model": job.model, "precision": job.precision, "batch": job.images,
           "seconds": seconds, "seconds_rounds": [statistics.median(r) for r in rounds], "calls_timed": len(every),
           "img_per_s": job.images / seconds if job.images else None, "gflops": job.flops / seconds / 1e9,
           "fraction_of_ceiling": None}
    if ceiling:
        row["fraction_of_ceiling"] = statistics.median(
            (job.flops / statistics.median(r)) / ceiling_flops for r, ceiling_flops in zip(rounds, ceiling["round_flops"]))
    return row


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
