"""``vit-repro``: the study's command line. Each subcommand parses paths and calls one function."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PARAMS = Path("params.yaml")


def _params(args: argparse.Namespace):
    from .config import load_params

    return load_params(args.params)


def cmd_prepare(args: argparse.Namespace) -> None:
    from .data import prepare

    summary = prepare(archive=args.archive, dataset=args.dataset, out_dir=args.out)
    counts = summary["counts"]
    print(
        f"prepared {summary['dataset']}: train {counts['train']['total']}, test {counts['test']['total']} images "
        f"verified; digest {summary['digest']} -> {args.out}"
    )


def cmd_summary(args: argparse.Namespace) -> None:
    from .model import VisionTransformer, model_summary, parse_model_name

    cfg = parse_model_name(args.variant, image_size=args.image_size, num_classes=args.num_classes)
    print(model_summary(VisionTransformer(cfg), batch_size=args.batch_size, depth=args.depth))


def cmd_pretrained(args: argparse.Namespace) -> None:
    from .backbone import fetch

    params = _params(args)
    name = args.backbone or params.preset.frozen_backbone
    if name not in params.backbones:
        raise SystemExit(f"error: unknown backbone {name!r}; params.yaml defines {sorted(params.backbones)}")
    info = fetch(params.backbones[name], name, args.out, root=args.params.resolve().parent)
    print(f"pretrained backbone {info['label']}: sha256 {info['sha256'][:16]}… -> {args.out}")


def cmd_features(args: argparse.Namespace) -> None:
    from .backbone import compute_features
    from .train import resolve_device

    params = _params(args)
    prepared = args.prepared or Path("data/prepared") / params.data.dataset
    meta = compute_features(args.pretrained, prepared, args.out, resolve_device(args.device), args.cache,
                            precision=params.train.precision)
    print(f"features {meta['key']}: {meta['backbone']['label']}, dim {meta['dim']}, {meta['precision']} -> {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    nproc = int(os.environ.get("VIT_REPRO_NPROC", "1"))
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # relaunch this very command under torchrun
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        raise SystemExit(subprocess.call([*launch, "-m", "vit_repro.cli", *sys.argv[1:]]))
    from .config import resolve_run, resolve_study
    from .train import run

    params = _params(args)
    resolve_study(params, args.experiments)  # every run of the study is valid before any trains
    cfg = resolve_run(params, args.backbone, args.recipe, args.seed, args.experiments)
    prepared = args.prepared or Path("data/prepared") / params.data.dataset
    out = args.out or Path("runs") / cfg.backbone / cfg.recipe / f"seed{cfg.seed}"
    metrics = run(cfg, prepared, out, features_dir=args.features, cache_dir=args.cache, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":
        return
    print(
        f"{cfg.run_name}: test accuracy {metrics['test_acc']:.4f} ({metrics['test_correct']}/{metrics['test_images']}), "
        f"test loss {metrics['test_loss']:.4f}, {metrics['wall_time_s']:.0f}s -> {out}"
    )


def cmd_check(args: argparse.Namespace) -> None:
    from .config import resolve_study

    runs = resolve_study(_params(args), args.experiments)
    print(f"{len(runs)} runs valid: " + ", ".join(sorted({r.variant for r in runs})))


def cmd_report(args: argparse.Namespace) -> None:
    from .report import build_report

    path = build_report(args.runs, _params(args), args.out)
    print(f"report -> {path}")


def cmd_predict(args: argparse.Namespace) -> None:
    from .predict import load_predictor, plot_prediction

    if (args.run is None) == (args.weights is None):
        raise SystemExit("error: give exactly one of --run RUN_ID or --weights FOLDER")
    predictor = load_predictor(run_id=args.run, weights_dir=args.weights, pretrained_dir=args.pretrained)
    results = [predictor.predict(path) for path in args.images]
    for result in results:
        probs = ", ".join(f"{c} {p:.3f}" for c, p in result.probabilities.items())
        print(f"{result.path}: {result.label} ({probs})")
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    if args.plot:
        plot_prediction(results, args.plot)
        print(f"plot -> {args.plot}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import BenchConfig, format_tables, run_benchmark
    from .train import resolve_device

    bc = BenchConfig(
        device=resolve_device(args.device), sections=tuple(args.sections), model=args.model, batch_size=args.batch,
        image_size=args.image_size, warmup=args.warmup, repeats=args.repeats, matmul_size=args.matmul_size,
        models=tuple(args.models), seeds=tuple(args.seeds), seed_epochs=args.seed_epochs, params=args.params,
        experiments=args.experiments, prepared=args.prepared, repo=args.repo, attention=args.attention,
        compile=args.compile,
    )
    result = run_benchmark(bc, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_tables(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(format_tables(result, markdown=True))
        print(f"results -> {args.out} and {args.out.with_suffix('.md')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vit-repro",
        description="Reproduce the Vision Transformer paper's training recipe on pizza/steak/sushi, "
        "tracked with DVC and MLflow. `dvc repro` runs every stage; these commands are the stages.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def with_params(p: argparse.ArgumentParser) -> None:
        p.add_argument("--params", type=Path, default=PARAMS, help="parameters file (default: params.yaml)")
        p.add_argument("--experiments", type=Path, default=Path("experiments"), help="recipe folder (default: experiments)")

    p = add("prepare", cmd_prepare, "verify the dataset archive image by image and extract it (DVC stage `prepare`)")
    p.add_argument("--dataset", required=True, help="pizza_steak_sushi or pizza_steak_sushi_20_percent")
    p.add_argument("--archive", type=Path, required=True, help="the dataset zip")
    p.add_argument("--out", type=Path, required=True, help="prepared dataset folder")

    p = add("summary", cmd_summary, "print a ViT variant's layers with input/output shapes and parameter counts")
    p.add_argument("--variant", default="B/16", help="Table 1 name with patch size, e.g. B/16, Ti/16, L/32 (default B/16)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--depth", type=int, default=3, help="nesting depth of the table")

    p = add("pretrained", cmd_pretrained, "fetch and verify the frozen path's pretrained weights (DVC stage `pretrained`)")
    with_params(p)
    p.add_argument("--backbone", help="an entry of params.yaml `backbones` (default: the study's)")
    p.add_argument("--out", type=Path, default=Path("models/pretrained"))

    p = add("features", cmd_features, "compute the frozen backbone's features of every image once (DVC stage `features`)")
    with_params(p)
    p.add_argument("--pretrained", type=Path, default=Path("models/pretrained"))
    p.add_argument("--prepared", type=Path, help="prepared dataset (default: data/prepared/<data.dataset>)")
    p.add_argument("--out", type=Path, default=Path("data/features"))
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", type=Path, default=Path(".cache/tensors"), help="decoded-image cache folder")

    p = add("train", cmd_train, "train one (backbone, recipe, seed) and log it to MLflow (DVC stages `train-*`)")
    with_params(p)
    p.add_argument("--backbone", choices=["scratch", "frozen"], required=True)
    p.add_argument("--recipe", required=True, help="a file name in experiments/ without .yaml, e.g. paper")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--prepared", type=Path, help="prepared dataset (default: data/prepared/<data.dataset>)")
    p.add_argument("--features", type=Path, default=Path("data/features"), help="cached features (frozen runs)")
    p.add_argument("--out", type=Path, help="stage output folder (default: runs/<backbone>/<recipe>/seed<seed>)")
    p.add_argument("--cache", type=Path, default=Path(".cache/tensors"), help="decoded-image cache folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (epoch lines are still printed)")

    p = add("check", cmd_check, "validate params.yaml and every recipe of the study without training")
    with_params(p)

    p = add("report", cmd_report, "write reports/report.md and its figures from the runs' outputs (DVC stage `report`)")
    with_params(p)
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, default=Path("reports"))

    from .bench import MODELS, SECTIONS
    from .model import ATTENTION_KERNELS

    p = add("bench", cmd_bench, "measure the study's costs on this machine against its matmul ceilings (one process)")
    with_params(p)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, metavar="SECTION",
                   help=f"what to measure (default all): {' '.join(SECTIONS)}")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N")
    p.add_argument("--model", default="B/16", help="ViT variant for the train/inference/frozen sections (default B/16)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported (default 3)")
    p.add_argument("--matmul-size", type=int, default=4096, help="side of the square matmuls of the ceilings")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, metavar="MODEL",
                   help=f"implementations to compare (default all; timm only when installed): {' '.join(MODELS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the frozen grid (default 0 1 2)")
    p.add_argument("--seed-epochs", type=int, default=2, help="epochs of the seed's approach actually timed")
    p.add_argument("--prepared", type=Path, help="prepared dataset (default: data/prepared/<data.dataset>)")
    p.add_argument("--repo", type=Path, default=Path("."), help="DVC repository for the `dvc repro` no-op timing")
    p.add_argument("--attention", default="auto", choices=ATTENTION_KERNELS,
                   help="our model's attention kernel (default auto: matmul for bf16 on the CPU, else fused SDPA)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (train and inference sections)")
    p.add_argument("--out", type=Path, help="write the results here as JSON, and as Markdown next to it (.md)")

    p = add("predict", cmd_predict, "classify images with a trained run's weights")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--run", help="MLflow run id whose logged weights to use")
    p.add_argument("--weights", type=Path, help="a folder with model.safetensors and model.json instead of --run")
    p.add_argument("--pretrained", type=Path, default=Path("models/pretrained"), help="backbone for frozen runs")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="save the images with their predictions")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import USER_ERRORS
    from .tracking import Interrupted

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted):
        print("interrupted: the MLflow run ended as KILLED and no stage output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
