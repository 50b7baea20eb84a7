"""``vit-repro bench``: options, the machine and versions, the targets, the tables, the results files."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .estimate import RESULTS_DIR, machine_key, machine_slug
from .measure import IMPLEMENTATIONS, BenchError

SECTIONS = ("study", "compare")
PRECISIONS = ("fp32", "bf16")
FORMAT = "vit-repro-bench/3"
METRICS = (*(f"train_{p}_vs_torchvision" for p in PRECISIONS), *(f"train_{p}_fraction_of_ceiling" for p in PRECISIONS),
           "study_section_seconds")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (main), instead of usage + message
        raise BenchError(f"{message}; see `vit-repro bench --help`")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vit-repro bench", description="Measure what the study costs on this machine "
                "(benchmarks/README.md). Speeds are printed and compared with the targets, never asserted.")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), metavar="S", help="study and/or compare (default both)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--out", type=Path, metavar="X.json", help=f"write the results there and the tables as X.md "
                   f"(the estimates read {RESULTS_DIR}/*.json)")
    p.add_argument("--repo", type=Path, default=Path("."), help="project whose params, recipes, splits and backbone to use")
    p.add_argument("--params", type=Path, help="default: <repo>/params.yaml (every study in it is measured)")
    p.add_argument("--experiments", type=Path, help="default: <repo>/experiments")
    p.add_argument("--targets", type=Path, help="default: <repo>/benchmarks/targets.yaml when it exists")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds each timing runs after its warm-up call "
                   "(default 1; a slower call is timed once)")
    p.add_argument("--study-images", type=int, default=32, help="images per evaluation / feature call in study (32)")
    p.add_argument("--model", default="B/16", help="compare: the ViT compared (default B/16)")
    p.add_argument("--batch-size", type=int, default=32, help="compare: batch (default 32, the study's; 8 is 4x quicker)")
    p.add_argument("--image-size", type=int, default=224, help="compare: image size (default 224)")
    p.add_argument("--models", nargs="+", default=list(IMPLEMENTATIONS), metavar="IMPL",
                   help=f"compare: {', '.join(IMPLEMENTATIONS)} (timm only when installed)")
    p.add_argument("--precisions", nargs="+", metavar="P", help="compare: fp32 and/or bf16 (default fp32, and bf16 "
                   "where the device computes in bf16: GPUs that support it, CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--repeats", type=int, default=1, help="compare: round-robin rounds (default 1)")
    p.add_argument("--matmul-size", type=int, default=2048, help="compare: side of the ceiling's square matmuls (2048)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return p


def parse_options(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    for name, choices in (("sections", SECTIONS), ("models", IMPLEMENTATIONS), ("precisions", PRECISIONS)):
        bad = [v for v in getattr(args, name) or () if v not in choices]
        if bad:
            raise BenchError(f"unknown --{name} {', '.join(bad)}; choose from {', '.join(choices)}")
    for name in ("study_images", "batch_size", "image_size", "repeats", "matmul_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.min_run_time < 0:
        raise BenchError(f"--min-run-time must be >= 0, got {args.min_run_time}")
    args.params = args.params or args.repo / "params.yaml"
    args.experiments = args.experiments or args.repo / "experiments"
    if args.targets is None and (args.repo / "benchmarks" / "targets.yaml").is_file():
        args.targets = args.repo / "benchmarks" / "targets.yaml"
    if args.out is not None:
        _check_writable(args.out)
    return args


def _check_writable(out: Path) -> None:
    fix = f"pass --out a writable X.json, e.g. {RESULTS_DIR}/<machine>.json"
    if out.suffix != ".json":
        raise BenchError(f"--out {out}: not a .json file (the tables go beside it as .md); {fix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"--out {out}: cannot create {out.parent} ({exc.strerror}); {fix}") from None
    if not os.access(out.parent, os.W_OK) or any(p.exists() and not os.access(p, os.W_OK)
                                                 for p in (out, out.with_suffix(".md"))):
        raise BenchError(f"--out {out}: not writable; {fix}")


def load_targets(path: Path | None) -> dict[str, dict[str, Any]]:
    """``targets: {metric: {at_least | at_most: number, about: text}}``; every problem is one error."""
    import yaml

    if path is None:
        return {}
    if not path.is_file():
        raise BenchError(f"targets file {path} not found; pass --targets benchmarks/targets.yaml or leave it out")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BenchError(f"{path} is not valid YAML ({' '.join(str(exc).split())})") from None
    targets = doc.get("targets") if isinstance(doc, dict) else None
    if not isinstance(targets, dict):
        raise BenchError(f"{path} must be a mapping with `targets` (metric -> bound)")
    out = {}
    for metric, spec in targets.items():
        if metric not in METRICS:
            raise BenchError(f"{path}: unknown metric {metric!r}; bench computes {', '.join(METRICS)}")
        bounds = [k for k in ("at_least", "at_most") if k in (spec if isinstance(spec, dict) else {})]
        if len(bounds) != 1 or isinstance(spec[bounds[0]], bool) or not isinstance(spec[bounds[0]], (int, float)) \
                or set(spec) - {"at_least", "at_most", "about"}:
            raise BenchError(f"{path}: targets.{metric} needs exactly one numeric at_least or at_most (and an about)")
        out[metric] = {"bound": bounds[0], "threshold": float(spec[bounds[0]]), "about": str(spec.get("about", ""))}
    return out


def metrics(result: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """Every metric the results allow: (value, how it was computed)."""
    out = {}
    if "study" in result:
        out["study_section_seconds"] = (result["study"]["seconds"], "the study section's own run time")
    rows = {(r["model"], r["precision"], r["what"]): r for r in (result.get("compare") or {}).get("rows", [])}
    for p in PRECISIONS:
        ours, tv = rows.get(("vit_repro", p, "train")), rows.get(("torchvision", p, "train"))
        if ours and tv:
            out[f"train_{p}_vs_torchvision"] = (ours["img_per_s"] / tv["img_per_s"],
                                                f"{ours['img_per_s']:.3g} vs {tv['img_per_s']:.3g} img/s")
        if ours:
            out[f"train_{p}_fraction_of_ceiling"] = (ours["of_ceiling"], f"{ours['gflops']:.0f} GFLOP/s")
    return out


def judge(result: dict[str, Any], targets: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    values = metrics(result)
    out = []
    for metric, t in targets.items():
        value, detail = values.get(metric, (None, "not measured: its section did not run"))
        met = None if value is None else (value >= t["threshold"] if t["bound"] == "at_least" else value <= t["threshold"])
        out.append({"target": metric, **t, "value": value, "met": met, "detail": detail})
    return out


def environment(device, repo: Path) -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from ..core.devices import device_name
    from ..core.provenance import git_state
    from .estimate import cpu_isa, cpu_model, logical_cores

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
           "device_name": device_name(device), "cpu": cpu_model(), "cpu_cores": logical_cores(), "cpu_isa": cpu_isa(),
           "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "platform": platform.platform(),
           "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    for package in ("torch", "torchvision", "timm"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = None
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    env["git_commit"], env["git_dirty"] = git_state(repo)
    return env


def run_benchmark(args: argparse.Namespace, log=lambda line: print(line, file=sys.stderr, flush=True)) -> dict[str, Any]:
    import torch

    from ..core.devices import bf16_supported, resolve_device
    from .measure import compare_section, native_bf16, study_section

    targets = load_targets(args.targets)
    device = resolve_device(args.device)
    if args.precisions is None:
        args.precisions = ["fp32", "bf16"] if native_bf16(device) else ["fp32"]
    elif "bf16" in args.precisions and not bf16_supported(device):
        raise BenchError(f"{device} does not support bf16; pass --precisions fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        key = machine_key(device)
        result: dict[str, Any] = {"format": FORMAT, "machine": machine_slug(key), "machine_key": key,
                                  "environment": environment(device, args.repo), "native_bf16": native_bf16(device),
                                  "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                  "sections_run": []}
        for section in (s for s in SECTIONS if s in args.sections):
            started = time.perf_counter()
            result[section] = (study_section if section == "study" else compare_section)(args, device, log)
            result["sections_run"].append(section)
            log(f"[bench] {section} done in {time.perf_counter() - started:.0f} s")
    finally:
        torch.set_num_threads(threads)
    result["targets"] = judge(result, targets)
    return result


def render(result: dict[str, Any]) -> str:
    """The results as Markdown: the machine, then one table per part."""
    from ..tables import markdown_table

    env, f = result["environment"], (lambda x, spec=".3g": "" if x is None else format(x, spec))
    parts = [f"vit-repro bench, {env['date']}, machine `{result['machine']}`: {env['device_name']}; {env['cpu']}, "
             f"{env['cpu_cores']} logical cores, {'/'.join(env['cpu_isa']) or 'no AVX2'}, {env['memory_gib']} GiB; "
             f"{env['torch_threads']} torch threads  \ntorch {env['torch']}, torchvision {env['torchvision']}, timm "
             f"{env['timm']}, python {env['python']}; git {env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}"
             f"  \nTimer.blocked_autorange, min_run_time {result['settings']['min_run_time']:g} s; medians"]

    def table(title: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            parts.append(f"**{title}**\n\n" + markdown_table(rows))

    if s := result.get("study"):
        table(f"study: scratch models of the studies {', '.join(s['studies'])} ({s['seconds']:.0f} s)", [
            {"model": r["model"], "px": r["image_size"], "precision": r["precision"], "used by": ", ".join(r["used_by"]),
             "batch": r["batch"], "augment": "yes" if r["augment"] else "no", "train img/s": f(r["train_img_per_s"]),
             "steps timed": r["train_steps_timed"], "eval img/s": f(r["eval_img_per_s"])} for r in s["scratch"]])
        table("study: frozen backbones' features", [
            {"backbone": r["backbone"], "model": r["model"], "precision": r["precision"], "img/s": f(r["img_per_s"]),
             "weights": r["weights"]} for r in s["features"]])
        table("study: one frozen run", [
            {"kind": k, "arm": r["arm"], "optimizer": r["optimizer"], "images": r["train_images"], "dim": r["dim"],
             "epochs": r["epochs"] or "", "seconds": f(r["seconds"]), "includes": r["includes"]}
            for k, r in s["frozen_runs"].items()])
    if c := result.get("compare"):
        table(f"compare: {c['model']}, batch {c['batch']}, {c['image_size']} px ({c['forward_gmacs']:.2f} GMACs/image; "
              f"a training step counts 3 forwards), and {c['matmul_size']}² matmuls", [
                  {"model": r["model"], "precision": r["precision"], "what": r["what"], "img/s": f(r["img_per_s"]),
                   "s/call": f(r["seconds"]), "GFLOP/s": f(r["gflops"], ".0f"), "of ceiling": f"{r['of_ceiling']:.0%}",
                   "calls timed": r["calls_timed"], "slowest/fastest": f(max(r["seconds_all"]) / min(r["seconds_all"]),
                                                                          ".2f")} for r in c["rows"]])
    table("targets (printed, never asserted)", [
        {"target": t["target"], "value": f(t["value"]), "needed": f"{'>=' if t['bound'] == 'at_least' else '<='} "
         f"{t['threshold']:g}", "met": {True: "yes", False: "NO", None: "not measured"}[t["met"]], "detail": t["detail"]}
        for t in result["targets"]])
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``vit-repro bench [options]``: 0, or 2 with one ``error:`` line on bad input."""
    try:
        args = parse_options(list(sys.argv[1:] if argv is None else argv))
        result = run_benchmark(args)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(render(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(render(result))
        print(f"results -> {args.out}, {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0
