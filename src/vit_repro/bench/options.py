"""The benchmark's options, its constants and its error: what every section of ``vit-repro bench`` shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError

SECTIONS = ("ceilings", "train", "inference", "study", "frozen", "data", "dvc")
IMPLEMENTATIONS = ("vit_repro", "torchvision", "timm")
PRECISIONS = ("fp32", "bf16")
TRAIN_STEP_FLOPS_PER_FORWARD = 3  # forward + backward (two matmuls per forward matmul)
FORMAT = "vit-repro-bench/2"
NUM_CLASSES = 3


class BenchError(UserError):
    """Bad benchmark options, a bad targets file, or a section whose inputs are missing."""


@dataclass
class Options:
    """What to measure and how long; the defaults are the issue's settings."""

    sections: tuple[str, ...] = SECTIONS
    explicit_sections: bool = False  # chosen with --sections: a section that cannot run is an error, not a skip
    device: str = "auto"
    out: Path | None = None
    repo: Path = Path(".")
    params: Path | None = None  # default <repo>/params.yaml
    experiments: Path | None = None  # default <repo>/experiments
    targets: Path | None = None  # default <repo>/benchmarks/targets.yaml
    model: str = "B/16"
    batch_size: int = 32
    image_size: int = 224
    implementations: tuple[str, ...] = IMPLEMENTATIONS
    precisions: tuple[str, ...] | None = None  # None: fp32, and bf16 where the device has bf16 arithmetic
    repeats: int = 3  # interleaved rounds (train/inference/ceilings, data)
    min_run_time: float = 1.0  # seconds each job is timed per round, after its warm-up call
    matmul_size: int = 4096
    attention: str = "auto"
    compile: bool = False
    study_images: int = 32  # images per evaluation / feature-extraction call in the study section
    frozen_seeds: int | None = None  # override the grid's seeds (a quick check; the target needs the full grid)
    threads: int | None = None  # torch threads here and in the dvc stages (default: torch's)

    def __post_init__(self) -> None:
        self.repo = Path(self.repo)
        self.params = Path(self.params) if self.params else self.repo / "params.yaml"
        self.experiments = Path(self.experiments) if self.experiments else self.repo / "experiments"
        self.targets = Path(self.targets) if self.targets else self.repo / "benchmarks" / "targets.yaml"
