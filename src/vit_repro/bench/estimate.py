"""How long a study takes here: every arm's runs at the rates ``vit-repro bench`` measured on this kind of machine.

Nothing is guessed. The rates come from the results file in ``benchmarks/results`` whose ``machine_key`` is this
machine's (the newest if several are). Per scratch run, at its (model, image size, precision)::

    seconds = images trained / train img/s + images evaluated / eval img/s
    images trained   = schedule.total_steps x effective batch            (core.run.schedule_for)
    images evaluated = test set x (evaluations during training + 1) + training set

A head run costs the measured head run, a probe run the probe run, the ``features`` stage the study's images /
the backbone's feature img/s. Where no file matches, or it lacks what a stage needs, the line says so and names
the command that measures it. Cheap (every train stage calls it): JSON, ``splits.json`` and the run schedules.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("benchmarks/results")
SPLITS_DIR = Path("data/splits")
PREFIX = "estimate:"
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what decides a CPU's matmul kernels


def _cpuinfo(field: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_isa() -> list[str]:
    """The matmul-relevant extensions the CPU has (Linux; else none): one model name ("AMD EPYC") covers CPUs with
    and without bf16 instructions, two orders of magnitude apart in bf16 matmuls."""
    flags = set((_cpuinfo("flags") or "").split())
    return [f for f in ISA_FLAGS if f in flags]


def logical_cores() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_key(device: Any) -> dict[str, Any]:
    """What makes two results comparable: a CPU's model, logical cores and ``cpu_isa``; a GPU's name; else the host."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind == "cpu":
        return {"device_type": "cpu", "cpu_model": cpu_model(), "logical_cores": logical_cores(), "isa": cpu_isa()}
    if kind == "cuda":
        import torch

        return {"device_type": "cuda", "gpu_name": torch.cuda.get_device_name(device)}
    return {"device_type": kind, "machine": platform.machine(), "processor": platform.processor() or cpu_model()}


def machine_slug(key: dict[str, Any]) -> str:
    """A file name: ``cpu-2core-avx512bf16``, ``cpu-2core-avx2``, ``cuda-nvidia-h200``, ``mps-arm64``."""
    if key["device_type"] == "cpu":
        best = {"avx2": "avx2", "avx512f": "avx512", "avx512_bf16": "avx512bf16"}.get((key["isa"] or ["x"])[-1], "amx")
        return f"cpu-{key['logical_cores']}core" + (f"-{best}" if key["isa"] else "")
    name = re.sub(r"[^a-z0-9]+", "-", str(key.get("gpu_name") or key.get("machine") or "").lower()).strip("-")
    return "-".join(filter(None, [key["device_type"], name]))


def describe_machine(key: dict[str, Any]) -> str:
    if key["device_type"] == "cpu":
        return f"cpu {key['cpu_model']}, {key['logical_cores']} logical cores, {'/'.join(key['isa']) or 'no AVX2'}"
    return ", ".join(str(v) for v in key.values())


def find_results(key: dict[str, Any], results_dir: Path = RESULTS_DIR) -> tuple[Path, dict[str, Any]] | None:
    """The newest results file of ``results_dir`` measured on a machine with this key that has a study section."""
    found = []
    for path in sorted(Path(results_dir).glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            if isinstance(doc, dict) and doc.get("machine_key") == key and isinstance(doc.get("study"), dict):
                found.append((str(doc.get("environment", {}).get("date", "")), str(path), path, doc))
    return max(found, key=lambda f: f[:2])[2:] if found else None


def measure_command(key: dict[str, Any], results_dir: Path = RESULTS_DIR) -> str:
    return f"`vit-repro bench --sections study --out {Path(results_dir) / machine_slug(key)}.json`"


def study_sizes(params: Any, splits_dir: Path = SPLITS_DIR) -> tuple[dict[str, int], int, int, str]:
    """(training set sizes, test images, distinct images, note) from ``splits.json``; before it is built, the
    archives' counts, with a note that they are upper bounds."""
    path = Path(splits_dir) / "splits.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        doc = json.loads(path.read_text())
        sets = [doc["test"], *doc["train_sets"].values()]
        return ({k: len(v["images"]) for k, v in doc["train_sets"].items()}, len(doc["test"]["images"]),
                len({row[2] for s in sets for row in s["images"]}), "")
    from ..core.dataset import dataset_spec

    train = {name: dataset_spec(ds).total("train") for name, ds in params.data.train_sets.items()}
    test = sum(dataset_spec(ds).total("test") for ds in params.data.test_from)
    return train, test, sum(train.values()) + test, (f"at most: {path} is not built yet, so image counts are the "
                                                     "archives' (run `dvc repro splits`)")


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def arm_runs(params: Any, kind: str, arm: str, experiments: str | Path) -> list:
    """An arm's runs, each (train set, recipe) resolved once: its seeds differ in nothing that costs time."""
    from ..core.config import resolve_run

    cfg = params.arm(kind, arm)
    return [run for train_set, recipes in cfg.recipes.items() for recipe in recipes
            for run in [resolve_run(params, kind, arm, train_set, recipe, 0, experiments)] * cfg.seeds]


def _scratch(runs: list, sizes: tuple, study: dict[str, Any], source: str) -> tuple[float | None, str]:
    from ..core.run import schedule_for

    train_sets, test = sizes[0], sizes[1]
    seconds = trained = evaluated = 0.0
    rates = set()
    for cfg in runs:
        key = (cfg.model, cfg.image_size, cfg.train.precision)
        row = next((r for r in study.get("scratch", []) if (r["model"], r["image_size"], r["precision"]) == key), None)
        if row is None:
            return None, f"no benchmark of {cfg.model} at {cfg.image_size} px {cfg.train.precision} in {source}"
        n, schedule = train_sets[cfg.train_set], schedule_for(cfg, train_sets[cfg.train_set])
        seen = schedule.total_steps * cfg.train.effective_batch
        evals = (-(-schedule.epochs // cfg.train.eval_every) + 1) * test + n  # fit: every eval_every and the last
        seconds += seen / row["train_img_per_s"] + evals / row["eval_img_per_s"]
        trained, evaluated = trained + seen, evaluated + evals
        rates.add((row["train_img_per_s"], row["eval_img_per_s"]))
    if len(rates) > 1:
        return seconds, f"{trained:,.0f} images trained + {evaluated:,.0f} evaluated at {len(rates)} measured rates"
    (train_rate, eval_rate), = rates
    return seconds, (f"{trained:,.0f} images trained at {train_rate:.3g} img/s + {evaluated:,.0f} evaluated at "
                     f"{eval_rate:.3g} img/s")


def _frozen(runs: list, results: dict[str, Any], source: str) -> tuple[float | None, str]:
    seconds, used = 0.0, set()
    for cfg in runs:
        kind = "probe" if cfg.train.optimizer == "lbfgs" else "head"
        row, what = (results["study"].get("frozen_runs") or {}).get(kind) or {}, f"{kind} run (fit only)"
        if kind == "head" and (results.get("frozen") or {}).get("per_run_s"):  # format 2's frozen section
            row, what = {"seconds": results["frozen"]["per_run_s"]}, "head run under dvc repro, MLflow included"
        if not row.get("seconds"):
            return None, f"no benchmark of a frozen {cfg.train.optimizer} run in {source}"
        seconds += row["seconds"]
        used.add(f"{row['seconds']:.3g} s per {what}")
    return seconds, "; ".join(sorted(used))


def _features(params: Any, images: int, study: dict[str, Any], source: str) -> tuple[float | None, str]:
    name, precision = params.backbone_name, params.train.precision
    row = next((r for r in study.get("features", []) if (r["backbone"], r["precision"]) == (name, precision)), None)
    if row is None:
        return None, f"no benchmark of backbone {name} {precision} features in {source}"
    return images / row["img_per_s"], f"{images} images at {row['img_per_s']:.3g} img/s"


def estimate_lines(params: Any, experiments: str | Path, arms: list[str] | None = None,
                   results_dir: Path = RESULTS_DIR, splits_dir: Path = SPLITS_DIR) -> list[str]:
    """The estimated time of the selected study (or of ``arms`` only), per stage and in total, as printable lines.
    Every arm (``arms`` None) adds the ``features`` stage when the study has frozen arms."""
    from ..core.config import KINDS
    from ..core.devices import DeviceError, resolve_device

    selected = [(kind, arm) for kind in KINDS for arm in getattr(params, kind) if arms is None or arm in arms]
    if not selected:
        return []
    runs = {(kind, arm): arm_runs(params, kind, arm, experiments) for kind, arm in selected}
    try:
        devices = {resolve_device(cfg.train.device) for rs in runs.values() for cfg in rs}
    except DeviceError as exc:
        return [f"{PREFIX} none: {' '.join(str(exc).split())}"]
    if len(devices) > 1:
        return [f"{PREFIX} none: the arms train on {len(devices)} different devices; estimate each arm on its own"]
    key = machine_key(devices.pop())
    found = find_results(key, results_dir)
    command = measure_command(key, results_dir)
    if found is None:
        return [f"{PREFIX} no benchmark of this machine ({describe_machine(key)}) in {results_dir}; measure it "
                f"with {command} (a few minutes)"]
    path, results = found
    source = f"{path}, measured {str(results.get('environment', {}).get('date', 'unknown date'))[:10]}"
    sizes = study_sizes(params, splits_dir)
    stages: list[tuple[str, float | None, str]] = []
    if arms is None and params.frozen:
        stages.append(("features", *_features(params, sizes[2], results["study"], str(path))))
    for (kind, arm), these in runs.items():
        cost = (_scratch(these, sizes, results["study"], str(path)) if kind == "scratch"
                else _frozen(these, results, str(path)))
        stages.append((f"train-{kind}@{arm} {len(these)} runs", *cost))
    lines = [f"{PREFIX} {name}: {detail}; measure it with {command}" if seconds is None else
             f"{PREFIX} {name} ≈ {format_duration(seconds)}: {detail} ({source})" for name, seconds, detail in stages]
    if len(stages) > 1:
        known = [seconds for _, seconds, _ in stages if seconds is not None]
        total = format_duration(sum(known))
        lines.append(f"{PREFIX} total ≈ {total} for {len(stages)} stages ({source})" if len(known) == len(stages) else
                     f"{PREFIX} total unknown: {len(stages) - len(known)} stage(s) not benchmarked; the other "
                     f"{len(known)} ≈ {total}")
    if sizes[3]:
        lines.append(f"{PREFIX} image counts {sizes[3]}")
    return lines
