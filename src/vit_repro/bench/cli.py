"""``vit-repro bench``'s command line: parsing the options and ``main``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import UserError
from .options import IMPLEMENTATIONS, PRECISIONS, SECTIONS, BenchError, Options
from .output import render, write_results
from .run import run_benchmark


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
    from ..core.model import ATTENTION_KERNELS

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
