"""Does bfloat16 autocast change what a run learns? The same runs in float32 and in bfloat16.

Each (backbone, precision, seed) is a real training run (``vit_repro.train.run``: the study's data,
schedule and logging), so each records its precision in run.json and in MLflow; the runs go to a
temporary MLflow store unless ``--tracking-uri`` names one.

* ``scratch``: the study's scratch model (cpu-small: ViT-Ti/16) trained from random initialisation.
* ``frozen``: the study's pretrained backbone (cpu-small: the local ViT-S/14 DINOv2 checkpoint); its
  features are extracted once per precision (timed), then the linear head is trained on them.

Prints per-run results, mean ± sd of the test accuracy per precision and a Welch t-test of the
difference; ``--json`` also writes them.

    python benchmarks/precision.py --study cpu-small --recipe baseline --seeds 0 1 2 \\
        --json benchmarks/results/precision-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file
from scipy import stats

from vit_repro.backbone import FEATURES_FILE, compute_features, fetch
from vit_repro.config import load_params, resolve_run
from vit_repro.train import resolve_device, run

PRECISIONS = ("fp32", "bf16")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--experiments", type=Path, default=Path("experiments"))
    parser.add_argument("--study", default="cpu-small", help="entry of params.yaml `studies` (default cpu-small)")
    parser.add_argument("--backbones", nargs="+", default=["scratch", "frozen"], choices=["scratch", "frozen"])
    parser.add_argument("--recipe", default="baseline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--prepared", type=Path, default=None, help="default data/prepared/<data.dataset>")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store for the runs (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    params = params.model_copy(update={"study": params.study.model_copy(update={"name": args.study})})
    prepared = args.prepared or Path("data/prepared") / params.data.dataset
    result: dict = {"study": args.study, "recipe": args.recipe, "seeds": args.seeds}
    with tempfile.TemporaryDirectory(prefix="vit-precision-") as tmp:
        work = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri or f"sqlite:///{work}/mlflow.db"
        features: dict[str, Path] = {}
        if "frozen" in args.backbones:
            result["features"] = extract_both(params, prepared, work, features)
        for backbone in args.backbones:
            rows = []
            for precision in PRECISIONS:
                for seed in args.seeds:
                    cfg = resolve_run(params, backbone, args.recipe, seed, args.experiments)
                    update = {"precision": precision, "checkpoint": False}
                    if args.epochs is not None:
                        update["epochs"] = args.epochs
                    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})
                    out = work / backbone / precision / f"seed{seed}"
                    metrics = run(cfg, prepared, out, features_dir=features.get(precision), progress=False)
                    recorded = json.loads((out / "run.json").read_text())["provenance"]["precision"]
                    if recorded != precision:
                        raise RuntimeError(f"{out}/run.json records precision {recorded!r}, the run used {precision!r}")
                    rows.append({"precision": precision, "recorded_precision": recorded, "seed": seed,
                                 **{k: metrics[k] for k in ("test_acc", "test_loss", "train_loss", "train_images_per_s",
                                                            "wall_time_s")}})
                    print(f"{backbone} {precision} seed {seed}: test acc {metrics['test_acc']:.4f}, test loss "
                          f"{metrics['test_loss']:.4f}, train loss {metrics['train_loss']:.4f}, "
                          f"{metrics['train_images_per_s']:.1f} train img/s", flush=True)
            result[backbone] = {"model": cfg.model, "epochs": cfg.train.epochs, "runs": rows, **compare(rows)}

    print_summary(result, args.backbones)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def extract_both(params, prepared: Path, work: Path, features: dict[str, Path]) -> dict:
    """The study's frozen backbone's features in each precision: seconds and largest difference."""
    name = params.preset.frozen_backbone
    fetch(params.backbones[name], name, work / "pretrained", root=Path("."))
    device = resolve_device(params.train.device)
    seconds = {}
    for precision in PRECISIONS:
        features[precision] = work / f"features-{precision}"
        start = time.perf_counter()
        compute_features(work / "pretrained", prepared, features[precision], device, work / "cache", precision=precision)
        seconds[precision] = time.perf_counter() - start  # the first includes decoding the JPEGs into the cache
    a, b = (load_file(features[p] / FEATURES_FILE) for p in PRECISIONS)
    diff = max((a[k] - b[k]).abs().max().item() for k in a if k.endswith("_features"))
    scale = max(a[k].abs().max().item() for k in a if k.endswith("_features"))
    return {"backbone": name, "seconds": seconds, "max_abs_diff": diff, "max_abs_feature": scale}


def compare(rows: list[dict]) -> dict:
    acc = {p: [r["test_acc"] for r in rows if r["precision"] == p] for p in PRECISIONS}
    welch = stats.ttest_ind(acc["bf16"], acc["fp32"], equal_var=False) if len(acc["fp32"]) > 1 else None
    return {
        "summary": {p: {"mean_test_acc": statistics.fmean(a), "sd_test_acc": statistics.stdev(a) if len(a) > 1 else None,
                        "mean_train_images_per_s": statistics.fmean(r["train_images_per_s"] for r in rows
                                                                    if r["precision"] == p)}
                    for p, a in acc.items()},
        "bf16_minus_fp32": statistics.fmean(acc["bf16"]) - statistics.fmean(acc["fp32"]),
        "welch_p": None if welch is None or math.isnan(welch.pvalue) else float(welch.pvalue),
    }


def print_summary(result: dict, backbones: list[str]) -> None:
    if "features" in result:
        f = result["features"]
        print(f"\nfeatures of {f['backbone']}: fp32 {f['seconds']['fp32']:.1f}s (with JPEG decoding), "
              f"bf16 {f['seconds']['bf16']:.1f}s; max |difference| {f['max_abs_diff']:.3g} (max |feature| {f['max_abs_feature']:.3g})")
    for backbone in backbones:
        r = result[backbone]
        print(f"\n{backbone} {r['model']}, recipe {result['recipe']}, {r['epochs']} epochs, seeds {result['seeds']}")
        print(f"{'precision':<10} {'test acc (mean ± sd)':>22} {'train img/s':>12}")
        for p, s in r["summary"].items():
            sd = f"{s['sd_test_acc']:.4f}" if s["sd_test_acc"] is not None else "n/a"
            print(f"{p:<10} {s['mean_test_acc']:>13.4f} ± {sd:<6} {s['mean_train_images_per_s']:>12.2f}")
        p_text = "n/a" if r["welch_p"] is None else f"{r['welch_p']:.3f}"
        print(f"bf16 - fp32: {r['bf16_minus_fp32']:+.4f} (Welch t-test p = {p_text})")


if __name__ == "__main__":
    main()
