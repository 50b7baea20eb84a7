"""The targets file (``benchmarks/targets.yaml``): the metrics it can name, the frozen grid, and evaluating
the targets against a benchmark's results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .options import BenchError


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
