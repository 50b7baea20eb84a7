"""What ``vit-repro bench`` times, each with ``torch.utils.benchmark.Timer.blocked_autorange`` (one untimed warm-up
call, then calls until ``min_run_time``; a slower call is timed once; medians). Training is always the core's own
step, ``core.train.Trainer.step``, with the ``.item()`` reads ``fit`` makes; evaluation is ``core.train.evaluate``.

- ``study``: what the estimates need, for every study of params.yaml (``estimate.py``).
- ``compare``: our ViT against torchvision's (and timm's, when installed) through the same step and evaluation,
  with a square-matmul ceiling per precision, timed in the same round-robin loop.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.errors import UserError

NUM_CLASSES = 3
IMPLEMENTATIONS = ("vit_repro", "torchvision", "timm")


class BenchError(UserError):
    """Bad benchmark options or inputs; the message names the fix."""


def timed(fn: Callable[[], Any], min_run_time: float, threads: int | None = None) -> list[float]:
    """Seconds per call of ``fn`` (``Timer.blocked_autorange``, which also synchronises a GPU)."""
    from torch.utils.benchmark import Timer

    timer = Timer("fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads())
    return list(timer.blocked_autorange(min_run_time=min_run_time).times)


def batch(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random uint8 images and labels, as the image cache stores them."""
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), torch.randint(0, NUM_CLASSES, (n,))


def train_step(model: torch.nn.Module, cfg, device: torch.device, size: int, augment=None) -> Callable[[], None]:
    """One ``Trainer.step`` of ``cfg``'s effective batch (``grad_accum_steps`` micro-batches), as ``fit`` makes it."""
    from ..core.images import Augment, ImageTransform
    from ..core.train import Trainer

    aug = Augment(augment, (size, size), seed=0) if augment is not None and augment.enabled else None
    trainer = Trainer(model, cfg, device, ImageTransform(resize=(size, size)).to_input, aug)
    micro = [batch(cfg.batch_size, size)] * cfg.grad_accum_steps

    def step() -> None:
        sums, grad_norm = trainer.step(micro, cfg.effective_batch, cfg.effective_lr)
        sums[0].item(), grad_norm.item()
    return step


def evaluation(model: torch.nn.Module, device: torch.device, size: int, precision: str, n: int) -> Callable[[], None]:
    from ..core.images import ImageTransform
    from ..core.train import evaluate

    data, to_input = batch(n, size), ImageTransform(resize=(size, size)).to_input
    return lambda: evaluate(model, data, to_input, device, NUM_CLASSES, precision)


def forward_gmacs(model: str, size: int) -> float:
    from ..core.networks import build_model, forward_macs

    return forward_macs(build_model(model, size, NUM_CLASSES, device="meta"), size) / 1e9


# ------------------------------------------------------------------------------------------------- study

def load_studies(params_path: Path) -> dict[str, Any]:
    """``Params`` as each study of params.yaml resolves it (``study.name`` set to each in turn)."""
    import yaml

    from ..core.config import load_params, read_yaml

    raw = read_yaml(Path(params_path))
    out = {}
    with tempfile.TemporaryDirectory(prefix="vit-bench-") as tmp:
        for name in raw.get("studies") or {}:
            path = Path(tmp) / "params.yaml"
            path.write_text(yaml.safe_dump({**raw, "study": {**(raw.get("study") or {}), "name": name}}))
            out[name] = load_params(path)
    if not out:
        raise BenchError(f"{params_path} defines no `studies`; pass --params the project's params.yaml")
    return out


def scratch_row(cfg, used_by: list[str], device: torch.device, opts) -> dict[str, Any]:
    """Training img/s of ``cfg`` (its batch, optimizer, clipping, augmentation) and evaluation img/s."""
    from ..core.networks import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.image_size, NUM_CLASSES, cfg.dropout)
    t, size = cfg.train, cfg.image_size
    train_s = timed(train_step(model, t, device, size, cfg.augment), opts.min_run_time)
    eval_s = timed(evaluation(model, device, size, t.precision, opts.study_images), opts.min_run_time)
    step, call = statistics.median(train_s), statistics.median(eval_s)
    return {"model": cfg.model, "image_size": size, "precision": t.precision, "used_by": used_by,
            "batch": t.effective_batch, "augment": cfg.augment.model_dump(mode="json") if cfg.augment.enabled else None,
            "optimizer": t.optimizer, "train_step_s": step, "train_steps_timed": len(train_s),
            "train_img_per_s": t.effective_batch / step, "eval_images": opts.study_images, "eval_s": call,
            "eval_calls_timed": len(eval_s), "eval_img_per_s": opts.study_images / call,
            "forward_gmacs": forward_gmacs(cfg.model, size)}


def features_row(name: str, spec, precision: str, pretrained: Path, device: torch.device, opts) -> dict[str, Any]:
    """Feature img/s of a backbone: its fetched weights when ``pretrained`` holds them, else random ones (the cost
    does not depend on the weights)."""
    from ..core.features import BackboneError, extract_features, load_backbone, read_info, transform_for
    from ..core.model import VisionTransformer, parse_model_name

    try:
        if read_info(pretrained)["name"] != name:
            raise BackboneError("another backbone")
        model, weights = load_backbone(pretrained, NUM_CLASSES)[0], f"fetched ({pretrained})"
    except (BackboneError, OSError, KeyError, ValueError):
        torch.manual_seed(0)
        model = VisionTransformer(parse_model_name(spec.model, image_size=spec.crop, num_classes=NUM_CLASSES))
        weights = f"random ({pretrained} does not hold {name})"
    transform = transform_for(spec)
    pixels = batch(opts.study_images, transform.size[0])[0]
    times = timed(lambda: extract_features(model, pixels, transform, device, precision=precision), opts.min_run_time)
    seconds = statistics.median(times)
    return {"backbone": name, "model": f"vit:{spec.model}", "image_size": spec.crop, "precision": precision,
            "weights": weights, "images": opts.study_images, "seconds": seconds, "calls_timed": len(times),
            "img_per_s": opts.study_images / seconds}


def synthetic_features(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features with class structure (class means + noise), so that a head or L-BFGS works as on real ones."""
    labels = torch.arange(n) % NUM_CLASSES
    means = torch.randn(NUM_CLASSES, dim, generator=torch.Generator().manual_seed(1234))
    return means[labels] + 2.0 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), labels


def frozen_rows(params, opts, device: torch.device) -> dict[str, Any]:
    """One run of the first head arm (``fit``) and of the first probe arm (``fit_logistic``) on random features of
    the backbone's width, each with the final train and test evaluations, on one thread as the stage trains them."""
    from ..core.model import parse_model_name
    from ..core.networks import linear_head
    from ..core.run import schedule_for
    from ..core.train import Task, evaluate, fit, fit_logistic
    from .estimate import arm_runs, study_sizes

    train_sets, n_test, _, _ = study_sizes(params, Path(opts.repo) / "data" / "splits")
    dim = parse_model_name(params.backbone.model).hidden_dim
    test, identity, out = synthetic_features(n_test, dim, seed=1), (lambda x: x), {}
    for arm in params.frozen:
        cfg = arm_runs(params, "frozen", arm, opts.experiments)[0]
        kind = "probe" if cfg.train.optimizer == "lbfgs" else "head"
        if kind in out:
            continue
        n = train_sets[cfg.train_set]
        train, schedule = synthetic_features(n, dim, seed=0), schedule_for(cfg, n)

        def one_run(cfg=cfg, train=train, schedule=schedule, kind=kind) -> None:
            torch.manual_seed(0)
            if kind == "probe":
                fold = max(NUM_CLASSES, round(params.data.validation_fraction * n))
                head, _ = fit_logistic(train, (train[0][:fold], train[1][:fold]), (train[0][fold:], train[1][fold:]),
                                       tuple(cfg.train.c_grid), NUM_CLASSES)
            else:
                head = linear_head(dim, NUM_CLASSES)
                fit(head, Task(train, test, identity, NUM_CLASSES), cfg.train, schedule, 0, device)
            for data in (test, train):
                evaluate(head, data, identity, device, NUM_CLASSES, cfg.train.precision)

        times = timed(one_run, opts.min_run_time, threads=1)
        out[kind] = {"arm": arm, "optimizer": cfg.train.optimizer, "train_set": cfg.train_set, "train_images": n,
                     "test_images": n_test, "dim": dim, "epochs": schedule.epochs if kind == "head" else None,
                     "seconds": statistics.median(times), "runs_timed": len(times),
                     "includes": "fit and the final evaluations on random features; not MLflow or the run's files"}
    return out


def study_section(opts, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """Every distinct (model, image size, precision) of every study's scratch arms (timed with augmentation when any
    arm of it augments), every study backbone's features, one head run and one probe run."""
    from ..core.config import load_params
    from .estimate import arm_runs

    started = time.perf_counter()
    studies = load_studies(opts.params)
    keys: dict[tuple, dict[str, Any]] = {}
    for study, params in studies.items():
        for arm in params.scratch:
            for cfg in arm_runs(params, "scratch", arm, opts.experiments):
                entry = keys.setdefault((cfg.model, cfg.image_size, cfg.train.precision), {"cfg": cfg, "used_by": []})
                entry["used_by"] += [f"{study}/{arm}"] if f"{study}/{arm}" not in entry["used_by"] else []
                if cfg.augment.enabled and not entry["cfg"].augment.enabled:
                    entry["cfg"] = cfg
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the train stages run
    try:
        scratch = []
        for (model, size, precision), entry in keys.items():
            log(f"[bench] study: {model} at {size} px {precision} ({', '.join(entry['used_by'])})")
            scratch.append(scratch_row(entry["cfg"], entry["used_by"], device, opts))
        backbones = {(p.backbone_name, p.train.precision): p.backbone for p in studies.values()}
        features = []
        for (name, precision), spec in backbones.items():
            log(f"[bench] study: features of {name} {precision}")
            features.append(features_row(name, spec, precision, Path(opts.repo) / "models" / "pretrained", device, opts))
        log("[bench] study: one frozen head run and one probe run")
        frozen = frozen_rows(load_params(opts.params), opts, device)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return {"studies": list(studies), "scratch": scratch, "features": features, "frozen_runs": frozen,
            "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------- compare

def implementation(kind: str, model: str, size: int) -> torch.nn.Module | None:
    """The same ViT from our core, torchvision or timm (None: timm is not installed)."""
    from ..core.model import VisionTransformer, parse_model_name

    c = parse_model_name(model, image_size=size, num_classes=NUM_CLASSES)
    common = dict(patch_size=c.patch_size, num_heads=c.num_heads, num_classes=NUM_CLASSES)
    if kind == "vit_repro":
        return VisionTransformer(c)
    if kind == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer as Torchvision

        return Torchvision(image_size=size, num_layers=c.num_layers, hidden_dim=c.hidden_dim, mlp_dim=c.mlp_dim, **common)
    try:
        from timm.models.vision_transformer import VisionTransformer as Timm
    except ImportError:
        return None
    return Timm(img_size=size, embed_dim=c.hidden_dim, depth=c.num_layers, mlp_ratio=c.mlp_dim / c.hidden_dim, **common)


def native_bf16(device: torch.device) -> bool:
    """bf16 arithmetic in hardware: a GPU that supports it, a CPU with AVX512-BF16 or AMX (elsewhere CPUs emulate it,
    ~20-40x slower than fp32)."""
    from ..core.devices import bf16_supported
    from .estimate import cpu_isa

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_isa())) if device.type == "cpu" else bf16_supported(device)


def compare_section(opts, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """Training step (``Trainer.step``, Adam as the study's arms) and evaluation img/s of each implementation of
    ViT-``opts.model``, and the matmul ceiling, per precision, timed round-robin ``opts.repeats`` times."""
    from ..core.config import TrainConfig

    size, b = opts.image_size, opts.batch_size
    macs = forward_gmacs(f"vit:{opts.model}", size) * 1e9
    jobs: list[tuple[str, str, str, Callable[[], Any], float]] = []  # (model, precision, what, fn, flops per call)
    for precision in opts.precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        x, y = (torch.randn(opts.matmul_size, opts.matmul_size, device=device).to(dtype) for _ in range(2))
        jobs.append(("matmul", precision, "matmul", lambda x=x, y=y: x @ y, 2.0 * opts.matmul_size ** 3))
    for kind in opts.models:
        torch.manual_seed(0)
        model = implementation(kind, opts.model, size)
        if model is None:
            log(f"[bench] compare: {kind} is not installed, left out")
            continue
        for precision in opts.precisions:
            step = train_step(model, TrainConfig(batch_size=b, precision=precision), device, size)
            jobs.append((kind, precision, "train", step, 3 * 2 * macs * b))  # backward = 2 forwards
            jobs.append((kind, precision, "eval", evaluation(model, device, size, precision, b), 2 * macs * b))
    times: dict[tuple, list[float]] = {job[:3]: [] for job in jobs}
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    try:
        for r in range(opts.repeats):
            for model, precision, what, fn, _ in jobs:
                log(f"[bench] compare: round {r + 1}/{opts.repeats}, {model} {precision} {what}")
                times[model, precision, what] += timed(fn, opts.min_run_time)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    ceiling = {p: flops / statistics.median(times["matmul", p, "matmul"]) for m, p, _, _, flops in jobs if m == "matmul"}
    rows = []
    for model, precision, what, _, flops in jobs:
        seconds = statistics.median(times[model, precision, what])
        rows.append({"model": model, "precision": precision, "what": what, "seconds": seconds,
                     "seconds_all": times[model, precision, what], "calls_timed": len(times[model, precision, what]),
                     "img_per_s": None if what == "matmul" else b / seconds, "gflops": flops / seconds / 1e9,
                     "of_ceiling": flops / seconds / ceiling[precision]})
    return {"model": f"vit:{opts.model}", "batch": b, "image_size": size, "forward_gmacs": macs / 1e9,
            "matmul_size": opts.matmul_size, "rows": rows}
