"""How long a study takes here: every arm's runs at the throughput ``vit-repro bench --sections study`` measured.

Nothing is guessed. The numbers come from the results file in ``benchmarks/results`` whose ``machine_key``
is this machine's (device type; for a CPU its model and logical core count, for a GPU its name), the newest
one if several match. Per run of a scratch arm::

    seconds = images trained / train img/s + images evaluated / eval img/s
    images trained   = schedule.total_steps x effective batch            (core.run.schedule_for)
    images evaluated = test set x test evaluations (every eval_every epochs and the last) + test + train set

for the run's (model, image size, precision). A frozen run costs the measured seconds per run (the
``frozen`` section's, measured under ``dvc repro`` with MLflow logging, when the file has it; else the
``study`` section's head or probe run), and the ``features`` stage the study's images / the backbone's
feature img/s. Where no file matches, or the file lacks a (model, size, precision), the line says so and
names the command that measures it.

Cheap to call (every train stage does): it reads JSON and ``data/splits/splits.json`` and imports nothing
heavier than what resolving the study's configurations already imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("benchmarks/results")
SPLITS_DIR = Path("data/splits")
PREFIX = "estimate:"


# --------------------------------------------------------------------------------------------- machine

def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if platform.system() == "Darwin":
        with contextlib.suppress(OSError):
            import subprocess

            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
    return platform.processor() or platform.machine() or "unknown"


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what decides a CPU's matmul kernels


def cpu_isa() -> list[str]:
    """The CPU's vector and matrix extensions that decide its matmul speed (Linux; else empty): a CPU model name
    such as "AMD EPYC" covers generations with and without bf16 instructions, 400x apart in bf16 matmuls."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in ISA_FLAGS if f in flags]
    return []


def logical_cores() -> int:
    """Logical cores this process may run on (its CPU affinity where the OS has one)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_key(device: Any) -> dict[str, Any]:
    """What makes two benchmark results comparable: the device type and, for a CPU, its model, logical cores and
    matmul instruction sets (``cpu_isa``); for a CUDA GPU its name; for other devices the host's machine and
    processor."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind == "cpu":
        return {"device_type": "cpu", "cpu_model": cpu_model(), "logical_cores": logical_cores(), "isa": cpu_isa()}
    if kind == "cuda":
        import torch

        return {"device_type": "cuda", "gpu_name": torch.cuda.get_device_name(device)}
    return {"device_type": kind, "machine": platform.machine(), "processor": platform.processor() or cpu_model()}


def machine_slug(key: dict[str, Any]) -> str:
    """A file name for a machine's results: ``cpu-2core``, ``cuda-nvidia-h200``, ``mps-arm64``."""
    if key["device_type"] == "cpu":
        return f"cpu-{key['logical_cores']}core"
    name = key.get("gpu_name") or key.get("machine") or ""
    return "-".join(filter(None, [key["device_type"], re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")]))


def describe_machine(key: dict[str, Any]) -> str:
    if key["device_type"] == "cpu":
        return f"cpu {key['cpu_model']}, {key['logical_cores']} logical cores, {'/'.join(key['isa']) or 'no AVX2'}"
    return ", ".join(str(v) for v in key.values())


def find_results(key: dict[str, Any], results_dir: Path = RESULTS_DIR) -> tuple[Path, dict[str, Any]] | None:
    """The newest results file in ``results_dir`` measured on a machine with this key that has a study section."""
    found = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("machine_key") == key and isinstance(doc.get("study"), dict):
            found.append((str(doc.get("environment", {}).get("date", "")), path, doc))
    if not found:
        return None
    _, path, doc = max(found, key=lambda f: (f[0], str(f[1])))
    return path, doc


def measure_command(key: dict[str, Any], results_dir: Path = RESULTS_DIR) -> str:
    return f"`vit-repro bench --sections study --out {Path(results_dir) / machine_slug(key)}.json`"


# ----------------------------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class Sizes:
    """Image counts the estimate needs: each training set, the test set and every image of the study."""

    train: dict[str, int]
    test: int
    everything: int
    note: str = ""  # set when the counts are upper bounds (splits not built yet)


def study_sizes(params: Any, splits_dir: Path = SPLITS_DIR) -> Sizes:
    """From ``splits.json`` when it is built; otherwise from the published archive counts (upper bounds)."""
    path = Path(splits_dir) / "splits.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        doc = json.loads(path.read_text())
        train = {k: len(v["images"]) for k, v in doc["train_sets"].items()}
        test = len(doc["test"]["images"])
        everything = len({row[2] for s in (doc["test"], *doc["train_sets"].values()) for row in s["images"]})
        return Sizes(train, test, everything)
    from .core.dataset import dataset_spec

    data = params.data
    train = {name: dataset_spec(ds).total("train") for name, ds in data.train_sets.items()}
    test = sum(dataset_spec(ds).total("test") for ds in data.test_from)
    return Sizes(train, test, sum(train.values()) + test,
                 note=f"at most: {path} is not built yet, so image counts are the archives' (run `dvc repro splits`)")


# -------------------------------------------------------------------------------------------- estimate

def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def scratch_row(study: dict[str, Any], model: str, image_size: int, precision: str) -> dict[str, Any] | None:
    return next((r for r in study.get("scratch", []) if (r.get("model"), r.get("image_size"), r.get("precision"))
                 == (model, image_size, precision)), None)


def features_row(study: dict[str, Any], backbone: str, precision: str) -> dict[str, Any] | None:
    return next((r for r in study.get("features", [])
                 if (r.get("backbone"), r.get("precision")) == (backbone, precision)), None)


def evaluations(epochs: int, eval_every: int) -> int:
    """Test-set evaluations during training: every ``eval_every`` epochs and after the last (train.fit)."""
    return epochs // eval_every + (1 if epochs % eval_every else 0)


@dataclass
class _Stage:
    name: str
    runs: int
    seconds: float | None  # None: not benchmarked
    detail: str


def _scratch(name: str, runs: list, sizes: Sizes, study: dict[str, Any], source: str) -> _Stage:
    from .core.run import schedule_for

    trained = evaluated = 0.0
    seconds = 0.0
    rates: dict[tuple, tuple[float, float]] = {}
    for cfg in runs:
        key = (cfg.model, cfg.image_size, cfg.train.precision)
        row = scratch_row(study, *key)
        if row is None:
            return _Stage(name, len(runs), None, f"no benchmark of {cfg.model} at {cfg.image_size} px "
                                                 f"{cfg.train.precision} in {source}")
        n = sizes.train[cfg.train_set]
        schedule = schedule_for(cfg, n)
        seen = schedule.total_steps * cfg.train.effective_batch
        evals = evaluations(schedule.epochs, cfg.train.eval_every) * sizes.test + sizes.test + n
        seconds += seen / row["train_img_per_s"] + evals / row["eval_img_per_s"]
        trained, evaluated = trained + seen, evaluated + evals
        rates[key] = (row["train_img_per_s"], row["eval_img_per_s"])
    if len(rates) == 1:
        (train_rate, eval_rate), = rates.values()
        detail = (f"{trained:,.0f} images trained at {train_rate:.3g} img/s + {evaluated:,.0f} evaluated at "
                  f"{eval_rate:.3g} img/s")
    else:
        detail = f"{trained:,.0f} images trained + {evaluated:,.0f} evaluated at {len(rates)} measured rates"
    return _Stage(name, len(runs), seconds, detail)


def _frozen(name: str, runs: list, results: dict[str, Any], source: str) -> _Stage:
    study, frozen = results["study"], results.get("frozen") or {}
    seconds = 0.0
    used = set()
    for cfg in runs:
        if cfg.train.optimizer == "lbfgs":
            row, what = (study.get("frozen_runs") or {}).get("probe"), "probe run (fit only)"
        elif frozen.get("per_run_s"):
            row, what = {"seconds": frozen["per_run_s"]}, "head run under dvc repro, MLflow included"
        else:
            row, what = (study.get("frozen_runs") or {}).get("head"), "head run (fit only, without MLflow logging)"
        if not row or not row.get("seconds"):
            return _Stage(name, len(runs), None, f"no benchmark of a frozen {cfg.train.optimizer} run in {source}")
        seconds += row["seconds"]
        used.add(f"{row['seconds']:.3g} s per {what}")
    return _Stage(name, len(runs), seconds, "; ".join(sorted(used)))


def _features(params: Any, sizes: Sizes, study: dict[str, Any], source: str) -> _Stage:
    precision = params.train.precision
    row = features_row(study, params.backbone_name, precision)
    if row is None:
        return _Stage("features", 0, None, f"no benchmark of backbone {params.backbone_name} {precision} features "
                                           f"in {source}")
    return _Stage("features", 0, sizes.everything / row["img_per_s"],
                  f"{sizes.everything} images at {row['img_per_s']:.3g} img/s")


def arm_runs(params: Any, kind: str, arm: str, experiments: str | Path) -> list:
    """The runs of an arm, as ``config.resolve_arm`` gives them, but each (train set, recipe) resolved once: its
    seeds differ in nothing that costs time (resolving validates a model per run, which is not free)."""
    from .core.config import resolve_run

    cfg = params.arm(kind, arm)
    return [run for train_set, recipes in cfg.recipes.items() for recipe in recipes
            for run in [resolve_run(params, kind, arm, train_set, recipe, 0, experiments)] * cfg.seeds]


def estimate_lines(params: Any, experiments: str | Path, arms: list[str] | None = None,
                   results_dir: Path = RESULTS_DIR, splits_dir: Path = SPLITS_DIR) -> list[str]:
    """The estimated time of the selected study (or only ``arms``), per stage and in total, as printable lines.

    ``arms`` None: every arm of the study, plus the ``features`` stage when the study has frozen arms.
    """
    from .core.config import KINDS
    from .core.devices import DeviceError, resolve_device

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
    if found is None:
        return [f"{PREFIX} no benchmark of this machine ({describe_machine(key)}) in {results_dir}; measure it "
                f"with {measure_command(key, results_dir)} (a few minutes)"]
    path, results = found
    date = str(results.get("environment", {}).get("date", "unknown date"))[:10]
    source = f"{path}, measured {date}"
    sizes = study_sizes(params, splits_dir)

    stages: list[_Stage] = []
    if arms is None and params.frozen:
        stages.append(_features(params, sizes, results["study"], str(path)))
    for (kind, arm), these in runs.items():
        if kind == "scratch":
            stages.append(_scratch(f"train-scratch@{arm}", these, sizes, results["study"], str(path)))
        else:
            stages.append(_frozen(f"train-frozen@{arm}", these, results, str(path)))

    lines = []
    for stage in stages:
        what = f"{stage.name} {stage.runs} runs" if stage.runs else stage.name
        if stage.seconds is None:
            lines.append(f"{PREFIX} {what}: {stage.detail}; measure it with {measure_command(key, results_dir)}")
        else:
            lines.append(f"{PREFIX} {what} ≈ {format_duration(stage.seconds)}: {stage.detail} ({source})")
    if len(stages) > 1:
        known = [s for s in stages if s.seconds is not None]
        total = format_duration(sum(s.seconds for s in known)) if known else None
        if len(known) == len(stages):
            lines.append(f"{PREFIX} total ≈ {total} for {len(stages)} stages ({source})")
        elif known:
            lines.append(f"{PREFIX} total unknown: {len(stages) - len(known)} stage(s) not benchmarked; the other "
                         f"{len(known)} ≈ {total}")
        else:
            lines.append(f"{PREFIX} total unknown: no stage benchmarked")
    if sizes.note:
        lines.append(f"{PREFIX} image counts {sizes.note}")
    return lines
