"""The ``study`` section: the numbers ``vit_repro.plan`` estimates any study's time from (scratch models'
training and evaluation img/s, backbones' feature img/s, one frozen head run and one probe run)."""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .options import NUM_CLASSES, BenchError, Options
from .throughput import forward_gmacs
from .timing import Job, measure


def load_studies(params_path: Path) -> dict[str, Any]:
    """``Params`` as each study of params.yaml resolves it (``study.name`` set to each in turn)."""
    import yaml

    from ..core.config import ConfigError, load_params

    try:
        raw = yaml.safe_load(Path(params_path).read_text()) or {}
    except OSError:
        raise BenchError(f"{params_path} not found; pass --params or --repo") from None
    out = {}
    with tempfile.TemporaryDirectory(prefix="vit-bench-params-") as tmp:
        for name in raw.get("studies") or {}:
            path = Path(tmp) / "params.yaml"
            path.write_text(yaml.safe_dump({**raw, "study": {**(raw.get("study") or {}), "name": name}}, sort_keys=False))
            try:
                out[name] = load_params(path)
            except ConfigError as exc:
                raise BenchError(f"{params_path} with study.name {name}: {exc}") from None
    if not out:
        raise BenchError(f"{params_path} defines no `studies`")
    return out


def scratch_keys(studies: dict[str, Any], experiments: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Every distinct (model, image size, precision) of the studies' scratch arms, with a run configuration to
    measure it by (one with augmentation when any arm of that key augments) and the arms that use it."""
    from ..plan import arm_runs

    keys: dict[tuple[str, int, str], dict[str, Any]] = {}
    for study, params in studies.items():
        for arm in params.scratch:
            for cfg in arm_runs(params, "scratch", arm, experiments):
                entry = keys.setdefault((cfg.model, cfg.image_size, cfg.train.precision), {"cfg": cfg, "used_by": []})
                if f"{study}/{arm}" not in entry["used_by"]:
                    entry["used_by"].append(f"{study}/{arm}")
                if cfg.augment.enabled and not entry["cfg"].augment.enabled:
                    entry["cfg"] = cfg
    return keys


def measure_scratch(cfg, used_by: list[str], device, opts: Options) -> dict[str, Any]:
    """Training img/s (the arm's batch, augmentation, optimizer, clipping; as ``train.fit`` steps) and eval img/s."""
    import torch
    import torch.nn.functional as F

    from ..core.devices import autocast
    from ..core.images import Augment, ImageTransform
    from ..core.networks import build_model
    from ..core.train import build_optimizer, evaluate

    size, precision, t = cfg.image_size, cfg.train.precision, cfg.train
    torch.manual_seed(0)
    model = build_model(cfg.model, size, NUM_CLASSES, cfg.dropout).to(device)
    transform = ImageTransform(resize=(size, size))
    pixels = torch.randint(0, 256, (t.batch_size, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (t.batch_size,))
    augment = Augment(cfg.augment, (size, size), seed=0) if cfg.augment.enabled else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, t)

    def step() -> None:
        model.train()
        x = augment(pixels) if augment is not None else pixels
        x, y = transform.to_input(x.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        (loss / len(y)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip_grad_norm or math.inf)
        optimizer.step()
        loss.item(), grad_norm.item()  # fit reads both every step

    eval_pixels = torch.randint(0, 256, (opts.study_images, 3, size, size), dtype=torch.uint8)
    eval_labels = torch.randint(0, NUM_CLASSES, (opts.study_images,))

    def evaluation() -> None:
        evaluate(model, (eval_pixels, eval_labels), transform.to_input, device, NUM_CLASSES, precision)

    train_s = measure(Job("study", cfg.model, precision, step, t.batch_size, 0), opts.min_run_time)
    eval_s = measure(Job("study", cfg.model, precision, evaluation, opts.study_images, 0), opts.min_run_time)
    step_s, eval_call_s = statistics.median(train_s), statistics.median(eval_s)
    return {
        "model": cfg.model, "image_size": size, "precision": precision, "used_by": used_by,
        "batch": t.batch_size, "augment": cfg.augment.model_dump(mode="json") if augment else None,
        "optimizer": t.optimizer, "train_step_s": step_s, "train_steps_timed": len(train_s),
        "train_img_per_s": t.batch_size / step_s, "eval_images": opts.study_images, "eval_s": eval_call_s,
        "eval_calls_timed": len(eval_s), "eval_img_per_s": opts.study_images / eval_call_s,
        "forward_gmacs": forward_gmacs(cfg.model, size),
    }


def measure_features(name: str, spec, precision: str, pretrained: Path, device, opts: Options) -> dict[str, Any]:
    """Feature img/s of a backbone: its fetched weights when ``pretrained`` holds them, else random weights."""
    import torch

    from ..backbone import BackboneError, extract_features, load_backbone, read_info, transform_for
    from ..core.model import VisionTransformer, parse_model_name

    weights = None
    with contextlib.suppress(BackboneError, OSError, KeyError, ValueError):
        if read_info(pretrained)["name"] == name:
            model, _ = load_backbone(pretrained, NUM_CLASSES)
            weights = f"fetched ({pretrained})"
    if weights is None:
        torch.manual_seed(0)
        model = VisionTransformer(parse_model_name(spec.model, image_size=spec.crop, num_classes=NUM_CLASSES)).eval()
        weights = (f"random: {pretrained} does not hold {name}; the same architecture, whose cost does not depend on "
                   "the weights")
    transform = transform_for(spec)
    pixels = torch.randint(0, 256, (opts.study_images, 3, *transform.size), dtype=torch.uint8)
    times = measure(Job("study", f"vit:{spec.model}", precision,
                        lambda: extract_features(model, pixels, transform, device, precision=precision),
                        opts.study_images, 0), opts.min_run_time)
    seconds = statistics.median(times)
    return {"backbone": name, "model": f"vit:{spec.model}", "image_size": spec.crop, "precision": precision,
            "weights": weights, "images": opts.study_images, "seconds": seconds, "calls_timed": len(times),
            "img_per_s": opts.study_images / seconds}


def synthetic_features(n: int, dim: int, seed: int) -> tuple[Any, Any]:
    """Random features with class structure (class means + noise), so that a head or L-BFGS behaves as on real ones."""
    import torch

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    means = torch.randn(NUM_CLASSES, dim, generator=torch.Generator().manual_seed(1234))
    return means[labels] + 2.0 * torch.randn(n, dim, generator=g), labels


def measure_frozen_runs(params, opts: Options, device) -> dict[str, Any]:
    """One run of the first head arm (``train.fit`` for its schedule) and one of the first L-BFGS (probe) arm, on
    random features of the backbone's width: each with the final train and test evaluations a run does, on one
    thread as ``runner.run_arm`` trains frozen arms."""
    from ..core.model import parse_model_name
    from ..core.networks import linear_head
    from ..plan import arm_runs, study_sizes
    from ..core.run import schedule_for
    from ..core.train import evaluate, fit, fit_logistic

    sizes = study_sizes(params, opts.repo / "data" / "splits")
    dim = parse_model_name(params.backbone.model).hidden_dim
    test = synthetic_features(sizes.test, dim, seed=1)
    out: dict[str, Any] = {}
    identity = lambda x: x  # noqa: E731
    for arm in params.frozen:
        cfg = arm_runs(params, "frozen", arm, opts.experiments)[0]
        kind = "probe" if cfg.train.optimizer == "lbfgs" else "head"
        if kind in out:
            continue
        n = sizes.train[cfg.train_set]
        train = synthetic_features(n, dim, seed=0)
        schedule = schedule_for(cfg, n)

        def one_run(cfg=cfg, train=train, schedule=schedule, kind=kind) -> None:
            import torch

            torch.manual_seed(0)
            if kind == "probe":
                k = len(train[1])
                fold = max(NUM_CLASSES, round(params.data.validation_fraction * k))
                head, _ = fit_logistic(train, (train[0][:fold], train[1][:fold]), (train[0][fold:], train[1][fold:]),
                                       tuple(cfg.train.c_grid), NUM_CLASSES)
            else:
                head = linear_head(dim, NUM_CLASSES)
                fit(head, train, test, cfg.train, schedule, 0, identity, device, NUM_CLASSES, progress=False)
            evaluate(head, test, identity, device, NUM_CLASSES, cfg.train.precision)
            evaluate(head, train, identity, device, NUM_CLASSES, cfg.train.precision)

        times = measure(Job("study", arm, cfg.train.precision, one_run, n, 0, threads=1), opts.min_run_time)
        out[kind] = {"arm": arm, "optimizer": cfg.train.optimizer, "train_set": cfg.train_set, "train_images": n,
                     "test_images": sizes.test, "dim": dim, "epochs": schedule.epochs if kind == "head" else None,
                     "seconds": statistics.median(times), "runs_timed": len(times),
                     "features": "random, with class structure", "includes": "fit and the final train and test "
                     "evaluations; not MLflow logging or writing the run's files"}
    return out


def study_section(opts: Options, device, log: Callable[[str], None]) -> dict[str, Any]:
    """What ``vit_repro.plan`` needs to estimate any study of params.yaml on this machine."""
    import torch

    from ..core.config import load_params

    started = time.perf_counter()
    studies = load_studies(opts.params)
    keys = scratch_keys(studies, opts.experiments)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as runner.run_arm trains
    try:
        scratch = []
        for (model, size, precision), entry in keys.items():
            log(f"[bench]   study: {model} at {size} px {precision} ({', '.join(entry['used_by'])})")
            scratch.append(measure_scratch(entry["cfg"], entry["used_by"], device, opts))
        features = []
        pretrained = opts.repo / "models" / "pretrained"
        seen = set()
        for params in studies.values():
            name, precision = params.backbone_name, params.train.precision
            if (name, precision) not in seen:
                seen.add((name, precision))
                log(f"[bench]   study: features of {name} {precision}")
                features.append(measure_features(name, params.backbone, precision, pretrained, device, opts))
        log("[bench]   study: one frozen head run and one probe run")
        frozen_runs = measure_frozen_runs(load_params(opts.params), opts, device)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return {"studies": list(studies), "scratch": scratch, "features": features, "frozen_runs": frozen_runs,
            "seconds": time.perf_counter() - started}
