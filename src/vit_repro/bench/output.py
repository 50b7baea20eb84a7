"""The results as Markdown tables (printed, and written beside the JSON by ``--out``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _f(x: float | None, spec: str = ".3g") -> str:
    return "" if x is None else format(x, spec)


def render(result: dict[str, Any]) -> str:
    """The results as Markdown: a heading and one table per section (``tables.markdown_table``)."""
    from ..tables import markdown_table

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
