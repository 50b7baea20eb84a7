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
    from .core.config import load_params

    return load_params(args.params)


def _root() -> Path:
    """The checkout whose files a stage reads and writes (not DVC_ROOT: a queued experiment works in a copy)."""
    from .core.fsutil import workspace_root

    return workspace_root()


def cmd_prepare(args: argparse.Namespace) -> None:
    from .core.dataset import prepare

    summary = prepare(args.dataset, args.out, archive=args.archive, root=_root())
    counts = summary["counts"]
    print(f"prepared {summary['dataset']}: train {counts['train']['total']}, test {counts['test']['total']} images "
          f"verified; digest {summary['digest']} -> {args.out}")


def cmd_splits(args: argparse.Namespace) -> None:
    from .core.splits import make_splits, write_splits

    data = _params(args).data
    splits = make_splits(data.train_sets, data.test_from, data.validation_fraction, data.split_seed, _root())
    path = write_splits(splits, args.out)
    sizes = ", ".join(f"train {k}: {len(v)} ({len(splits.validation[k])} for validation)" for k, v in splits.train_sets.items())
    print(f"splits: test {len(splits.test)} images, disjoint from every training set; {sizes} -> {path}")


def cmd_summary(args: argparse.Namespace) -> None:
    from .core.networks import build_model, describe, layer_summary

    info = describe(args.model, args.image_size, args.num_classes)
    print(layer_summary(build_model(args.model, args.image_size, args.num_classes), args.image_size))
    print(f"Forward pass: {info.forward_gmacs:.3f} GMACs per image ({2 * info.forward_gmacs:.3f} GFLOPs)")


def cmd_pretrained(args: argparse.Namespace) -> None:
    from .backbone import fetch

    params = _params(args)
    name = args.backbone or params.backbone_name
    if name not in params.backbones:
        from .core.config import ConfigError

        raise ConfigError(f"unknown backbone {name!r}; params.yaml `backbones` defines {sorted(params.backbones)}")
    info = fetch(params.backbones[name], name, args.out, root=_root())
    print(f"pretrained backbone {info['label']}: {info['origin']}, verified; weights sha256 {info['sha256'][:16]}… "
          f"-> {args.out}")


def cmd_features(args: argparse.Namespace) -> None:
    from .core.features import compute_features
    from .core.devices import check_precision, resolve_device
    from .core.splits import read_splits

    params = _params(args)
    device = resolve_device(args.device or params.train.device)
    check_precision(params.train.precision, device)
    meta = compute_features(args.pretrained, read_splits(args.splits), args.prepared, args.out, device, args.cache,
                            precision=params.train.precision)
    print(f"features {meta['key']}: {meta['backbone']['label']}, dim {meta['dim']}, {meta['precision']} -> {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    nproc = int(os.environ.get("VIT_REPRO_NPROC", "1"))
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # relaunch this very command under torchrun
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        raise SystemExit(subprocess.call([*launch, "-m", "vit_repro.cli", *sys.argv[1:]]))
    from .core.config import resolve_study
    from .bench.estimate import estimate_lines
    from .stage import Paths, run_arm

    params = _params(args)
    resolve_study(params, args.experiments)  # every run of the study is valid before any trains
    kind = params.kind_of(args.arm)
    root = _root()
    paths = Paths.default(root, args.runs)
    if args.only and paths.runs.resolve() == (root / "runs").resolve():
        from .core.config import ConfigError

        raise ConfigError("--only trains part of an arm: pass --runs to another folder, so runs/ keeps the whole arm")
    main = os.environ.get("RANK", "0") == "0"
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if main else (lambda line: None)
    if not args.only:
        for line in estimate_lines(params, args.experiments, arms=[args.arm]):
            log(line)
    records = run_arm(params, kind, args.arm, paths, args.experiments, progress=not args.no_progress, log=log,
                      only=set(args.only) if args.only else None)
    if main:
        print(f"{args.arm}: {len(records)} runs -> {paths.runs / args.arm}")


def cmd_check(args: argparse.Namespace) -> None:
    from .core.config import resolve_study
    from .core.devices import check_precision, resolve_device
    from .bench.estimate import estimate_lines

    params = _params(args)
    runs = resolve_study(params, args.experiments)
    devices = {r.train.device for r in runs}
    for name in sorted(devices):
        check_precision(params.train.precision, resolve_device(name))
    arms = sorted({r.arm for r in runs})
    print(f"study {params.study.name!r}: {len(runs)} runs valid ({', '.join(arms)}); device "
          f"{', '.join(str(resolve_device(d)) for d in sorted(devices))} available")
    for line in estimate_lines(params, args.experiments):
        print(line)


def cmd_report(args: argparse.Namespace) -> None:
    from .report import build_report

    path = build_report(args.runs, _params(args), args.out, experiments=args.experiments, root=_root())
    print(f"report -> {path}")


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import load_predictor, plot_prediction, predict_files

    predictor = load_predictor(run_id=args.run, weights_dir=args.weights, pretrained_dir=args.pretrained)
    results, failures = predict_files(predictor, args.images)
    if args.json:
        print(json.dumps([r.as_dict() for r in results] + [{"path": str(p), "error": e} for p, e in failures], indent=2))
    else:
        for result in results:
            probs = ", ".join(f"{c} {p:.3f}" for c, p in result.probabilities.items())
            print(f"{result.path}: {result.label} ({probs})")
    for path, error in failures:
        print(f"error: {error}", file=sys.stderr)
    if args.plot and results:
        plot_prediction(results, args.plot)
        print(f"plot -> {args.plot}", file=sys.stderr)
    return 1 if failures else 0


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

    p = add("prepare", cmd_prepare, "fetch a dataset archive, verify it image by image and extract it (DVC stage `prepare`)")
    p.add_argument("--dataset", required=True, help="pizza_steak_sushi or pizza_steak_sushi_20_percent")
    p.add_argument("--out", type=Path, required=True, help="prepared dataset folder")
    p.add_argument("--archive", type=Path, help="a local zip instead of the DVC remote `course-data`")

    p = add("splits", cmd_splits, "the study's training sets, validation folds and test set, checked disjoint (stage `splits`)")
    with_params(p)
    p.add_argument("--out", type=Path, default=Path("data/splits"))

    p = add("summary", cmd_summary, "print a model's layers with input/output shapes, parameters and forward cost")
    p.add_argument("--model", default="vit:B/16", help="vit:<variant>/<patch> (e.g. vit:Ti/16) or resnet18")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=3)

    p = add("pretrained", cmd_pretrained, "fetch, verify and convert the frozen backbone's weights (DVC stage `pretrained`)")
    with_params(p)
    p.add_argument("--backbone", help="an entry of params.yaml `backbones` (default: the study's)")
    p.add_argument("--out", type=Path, default=Path("models/pretrained"))

    p = add("features", cmd_features, "the frozen backbone's features of every image of the study, once (stage `features`)")
    with_params(p)
    p.add_argument("--pretrained", type=Path, default=Path("models/pretrained"))
    p.add_argument("--splits", type=Path, default=Path("data/splits"))
    p.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    p.add_argument("--out", type=Path, default=Path("data/features"))
    p.add_argument("--device", help="default: train.device")
    p.add_argument("--cache", type=Path, default=Path(".cache/images"), help="decoded-image cache folder")

    p = add("train", cmd_train, "train every run of one arm and log each to MLflow (DVC stages `train-*`)")
    with_params(p)
    p.add_argument("--arm", required=True, help="an arm of params.yaml `scratch` or `frozen`, e.g. vit or head")
    p.add_argument("--runs", type=Path, help="runs folder (default: runs/ at the repository root)")
    p.add_argument("--only", nargs="+", metavar="RUN", help="train only these runs, e.g. head/225/clip/seed0 (needs --runs)")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch lines (runs are still summarised)")

    p = add("check", cmd_check, "validate params.yaml, every recipe and the device, and print the study's estimated time")
    with_params(p)

    p = add("report", cmd_report, "write reports/report.md, its figures and metrics from the runs (DVC stage `report`)")
    with_params(p)
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, default=Path("reports"))

    add("bench", None, "measure the study's costs on this machine (`vit-repro bench --help` for its options)")

    p = add("predict", cmd_predict, "classify images with a trained run's weights")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="MLflow run id whose logged weights to use")
    source.add_argument("--weights", type=Path, help="a folder with model.safetensors and model.json instead of --run")
    p.add_argument("--pretrained", type=Path, default=Path("models/pretrained"), help="backbone for frozen runs")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="save the images with their predictions")
    p.add_argument("--json", action="store_true", help="print the results as JSON only (messages go to stderr)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .core.errors import Interrupted, UserError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, Interrupted):
        print("interrupted: the MLflow run ended as KILLED; the previous outputs are unchanged and a rerun resumes",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
