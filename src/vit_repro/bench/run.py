"""Running the selected sections in order, with the environment (date, hardware, versions) of the run and the
targets evaluated."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .data import data_section, dvc_noop
from .frozen import frozen_section
from .options import FORMAT, BenchError, Options
from .repo import missing_inputs
from .study import study_section
from .targets import evaluate_targets, load_targets
from .throughput import forward_gmacs, native_bf16, precisions_for, throughput_sections


def environment(device, repo: Path) -> dict[str, Any]:
    """Date, hardware and software versions of this benchmark run."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import torchvision

    from ..core.devices import device_name
    from ..plan import cpu_isa, cpu_model, logical_cores
    from ..core.provenance import git_state

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
    from ..core.devices import DeviceError, resolve_device
    from ..plan import machine_key, machine_slug

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
