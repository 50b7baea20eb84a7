"""``vit-repro bench``: what the study costs on this machine, measured against the machine's ceilings.

Sections (``--sections``; all by default), each timed with ``torch.utils.benchmark.Timer`` (it synchronises
accelerators, sets the thread count and separates a warm-up call from the timed ones):

1. ``ceilings``: float32 (TF32 off) and bfloat16 matmul GFLOP/s, timed **in the same round-robin loop** as
   the ``train`` and ``inference`` jobs, so the fraction of the ceiling each model reaches is taken round by
   round against the ceiling measured under the same load.
2. ``train``: a ViT training step (default B/16, batch 32, 224 px; Adam, cross-entropy) of ours,
   torchvision's and, when installed, timm's, float32 and bf16 autocast; GFLOP/s from ``models.forward_macs``
   (a step counts 3 forward passes, a MAC 2 FLOPs).
3. ``inference``: forward passes of the same models (feature extraction), ours also with bf16 weights.
4. ``study``: the numbers the time estimates come from (``vit_repro.plan``): for every distinct (model,
   image size, precision) of the scratch arms of every study in params.yaml, training img/s (the arm's batch,
   augmentation and optimizer) and evaluation img/s; every study backbone's feature img/s; one frozen head
   run and one probe run.
5. ``frozen``: all frozen runs of the recipe grid (``--targets``: 8 recipes x 20 seeds) under a real
   ``dvc repro`` from cached features, against one feature pass under ``dvc repro`` too, in a temporary copy
   of ``--repo``; and the seed notebook's approach (the whole backbone forward every epoch), extrapolated.
6. ``data``: one epoch of the decoded-tensor loader against decoding the JPEGs every epoch.
7. ``dvc``: ``dvc repro`` with nothing to do.

The issue's targets and the frozen grid live with the benchmark (``benchmarks/targets.yaml``), not here: this
module only computes the metrics that a targets file names. ``--out X.json`` writes the results (with the
date, hardware, versions and ``machine_key``) and ``X.md``, the same tables as printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import UserError

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


# ----------------------------------------------------------------------------------------------- options

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vit-repro bench", description="Measure what the study costs on this machine (see benchmarks/README.md).")
    p.add_argument("--sections", nargs="+", metavar="SECTION", help=f"what to run (default: all): {', '.join(SECTIONS)}")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--out", type=Path, metavar="X.json", help="write the results as JSON and the tables as X.md")
    p.add_argument("--repo", type=Path, default=Path("."), help="the project whose data, params and pipeline to use")
    p.add_argument("--params", type=Path, help="default: <repo>/params.yaml")
    p.add_argument("--experiments", type=Path, help="default: <repo>/experiments")
    p.add_argument("--targets", type=Path, help="targets and the frozen grid (default: <repo>/benchmarks/targets.yaml)")
    p.add_argument("--model", default="B/16", help="ViT of the train/inference sections (default B/16)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224, help="train/inference/data sections (default 224)")
    p.add_argument("--models", nargs="+", default=list(IMPLEMENTATIONS), metavar="IMPL",
                   help=f"implementations compared: {', '.join(IMPLEMENTATIONS)} (timm only when installed)")
    p.add_argument("--precisions", nargs="+", metavar="P",
                   help="fp32 and/or bf16 (default: fp32, and bf16 where the device computes in bf16: GPUs that "
                        "support it, CPUs with AVX512-BF16 or AMX; elsewhere bf16 is emulated, ~100x slower)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--min-run-time", type=float, default=1.0,
                   help="seconds each job is timed per round after its warm-up call (default 1; a slower job runs once)")
    p.add_argument("--matmul-size", type=int, default=4096, help="side of the square matmuls of the ceilings")
    p.add_argument("--attention", default="auto", help="our model's attention kernel: auto, sdpa or matmul")
    p.add_argument("--compile", action="store_true", help="torch.compile our model in the train/inference sections")
    p.add_argument("--study-images", type=int, default=32,
                   help="images per evaluation and feature-extraction call in the study section (default 32)")
    p.add_argument("--frozen-seeds", type=int, help="seeds per grid recipe in the frozen section (default: the targets file's)")
    p.add_argument("--threads", type=int, help="torch threads, also for the dvc stages of the frozen section (default: torch's)")
    return p


def parse_options(argv: list[str]) -> Options:
    args = build_parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)  # `vit-repro bench -- ...`
    sections = tuple(args.sections or SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise BenchError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    bad = [m for m in args.models if m not in IMPLEMENTATIONS]
    if bad:
        raise BenchError(f"unknown model implementation(s) {', '.join(bad)}; choose from {', '.join(IMPLEMENTATIONS)}")
    bad = [p for p in args.precisions or () if p not in PRECISIONS]
    if bad:
        raise BenchError(f"unknown precision(s) {', '.join(bad)}; choose from {', '.join(PRECISIONS)}")
    for name in ("batch_size", "image_size", "repeats", "matmul_size", "study_images"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("frozen_seeds", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.min_run_time < 0:
        raise BenchError(f"--min-run-time must be >= 0, got {args.min_run_time}")
    from .model import ATTENTION_KERNELS

    if args.attention not in ATTENTION_KERNELS:
        raise BenchError(f"unknown --attention {args.attention!r}; choose from {', '.join(ATTENTION_KERNELS)}")
    if args.out is not None and args.out.suffix != ".json":
        raise BenchError(f"--out {args.out}: name a .json file (the tables go beside it as .md)")
    return Options(
        sections=tuple(s for s in SECTIONS if s in sections), explicit_sections=args.sections is not None,
        device=args.device, out=args.out, repo=args.repo, params=args.params, experiments=args.experiments,
        targets=args.targets, model=args.model, batch_size=args.batch_size, image_size=args.image_size,
        implementations=tuple(args.models), precisions=tuple(args.precisions) if args.precisions else None,
        repeats=args.repeats,
        min_run_time=args.min_run_time, matmul_size=args.matmul_size, attention=args.attention, compile=args.compile,
        study_images=args.study_images, frozen_seeds=args.frozen_seeds, threads=args.threads,
    )


# ----------------------------------------------------------------------------------------------- targets

@dataclass(frozen=True)
class Metric:
    sections: tuple[str, ...]  # all of them must have run
    about: str
    compute: Callable[[dict[str, Any]], tuple[float, str] | None]  # (value, detail), None when not measurable


def _row(result: dict[str, Any], section: str, model: str, precision: str) -> dict[str, Any] | None:
    return next((r for r in result.get(section) or [] if r["model"] == model and r["precision"] == precision), None)


def _vs_torchvision(precision: str) -> Callable[[dict[str, Any]], tuple[float, str] | None]:
    def compute(result: dict[str, Any]) -> tuple[float, str] | None:
        ours, tv = _row(result, "train", "vit_repro", precision), _row(result, "train", "torchvision", precision)
        if not ours or not tv:
            return None
        return ours["img_per_s"] / tv["img_per_s"], f"{ours['img_per_s']:.3f} vs {tv['img_per_s']:.3f} img/s"
    return compute


def _fraction(precision: str) -> Callable[[dict[str, Any]], tuple[float, str] | None]:
    def compute(result: dict[str, Any]) -> tuple[float, str] | None:
        ours = _row(result, "train", "vit_repro", precision)
        if not ours or ours.get("fraction_of_ceiling") is None:
            return None
        ceiling = result["ceilings_gflops"][precision]
        return ours["fraction_of_ceiling"], (f"{ours['gflops']:.0f} of {ceiling:.0f} GFLOP/s (median of per-round "
                                             "fractions)")
    return compute


def _frozen_ratio(result: dict[str, Any]) -> tuple[float, str] | None:
    f = result.get("frozen") or {}
    if "grid_s" not in f:
        return None
    return f["grid_s"] / f["feature_pass_s"], (f"{f['grid_s']:.1f} s for {f['runs']} runs vs {f['feature_pass_s']:.1f} s, "
                                                "both under dvc repro")


def _frozen_speedup(result: dict[str, Any]) -> tuple[float, str] | None:
    f = result.get("frozen") or {}
    if "grid_s" not in f:
        return None
    cached = f["feature_pass_s"] + f["grid_s"]
    return f["seed_approach_s_extrapolated"] / cached, (f"{cached:.0f} s vs {f['seed_approach_s_extrapolated']:.0f} s "
                                                         "(extrapolated)")


def _loader_fraction(result: dict[str, Any]) -> tuple[float, str] | None:
    data, ours = result.get("data") or {}, _row(result, "train", "vit_repro", "fp32")
    if "cached_epoch_s" not in data or not ours:
        return None
    epoch_s = data["images"] / ours["img_per_s"]
    data_s = data["cache_read_s"] + data["cached_epoch_s"]  # as if the cache were read every epoch
    return data_s / epoch_s, f"{data_s:.3f} s of a {epoch_s:.0f} s {result['settings']['model']} fp32 epoch"


def _dvc_noop(result: dict[str, Any]) -> tuple[float, str] | None:
    n = result.get("dvc_noop") or {}
    return (n["seconds"], f"{n['stages']} stages") if "seconds" in n else None


def _study_seconds(result: dict[str, Any]) -> tuple[float, str] | None:
    s = result.get("study") or {}
    if "seconds" not in s:
        return None
    return s["seconds"], f"{len(s['scratch'])} scratch models, {len(s['features'])} backbones, 2 frozen runs"


METRICS: dict[str, Metric] = {
    "train_fp32_vs_torchvision": Metric(("train",), "our fp32 training step's img/s / torchvision's",
                                        _vs_torchvision("fp32")),
    "train_bf16_vs_torchvision": Metric(("train",), "our bf16 training step's img/s / torchvision's",
                                        _vs_torchvision("bf16")),
    "train_fp32_fraction_of_ceiling": Metric(("ceilings", "train"), "our fp32 step's GFLOP/s / the fp32 matmul ceiling",
                                             _fraction("fp32")),
    "train_bf16_fraction_of_ceiling": Metric(("ceilings", "train"), "our bf16 step's GFLOP/s / the bf16 matmul ceiling",
                                             _fraction("bf16")),
    "frozen_grid_vs_one_feature_pass": Metric(("frozen",), "seconds of the frozen grid / one feature pass",
                                              _frozen_ratio),
    "frozen_speedup_vs_seed_approach": Metric(("frozen",), "seed approach (extrapolated) / (feature pass + grid)",
                                              _frozen_speedup),
    "cached_loader_fraction_of_scratch_epoch": Metric(("data", "train"), "decoded-tensor loader / a scratch epoch",
                                                      _loader_fraction),
    "dvc_repro_noop_seconds": Metric(("dvc",), "dvc repro with nothing to do, seconds", _dvc_noop),
    "study_section_seconds": Metric(("study",), "the study section's own run time, seconds", _study_seconds),
}


@dataclass(frozen=True)
class Grid:
    """The frozen section's runs: ``arm`` trains ``recipes`` x ``seeds`` on ``train_set`` and nothing else."""

    arm: str
    train_set: str
    recipes: tuple[str, ...]
    seeds: int


@dataclass(frozen=True)
class Targets:
    path: Path
    targets: dict[str, dict[str, Any]]  # metric -> {at_least | at_most, about}
    grid: Grid


def load_targets(path: Path) -> Targets:
    """Read and check a targets file (see benchmarks/targets.yaml); every problem is one clear error."""
    import yaml

    if not path.is_file():
        raise BenchError(f"targets file {path} not found; pass --targets benchmarks/targets.yaml (or run from the "
                         "repository root)")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BenchError(f"{path} is not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("targets"), dict) or not isinstance(doc.get("frozen_grid"), dict):
        raise BenchError(f"{path} must be a mapping with `targets` (metric -> bound) and `frozen_grid`")
    targets = {}
    for metric, spec in doc["targets"].items():
        if metric not in METRICS:
            raise BenchError(f"{path}: unknown metric {metric!r}; bench computes {', '.join(METRICS)}")
        bounds = [k for k in ("at_least", "at_most") if k in (spec or {})]
        if not isinstance(spec, dict) or len(bounds) != 1 or isinstance(spec[bounds[0]], bool) \
                or not isinstance(spec[bounds[0]], (int, float)) or set(spec) - {"at_least", "at_most", "about"}:
            raise BenchError(f"{path}: targets.{metric} needs exactly one numeric `at_least` or `at_most` (and an "
                             "optional `about`)")
        targets[metric] = {"bound": bounds[0], "threshold": float(spec[bounds[0]]),
                           "about": " ".join(str(spec.get("about", METRICS[metric].about)).split())}
    g = doc["frozen_grid"]
    try:
        grid = Grid(arm=str(g["arm"]), train_set=str(g["train_set"]), recipes=tuple(str(r) for r in g["recipes"]),
                    seeds=int(g["seeds"]))
    except (KeyError, TypeError, ValueError):
        raise BenchError(f"{path}: frozen_grid needs arm, train_set, recipes (a list) and seeds (a number)") from None
    if not grid.recipes or grid.seeds < 1:
        raise BenchError(f"{path}: frozen_grid needs at least one recipe and one seed")
    return Targets(path, targets, grid)


def evaluate_targets(result: dict[str, Any], targets: Targets) -> list[dict[str, Any]]:
    """Every target of the file: its value, bound and whether it is met; ``met`` None when not measured."""
    ran = set(result.get("sections_run", []))
    out = []
    for metric, spec in targets.targets.items():
        m = METRICS[metric]
        value = m.compute(result) if set(m.sections) <= ran else None
        row = {"target": metric, "about": spec["about"], "bound": spec["bound"], "threshold": spec["threshold"],
               "value": None, "met": None, "detail": f"not measured: needs sections {', '.join(m.sections)}"}
        if value is not None:
            v, detail = value
            met = v >= spec["threshold"] if spec["bound"] == "at_least" else v <= spec["threshold"]
            row |= {"value": v, "met": bool(met), "detail": detail}
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------ timing

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


# ---------------------------------------------------------------------------- ceilings, train, inference

def build_implementation(kind: str, model: str, image_size: int, attention: str = "auto"):
    """The same ViT from three libraries; ``None`` when ``kind``'s library is not installed."""
    from .model import VisionTransformer, parse_model_name

    cfg = parse_model_name(model, image_size=image_size, num_classes=NUM_CLASSES)
    if kind == "vit_repro":
        return VisionTransformer(cfg, attention=attention)
    common = dict(patch_size=cfg.patch_size, num_heads=cfg.num_heads, num_classes=cfg.num_classes)
    if kind == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

        return TorchvisionViT(image_size=cfg.image_size, num_layers=cfg.num_layers, hidden_dim=cfg.hidden_dim,
                              mlp_dim=cfg.mlp_dim, **common)
    if kind == "timm":
        try:
            from timm.models.vision_transformer import VisionTransformer as TimmViT
        except ImportError:
            return None
        return TimmViT(img_size=cfg.image_size, embed_dim=cfg.hidden_dim, depth=cfg.num_layers,
                       mlp_ratio=cfg.mlp_dim / cfg.hidden_dim, **common)
    raise BenchError(f"unknown model implementation {kind!r}; choose from {', '.join(IMPLEMENTATIONS)}")


def forward_gmacs(model: str, image_size: int, num_classes: int = NUM_CLASSES) -> float:
    """GMACs of one image's forward pass of a ``models.build_model`` name, counted on the meta device."""
    from .models import build_model, forward_macs

    return forward_macs(build_model(model, image_size, num_classes, device="meta"), image_size) / 1e9


def native_bf16(device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX
    (elsewhere CPUs emulate it: a 1024 matmul ran at 0.4 GFLOP/s on an AVX2 core, against 16 in float32)."""
    from .devices import bf16_supported
    from .plan import cpu_isa

    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & set(cpu_isa()))
    return bf16_supported(device)


def precisions_for(opts: Options, device) -> tuple[str, ...]:
    """The precisions of the ceilings/train/inference sections: as asked (bf16 only where it can run at all), or
    by default fp32 and, where the device computes in bf16 natively, bf16."""
    from .devices import bf16_supported

    if opts.precisions is None:
        return ("fp32", "bf16") if native_bf16(device) else ("fp32",)
    return tuple(p for p in opts.precisions if p == "fp32" or bf16_supported(device))


def ceiling_jobs(opts: Options, device) -> list[Job]:
    import torch

    jobs = []
    n = opts.matmul_size
    for precision in precisions_for(opts, device):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        jobs.append(Job("ceilings", "matmul", precision, lambda a=a, b=b: a @ b, 0, 2.0 * n**3))
    return jobs


def model_jobs(opts: Options, device, train: bool, inference: bool) -> list[Job]:
    """Training steps and/or forward passes of each installed implementation in each precision."""
    import torch
    import torch.nn.functional as F

    from .devices import autocast

    macs = forward_gmacs(f"vit:{opts.model}", opts.image_size) * 1e9
    x = torch.randn(opts.batch_size, 3, opts.image_size, opts.image_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (opts.batch_size,), device=device)
    jobs: list[Job] = []
    for kind in opts.implementations:
        torch.manual_seed(0)
        module = build_implementation(kind, opts.model, opts.image_size, opts.attention)
        if module is None:
            continue
        module = module.to(device)
        model = torch.compile(module) if opts.compile and kind == "vit_repro" else module
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-4, foreach=True)  # as train.build_optimizer
        for precision in precisions_for(opts, device):
            if train:
                def step(model=model, module=module, optimizer=optimizer, precision=precision) -> None:
                    module.train()
                    with autocast(device, precision):
                        loss = F.cross_entropy(model(x).float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

                jobs.append(Job("train", kind, precision, step, opts.batch_size,
                                TRAIN_STEP_FLOPS_PER_FORWARD * 2 * macs * opts.batch_size))
            if inference:
                def forward(model=model, module=module, precision=precision) -> None:
                    module.eval()
                    with torch.inference_mode(), autocast(device, precision):
                        model(x)

                jobs.append(Job("inference", kind, precision, forward, opts.batch_size, 2 * macs * opts.batch_size))
        if inference and kind == "vit_repro" and "bf16" in precisions_for(opts, device):
            torch.manual_seed(0)
            half = build_implementation(kind, opts.model, opts.image_size, opts.attention).to(device, torch.bfloat16).eval()
            half = torch.compile(half) if opts.compile else half
            xb = x.to(torch.bfloat16)

            def forward_bf16_weights(half=half) -> None:
                with torch.inference_mode():
                    half(xb)

            jobs.append(Job("inference", kind, "bf16-weights", forward_bf16_weights, opts.batch_size,
                            2 * macs * opts.batch_size))
    return jobs


def throughput_sections(opts: Options, device, log: Callable[[str], None]) -> dict[str, Any]:
    """``ceilings``, ``train`` and ``inference`` (whichever are selected), timed in one round-robin loop."""
    selected = set(opts.sections)
    jobs = ceiling_jobs(opts, device) if "ceilings" in selected else []
    if {"train", "inference"} & selected:
        jobs += model_jobs(opts, device, "train" in selected, "inference" in selected)
    with tf32_off():
        times = interleaved(jobs, opts.repeats, opts.min_run_time, log)
    out: dict[str, Any] = {}
    ceilings: dict[str, dict[str, Any]] = {}
    for job in (j for j in jobs if j.section == "ceilings"):
        rounds = times[job.name]
        ceilings[job.precision] = {"round_flops": [job.flops / statistics.median(r) for r in rounds]}
        out.setdefault("ceilings", []).append(throughput_row(job, rounds, None))
    if ceilings:
        out["ceilings_gflops"] = {r["precision"]: r["gflops"] for r in out["ceilings"]}
    for job in (j for j in jobs if j.section != "ceilings"):
        ceiling = ceilings.get("fp32" if job.precision == "fp32" else "bf16")
        out.setdefault(job.section, []).append(throughput_row(job, times[job.name], ceiling))
    return out


# ------------------------------------------------------------------------------------------------ study

def load_studies(params_path: Path) -> dict[str, Any]:
    """``Params`` as each study of params.yaml resolves it (``study.name`` set to each in turn)."""
    import yaml

    from .config import ConfigError, load_params

    try:
        raw = yaml.safe_load(Path(params_path).read_text()) or {}
    except OSError:
        raise BenchError(f"{params_path} not found; pass --params or --repo") from None
    out = {}
    with tempfile.TemporaryDirectory(prefix="vit-bench-params-") as tmp:
        for name in raw.get("studies") or {}:
            path = Path(tmp) / "params.yaml"
            path.write_text(yaml.safe_dump({**raw, "study": {**(raw.get("study") or {}), "name": name}}, sort_keys=False))
            try:
                out[name] = load_params(path)
            except ConfigError as exc:
                raise BenchError(f"{params_path} with study.name {name}: {exc}") from None
    if not out:
        raise BenchError(f"{params_path} defines no `studies`")
    return out


def scratch_keys(studies: dict[str, Any], experiments: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Every distinct (model, image size, precision) of the studies' scratch arms, with a run configuration to
    measure it by (one with augmentation when any arm of that key augments) and the arms that use it."""
    from .plan import arm_runs

    keys: dict[tuple[str, int, str], dict[str, Any]] = {}
    for study, params in studies.items():
        for arm in params.scratch:
            for cfg in arm_runs(params, "scratch", arm, experiments):
                entry = keys.setdefault((cfg.model, cfg.image_size, cfg.train.precision), {"cfg": cfg, "used_by": []})
                if f"{study}/{arm}" not in entry["used_by"]:
                    entry["used_by"].append(f"{study}/{arm}")
                if cfg.augment.enabled and not entry["cfg"].augment.enabled:
                    entry["cfg"] = cfg
    return keys


def measure_scratch(cfg, used_by: list[str], device, opts: Options) -> dict[str, Any]:
    """Training img/s (the arm's batch, augmentation, optimizer, clipping; as ``train.fit`` steps) and eval img/s."""
    import torch
    import torch.nn.functional as F

    from .devices import autocast
    from .images import Augment, ImageTransform
    from .models import build_model
    from .train import build_optimizer, evaluate

    size, precision, t = cfg.image_size, cfg.train.precision, cfg.train
    torch.manual_seed(0)
    model = build_model(cfg.model, size, NUM_CLASSES, cfg.dropout).to(device)
    transform = ImageTransform(resize=(size, size))
    pixels = torch.randint(0, 256, (t.batch_size, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (t.batch_size,))
    augment = Augment(cfg.augment, (size, size), seed=0) if cfg.augment.enabled else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, t)

    def step() -> None:
        model.train()
        x = augment(pixels) if augment is not None else pixels
        x, y = transform.to_input(x.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        (loss / len(y)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip_grad_norm or math.inf)
        optimizer.step()
        loss.item(), grad_norm.item()  # fit reads both every step

    eval_pixels = torch.randint(0, 256, (opts.study_images, 3, size, size), dtype=torch.uint8)
    eval_labels = torch.randint(0, NUM_CLASSES, (opts.study_images,))

    def evaluation() -> None:
        evaluate(model, (eval_pixels, eval_labels), transform.to_input, device, NUM_CLASSES, precision)

    train_s = measure(Job("study", cfg.model, precision, step, t.batch_size, 0), opts.min_run_time)
    eval_s = measure(Job("study", cfg.model, precision, evaluation, opts.study_images, 0), opts.min_run_time)
    step_s, eval_call_s = statistics.median(train_s), statistics.median(eval_s)
    return {
        "model": cfg.model, "image_size": size, "precision": precision, "used_by": used_by,
        "batch": t.batch_size, "augment": cfg.augment.model_dump(mode="json") if augment else None,
        "optimizer": t.optimizer, "train_step_s": step_s, "train_steps_timed": len(train_s),
        "train_img_per_s": t.batch_size / step_s, "eval_images": opts.study_images, "eval_s": eval_call_s,
        "eval_calls_timed": len(eval_s), "eval_img_per_s": opts.study_images / eval_call_s,
        "forward_gmacs": forward_gmacs(cfg.model, size),
    }


def measure_features(name: str, spec, precision: str, pretrained: Path, device, opts: Options) -> dict[str, Any]:
    """Feature img/s of a backbone: its fetched weights when ``pretrained`` holds them, else random weights."""
    import torch

    from .backbone import BackboneError, extract_features, load_backbone, read_info, transform_for
    from .model import VisionTransformer, parse_model_name

    weights = None
    with contextlib.suppress(BackboneError, OSError, KeyError, ValueError):
        if read_info(pretrained)["name"] == name:
            model, _ = load_backbone(pretrained, NUM_CLASSES)
            weights = f"fetched ({pretrained})"
    if weights is None:
        torch.manual_seed(0)
        model = VisionTransformer(parse_model_name(spec.model, image_size=spec.crop, num_classes=NUM_CLASSES)).eval()
        weights = (f"random: {pretrained} does not hold {name}; the same architecture, whose cost does not depend on "
                   "the weights")
    transform = transform_for(spec)
    pixels = torch.randint(0, 256, (opts.study_images, 3, *transform.size), dtype=torch.uint8)
    times = measure(Job("study", f"vit:{spec.model}", precision,
                        lambda: extract_features(model, pixels, transform, device, precision=precision),
                        opts.study_images, 0), opts.min_run_time)
    seconds = statistics.median(times)
    return {"backbone": name, "model": f"vit:{spec.model}", "image_size": spec.crop, "precision": precision,
            "weights": weights, "images": opts.study_images, "seconds": seconds, "calls_timed": len(times),
            "img_per_s": opts.study_images / seconds}


def synthetic_features(n: int, dim: int, seed: int) -> tuple[Any, Any]:
    """Random features with class structure (class means + noise), so that a head or L-BFGS behaves as on real ones."""
    import torch

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    means = torch.randn(NUM_CLASSES, dim, generator=torch.Generator().manual_seed(1234))
    return means[labels] + 2.0 * torch.randn(n, dim, generator=g), labels


def measure_frozen_runs(params, opts: Options, device) -> dict[str, Any]:
    """One run of the first head arm (``train.fit`` for its schedule) and one of the first L-BFGS (probe) arm, on
    random features of the backbone's width: each with the final train and test evaluations a run does, on one
    thread as ``runner.run_arm`` trains frozen arms."""
    from .model import parse_model_name
    from .models import linear_head
    from .plan import arm_runs, study_sizes
    from .runner import schedule_for
    from .train import evaluate, fit, fit_logistic

    sizes = study_sizes(params, opts.repo / "data" / "splits")
    dim = parse_model_name(params.backbone.model).hidden_dim
    test = synthetic_features(sizes.test, dim, seed=1)
    out: dict[str, Any] = {}
    identity = lambda x: x  # noqa: E731
    for arm in params.frozen:
        cfg = arm_runs(params, "frozen", arm, opts.experiments)[0]
        kind = "probe" if cfg.train.optimizer == "lbfgs" else "head"
        if kind in out:
            continue
        n = sizes.train[cfg.train_set]
        train = synthetic_features(n, dim, seed=0)
        schedule = schedule_for(cfg, n)

        def one_run(cfg=cfg, train=train, schedule=schedule, kind=kind) -> None:
            import torch

            torch.manual_seed(0)
            if kind == "probe":
                k = len(train[1])
                fold = max(NUM_CLASSES, round(params.data.validation_fraction * k))
                head, _ = fit_logistic(train, (train[0][:fold], train[1][:fold]), (train[0][fold:], train[1][fold:]),
                                       tuple(cfg.train.c_grid), NUM_CLASSES)
            else:
                head = linear_head(dim, NUM_CLASSES)
                fit(head, train, test, cfg.train, schedule, 0, identity, device, NUM_CLASSES, progress=False)
            evaluate(head, test, identity, device, NUM_CLASSES, cfg.train.precision)
            evaluate(head, train, identity, device, NUM_CLASSES, cfg.train.precision)

        times = measure(Job("study", arm, cfg.train.precision, one_run, n, 0, threads=1), opts.min_run_time)
        out[kind] = {"arm": arm, "optimizer": cfg.train.optimizer, "train_set": cfg.train_set, "train_images": n,
                     "test_images": sizes.test, "dim": dim, "epochs": schedule.epochs if kind == "head" else None,
                     "seconds": statistics.median(times), "runs_timed": len(times),
                     "features": "random, with class structure", "includes": "fit and the final train and test "
                     "evaluations; not MLflow logging or writing the run's files"}
    return out


def study_section(opts: Options, device, log: Callable[[str], None]) -> dict[str, Any]:
    """What ``vit_repro.plan`` needs to estimate any study of params.yaml on this machine."""
    import torch

    from .config import load_params

    started = time.perf_counter()
    studies = load_studies(opts.params)
    keys = scratch_keys(studies, opts.experiments)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as runner.run_arm trains
    try:
        scratch = []
        for (model, size, precision), entry in keys.items():
            log(f"[bench]   study: {model} at {size} px {precision} ({', '.join(entry['used_by'])})")
            scratch.append(measure_scratch(entry["cfg"], entry["used_by"], device, opts))
        features = []
        pretrained = opts.repo / "models" / "pretrained"
        seen = set()
        for params in studies.values():
            name, precision = params.backbone_name, params.train.precision
            if (name, precision) not in seen:
                seen.add((name, precision))
                log(f"[bench]   study: features of {name} {precision}")
                features.append(measure_features(name, params.backbone, precision, pretrained, device, opts))
        log("[bench]   study: one frozen head run and one probe run")
        frozen_runs = measure_frozen_runs(load_params(opts.params), opts, device)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return {"studies": list(studies), "scratch": scratch, "features": features, "frozen_runs": frozen_runs,
            "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------- frozen

def missing_inputs(section: str, opts: Options) -> str | None:
    """Why ``section`` cannot run with ``--repo`` (None: it can)."""
    repo = opts.repo
    needs: list[str] = []
    if section in ("frozen", "data"):
        needs = ["data/splits/splits.json"]
        with contextlib.suppress(Exception):
            from .config import load_params

            needs += [f"data/prepared/{d}" for d in load_params(opts.params).data.datasets]
    if section == "frozen":
        needs += ["models/pretrained/backbone.json", "data/features/features.json", "dvc.yaml"]
    missing = [n for n in needs if not (repo / n).exists()]
    if missing:
        return (f"{repo} lacks {', '.join(missing)}: build them there first (`dvc repro "
                f"{'features' if section == 'frozen' else 'splits'}`) or pass --repo")
    if section == "frozen":
        import importlib.util

        if importlib.util.find_spec("dvc") is None:
            return "dvc is not installed in this Python environment"
        if _run(["git", "rev-parse", "--git-dir"], repo, dict(os.environ)).returncode != 0:
            return f"{repo} is not a git repository (its tracked files are what the frozen section copies)"
        from .config import load_params

        params = load_params(opts.params)
        info = json.loads((repo / "data/features/features.json").read_text())
        if info.get("backbone", {}).get("name") != params.backbone_name:
            return (f"{repo}/data/features come from backbone {info.get('backbone', {}).get('name')!r}, the study uses "
                    f"{params.backbone_name!r}: run `dvc repro features` there first")
    return None


COPIED_OUTPUTS = ("data/prepared", "data/splits", "models/pretrained", "data/features", ".cache/images")
NOT_COPIED = ("runs/", "reports/", "dvc.lock", ".cache/", "mlruns/", "mlartifacts/", "mlflow.db")


def _env(work: Path, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid",
               MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    env.pop("DVC_ROOT", None)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def copy_repo(repo: Path, dest: Path, env: dict[str, str]) -> None:
    """The working tree's files that git tracks or would track (no outputs), committed in a new git repo, plus the
    built data (``COPIED_OUTPUTS``) copied in."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], repo, env)
    if listed.returncode != 0:
        raise BenchError(f"{repo} is not a git repository ({listed.stderr.strip()[:200]}); pass --repo the project's root")
    for rel in filter(None, listed.stdout.split("\0")):
        src = repo / rel
        if rel.startswith(NOT_COPIED) or rel.startswith(COPIED_OUTPUTS) or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "vit-repro bench"]):
        proc = _run(cmd, dest, env)
        if proc.returncode != 0:
            raise BenchError(f"`{' '.join(cmd)}` failed in the benchmark's copy: {proc.stderr.strip()[-300:]}")
    for rel in COPIED_OUTPUTS:
        if (repo / rel).is_dir():
            shutil.copytree(repo / rel, dest / rel, dirs_exist_ok=True)


def grid_params(params_file: Path, grid: Grid) -> None:
    """Rewrite ``params_file`` so that frozen arm ``grid.arm`` runs exactly the grid, and nothing else changes."""
    import yaml

    raw = yaml.safe_load(params_file.read_text())
    arms = raw.get("frozen") or {}
    if grid.arm not in arms:
        raise BenchError(f"frozen_grid.arm {grid.arm!r} is not a frozen arm of {params_file.name} ({sorted(arms)})")
    arms[grid.arm] = {**arms[grid.arm], "recipes": {grid.train_set: list(grid.recipes)}, "seeds": grid.seeds}
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    proc = _run(cmd, cwd, env)
    return time.perf_counter() - start, proc


def frozen_section(opts: Options, grid: Grid, device, log: Callable[[str], None]) -> dict[str, Any]:
    """The frozen grid under ``dvc repro`` vs one feature pass under ``dvc repro``, and the seed's approach."""
    import torch
    import torch.nn.functional as F

    from .backbone import load_backbone, transform_for
    from .config import load_params, resolve_arm
    from .devices import autocast
    from .images import load_images
    from .record import RECORD_FILE
    from .runner import schedule_for
    from .splits import Subset, read_splits

    grid = Grid(grid.arm, grid.train_set, grid.recipes, opts.frozen_seeds or grid.seeds)
    runs = len(grid.recipes) * grid.seeds
    out: dict[str, Any] = {"arm": grid.arm, "train_set": grid.train_set, "recipes": list(grid.recipes),
                           "seeds": grid.seeds, "runs": runs}
    with tempfile.TemporaryDirectory(prefix="vit-bench-frozen-") as tmp:
        work = Path(tmp)
        copy, env = work / "repo", _env(work, opts.threads)
        env["VIT_REPRO_DEVICE"] = str(device)
        log(f"[bench]   frozen: copying {opts.repo} with its built data")
        copy_repo(opts.repo.resolve(), copy, env)
        grid_params(copy / "params.yaml", grid)
        params = load_params(copy / "params.yaml")
        splits = read_splits(copy / "data" / "splits")
        spec = params.backbone
        transform = transform_for(spec)
        # decoded pixels for the feature pass (untimed: the data section times decoding), as compute_features reads them
        load_images(Subset("study", splits.all_images()), copy / "data" / "prepared", transform, copy / ".cache" / "images")
        # the MLflow store's tables, untimed (9 s for a new SQLite store here): a study's store exists after its first stage
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_experiments()
        dvc = [sys.executable, "-m", "dvc", "repro", "--single-item", "--force"]

        log(f"[bench]   frozen: dvc repro train-frozen@{grid.arm} ({runs} runs)")
        grid_s, proc = _timed([*dvc, f"train-frozen@{grid.arm}"], copy, env)
        if proc.returncode != 0:
            return out | {"failed": f"dvc repro train-frozen@{grid.arm} exited {proc.returncode}: "
                                    + " ".join(proc.stderr.split())[-400:]}
        records = [json.loads(p.read_text()) for p in (copy / "runs" / grid.arm).rglob(RECORD_FILE)]
        if len(records) != runs:
            return out | {"failed": f"dvc repro train-frozen@{grid.arm} wrote {len(records)} runs, expected {runs}"}
        in_runs = sum(r["provenance"]["wall_time_s"] for r in records)

        log("[bench]   frozen: dvc repro features (one feature pass)")
        feature_s, proc = _timed([*dvc, "features"], copy, env)
        if proc.returncode != 0:
            return out | {"failed": f"dvc repro features exited {proc.returncode}: " + " ".join(proc.stderr.split())[-400:]}
        images = len(splits.all_images())

        # the seed notebook's approach: the whole backbone forward on every batch of every epoch of every run
        cfg = resolve_arm(params, "frozen", grid.arm, copy / "experiments")[0]
        subset = splits.subset(grid.train_set)
        train = load_images(subset, copy / "data" / "prepared", transform, copy / ".cache" / "images")
        model, _ = load_backbone(copy / "models" / "pretrained", NUM_CLASSES)
        model.to(device)
        optimizer = torch.optim.Adam(model.heads.parameters(), lr=cfg.train.effective_lr)
        batch, precision = cfg.train.batch_size, cfg.train.precision

        def seed_epoch() -> None:
            for i in range(0, len(train), batch):
                x = transform.to_input(train.pixels[i:i + batch].to(device, non_blocking=True))
                y = train.labels[i:i + batch].to(device, non_blocking=True)
                with autocast(device, precision):
                    loss = F.cross_entropy(model(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        log("[bench]   frozen: the seed's approach, one epoch after a warm-up epoch")
        times = measure(Job("frozen", "seed", precision, seed_epoch, len(train), 0), 0.0)
        epochs = schedule_for(cfg, len(train)).epochs
        seed_epoch_s = statistics.median(times)
    return out | {
        "backbone": params.backbone_name, "precision": params.train.precision, "device": str(device),
        "grid_s": grid_s, "per_run_s": grid_s / runs, "runs_in_process_s": in_runs,
        "stage_overhead_s": grid_s - in_runs, "feature_pass_s": feature_s, "feature_images": images,
        "grid_vs_feature_pass": grid_s / feature_s, "epochs_per_run": epochs,
        "seed_epoch_s": seed_epoch_s, "seed_epochs_timed": len(times), "seed_train_images": len(train),
        "seed_approach_s_extrapolated": seed_epoch_s * epochs * runs,
        "speedup_vs_seed": seed_epoch_s * epochs * runs / (feature_s + grid_s),
        "note": ("both dvc repro timings include DVC, a new Python process and hashing the stage's dependencies (the "
                 "MLflow store exists already, as after a study's first stage); the feature pass reads decoded "
                 "pixels (decoding is timed in the data section); the seed approach's "
                 f"{runs} x {epochs} epochs are extrapolated from {len(times)} timed epoch(s), training only (the "
                 "seed also ran the test set through the whole model every epoch)"),
    }


# ------------------------------------------------------------------------------------------------- data

def data_section(opts: Options, device, log: Callable[[str], None]) -> dict[str, Any]:
    """Seconds to deliver one epoch of a training set: decoded-tensor cache (read once per run, then batches from
    memory) against decoding the JPEGs every epoch (the seed notebook's way)."""
    import torch

    from .config import load_params
    from .images import ImageTransform, load_image, load_images, make_loader
    from .splits import read_splits

    params = load_params(opts.params)
    splits = read_splits(opts.repo / "data" / "splits")
    name = next(iter(params.data.train_sets))
    subset = splits.subset(name)
    prepared = opts.repo / "data" / "prepared"
    transform = ImageTransform(resize=(opts.image_size, opts.image_size))
    files = [prepared / i.dataset / i.file for i in subset.images]
    pin = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="vit-bench-data-") as tmp:
        cache = Path(tmp)
        images = load_images(subset, prepared, transform, cache)  # decodes and writes the cache, untimed

        def cached_epoch() -> None:
            for x, y in make_loader(images.pixels, images.labels, opts.batch_size, shuffle=True, seed=0, pin_memory=pin):
                transform.to_input(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)

        def decode_epoch() -> None:
            for start in range(0, len(files), opts.batch_size):
                batch = torch.stack([load_image(f, transform) for f in files[start:start + opts.batch_size]])
                transform.to_input(batch.to(device, non_blocking=True))

        jobs = [Job("data", "cache_read", "-", lambda: load_images(subset, prepared, transform, cache), len(files), 0),
                Job("data", "cached_epoch", "-", cached_epoch, len(files), 0),
                Job("data", "decode_epoch", "-", decode_epoch, len(files), 0)]
        times = interleaved(jobs, opts.repeats, opts.min_run_time)
    med = {job.model: statistics.median(t for r in times[job.name] for t in r) for job in jobs}
    return {"train_set": name, "images": len(files), "image_size": opts.image_size, "cache_read_s": med["cache_read"],
            "cached_epoch_s": med["cached_epoch"], "decode_epoch_s": med["decode_epoch"]}


# -------------------------------------------------------------------------------------------------- dvc

def dvc_noop(repo: Path, repeats: int) -> dict[str, Any]:
    """``dvc repro`` wall time when ``dvc status`` says every stage is up to date; else why it was skipped."""
    env = _env(Path(tempfile.gettempdir()))
    env.pop("MLFLOW_TRACKING_URI")
    dvc = [sys.executable, "-m", "dvc"]
    status = _run([*dvc, "status", "dvc.yaml", "--json"], repo, env)
    if status.returncode != 0:
        return {"skipped": f"`dvc status` failed in {repo}: {' '.join(status.stderr.split())[-300:]}"}
    changed = json.loads(status.stdout or "{}")
    if changed:
        return {"skipped": f"{len(changed)} stage(s) not up to date in {repo} (run `dvc repro` first): "
                           + ", ".join(sorted(changed)[:5])}
    times = [_timed([*dvc, "repro"], repo, env)[0] for _ in range(repeats)]
    return {"seconds": statistics.median(times), "seconds_all": times, "stages": _count_stages(repo)}


def _count_stages(repo: Path) -> int | None:
    import yaml

    lock = repo / "dvc.lock"
    return len((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.is_file() else None


# ------------------------------------------------------------------------------------------------- main

def environment(device, repo: Path) -> dict[str, Any]:
    """Date, hardware and software versions of this benchmark run."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import torchvision

    from .devices import device_name
    from .plan import cpu_isa, cpu_model, logical_cores
    from .tracking import git_state

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device), "cpu": cpu_model(), "cpu_cores": logical_cores(),
        "cpu_isa": cpu_isa(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "platform": platform.platform(),
    }
    for package in ("mlflow", "timm", "dvc"):  # without importing them (mlflow takes seconds)
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = None
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    env["git_commit"], env["git_dirty"] = git_state(repo)
    return env


def run_benchmark(opts: Options, log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
                  ) -> dict[str, Any]:
    """Run the selected sections; returns everything measured, with the targets evaluated."""
    import torch

    threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        return _run_benchmark(opts, log)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(opts: Options, log: Callable[[str], None]) -> dict[str, Any]:
    from .devices import DeviceError, resolve_device
    from .plan import machine_key, machine_slug

    targets = load_targets(opts.targets)
    try:
        device = resolve_device(opts.device)
    except DeviceError as exc:
        raise BenchError(str(exc)) from None
    skipped: dict[str, str] = {}
    for section in ("frozen", "data"):
        if section in opts.sections:
            reason = missing_inputs(section, opts)
            if reason and opts.explicit_sections:
                raise BenchError(f"section {section}: {reason}")
            if reason:
                skipped[section] = reason
                log(f"[bench] skipping {section}: {reason}")
    key = machine_key(device)
    result: dict[str, Any] = {
        "format": FORMAT, "machine": machine_slug(key), "machine_key": key, "environment": environment(device, opts.repo),
        "settings": {"model": opts.model, "batch": opts.batch_size, "image_size": opts.image_size,
                     "repeats": opts.repeats, "min_run_time_s": opts.min_run_time, "matmul_size": opts.matmul_size,
                     "attention": opts.attention, "compile": opts.compile, "study_images": opts.study_images,
                     "precisions": list(precisions_for(opts, device)), "native_bf16": native_bf16(device),
                     "targets": str(opts.targets), "grid": vars(targets.grid) | {"recipes": list(targets.grid.recipes)},
                     "timer": "torch.utils.benchmark.Timer.blocked_autorange: a warm-up call, then calls until "
                              "min_run_time; medians"},
        "sections_run": [], "skipped": skipped, "failed": {},
    }
    if {"train", "inference"} & set(opts.sections):
        result["settings"]["forward_gmacs_per_image"] = forward_gmacs(f"vit:{opts.model}", opts.image_size)
    throughput_done = False
    for section in opts.sections:
        if section in skipped:
            continue
        started = time.perf_counter()
        log(f"[bench] {section} ...")
        if section in ("ceilings", "train", "inference"):
            if not throughput_done:
                log("[bench]   ceilings, train and inference run interleaved, round by round")
                result |= throughput_sections(opts, device, log)
                throughput_done = True
        elif section == "study":
            result["study"] = study_section(opts, device, log)
        elif section == "frozen":
            try:
                result["frozen"] = frozen_section(opts, targets.grid, device, log)
            except UserError as exc:  # after other sections have run: keep their results
                result["frozen"] = {"failed": " ".join(str(exc).split())}
            if "failed" in result["frozen"]:
                result["failed"]["frozen"] = result["frozen"]["failed"]
                log(f"[bench] frozen FAILED: {result['frozen']['failed']}")
        elif section == "data":
            result["data"] = data_section(opts, device, log)
        elif section == "dvc":
            result["dvc_noop"] = dvc_noop(opts.repo, opts.repeats)
            if "skipped" in result["dvc_noop"]:
                skipped["dvc"] = result["dvc_noop"]["skipped"]
        if section not in skipped and section not in result["failed"]:
            result["sections_run"].append(section)
        log(f"[bench] {section} done in {time.perf_counter() - started:.0f} s")
    result["targets"] = evaluate_targets(result, targets)
    return result


# ----------------------------------------------------------------------------------------------- output

def _f(x: float | None, spec: str = ".3g") -> str:
    return "" if x is None else format(x, spec)


def render(result: dict[str, Any]) -> str:
    """The results as Markdown: a heading and one table per section (``tables.markdown_table``)."""
    from .tables import markdown_table

    env, s = result["environment"], result["settings"]
    head = [
        f"vit-repro bench, {env['date']}: {env['device_name']} ({env['cpu']}, {env['cpu_cores']} logical cores, "
        f"{env['torch_threads']} torch threads, {env['memory_gib']} GiB); machine `{result['machine']}`",
        f"torch {env['torch']}, torchvision {env['torchvision']}, timm {env['timm']}, mlflow {env['mlflow']}, "
        f"dvc {env['dvc']}, python {env['python']}; git {env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}",
        f"timing: {s['timer']}; {s['repeats']} interleaved rounds, min_run_time {s['min_run_time_s']:g} s",
    ]
    if "forward_gmacs_per_image" in s:
        head.append(f"train/inference: ViT-{s['model']}, batch {s['batch']}, {s['image_size']} px, "
                    f"{s['forward_gmacs_per_image']:.2f} GMACs/image forward (models.forward_macs); attention "
                    f"{s['attention']}{', torch.compile' if s['compile'] else ''}; matmuls {s['matmul_size']}²")
    if {"ceilings", "train", "inference"} & set(result["sections_run"]) and "bf16" not in s["precisions"]:
        head.append("bf16 not measured: this device has no bf16 arithmetic (it would be emulated); "
                    "`--precisions fp32 bf16` measures it anyway")
    parts = ["  \n".join(head)]

    def table(title: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            parts.append(f"**{title}**\n\n" + markdown_table(rows))

    table("matmul ceilings", [{"precision": r["precision"], "GFLOP/s": _f(r["gflops"], ".0f"),
                               "s/matmul": _f(r["seconds"], ".3g"), "calls timed": r["calls_timed"]}
                              for r in result.get("ceilings", [])])
    for section in ("train", "inference"):
        table(section, [{"model": r["model"], "precision": r["precision"], "img/s": _f(r["img_per_s"], ".3f"),
                         "s/batch": _f(r["seconds"], ".3g"), "GFLOP/s": _f(r["gflops"], ".0f"),
                         "of ceiling": "" if r["fraction_of_ceiling"] is None else f"{r['fraction_of_ceiling']:.0%}",
                         "calls timed": r["calls_timed"]} for r in result.get(section, [])])
    study = result.get("study")
    if study:
        table(f"study: scratch models of the studies {', '.join(study['studies'])} ({study['seconds']:.0f} s)", [
            {"model": r["model"], "px": r["image_size"], "precision": r["precision"], "used by": ", ".join(r["used_by"]),
             "batch": r["batch"], "augment": "yes" if r["augment"] else "no", "train img/s": _f(r["train_img_per_s"]),
             "steps timed": r["train_steps_timed"], "eval img/s": _f(r["eval_img_per_s"])} for r in study["scratch"]])
        table("study: frozen backbones' features", [
            {"backbone": r["backbone"], "model": r["model"], "precision": r["precision"], "img/s": _f(r["img_per_s"]),
             "weights": r["weights"]} for r in study["features"]])
        table("study: one frozen run", [
            {"kind": k, "arm": r["arm"], "optimizer": r["optimizer"], "images": r["train_images"], "dim": r["dim"],
             "epochs": r["epochs"] or "", "seconds": _f(r["seconds"]), "includes": r["includes"]}
            for k, r in study["frozen_runs"].items()])
    f = result.get("frozen")
    if f and "grid_s" in f:
        table("frozen: the recipe grid under dvc repro vs one feature pass", [
            {"what": f"{f['runs']} runs of `{f['arm']}` ({len(f['recipes'])} recipes x {f['seeds']} seeds, train set "
                     f"{f['train_set']}), `dvc repro train-frozen@{f['arm']}`", "seconds": _f(f["grid_s"], ".1f")},
            {"what": "… per run", "seconds": _f(f["per_run_s"], ".3g")},
            {"what": "… of which inside the runs (their wall_time_s)", "seconds": _f(f["runs_in_process_s"], ".1f")},
            {"what": f"one feature pass, `dvc repro features` ({f['feature_images']} images, {f['backbone']}, "
                     f"{f['precision']})", "seconds": _f(f["feature_pass_s"], ".1f")},
            {"what": "grid / feature pass", "seconds": f"{f['grid_vs_feature_pass']:.2f}x"},
            {"what": f"seed approach: one epoch of the whole backbone over {f['seed_train_images']} images",
             "seconds": _f(f["seed_epoch_s"], ".1f")},
            {"what": f"seed approach: {f['runs']} runs x {f['epochs_per_run']} epochs (extrapolated)",
             "seconds": _f(f["seed_approach_s_extrapolated"], ".0f")},
            {"what": "speed-up of feature pass + grid over the seed approach", "seconds": f"{f['speedup_vs_seed']:.0f}x"},
        ])
        parts.append(f["note"])
    d = result.get("data")
    if d:
        table(f"data: one epoch of training set {d['train_set']} ({d['images']} images, {d['image_size']} px)", [
            {"what": "decoded-tensor cache: read once per run", "seconds": _f(d["cache_read_s"], ".3f")},
            {"what": "decoded-tensor cache: one epoch of batches", "seconds": _f(d["cached_epoch_s"], ".3f")},
            {"what": "decoding the JPEGs every epoch (the seed's way)", "seconds": _f(d["decode_epoch_s"], ".3f")}])
    n = result.get("dvc_noop")
    if n and "seconds" in n:
        table("dvc repro, nothing to do", [{"stages": n["stages"], "seconds": _f(n["seconds"], ".1f")}])
    notes = [f"- {k}: skipped: {v}" for k, v in result.get("skipped", {}).items()]
    notes += [f"- {k}: FAILED: {v}" for k, v in result.get("failed", {}).items()]
    if notes:
        parts.append("\n".join(notes))
    table(f"targets ({result['settings']['targets']})", [
        {"target": t["target"], "value": _f(t["value"]), "needed": f"{'>=' if t['bound'] == 'at_least' else '<='} "
         f"{t['threshold']:g}", "met": {True: "yes", False: "NO", None: "not measured"}[t["met"]], "detail": t["detail"]}
        for t in result.get("targets", [])])
    return "\n\n".join(parts) + "\n"


def write_results(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = out.with_suffix(".md")
    md.write_text(render(result))
    return out, md


def main(argv: list[str] | None = None) -> int:
    """``vit-repro bench [options]``: 0 when every selected section ran, 1 if one failed, 2 on bad input."""
    try:
        opts = parse_options(list(sys.argv[1:] if argv is None else argv))
        result = run_benchmark(opts)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(render(result))
    if opts.out is not None:
        json_path, md_path = write_results(result, opts.out)
        print(f"results -> {json_path}, {md_path}", file=sys.stderr)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
