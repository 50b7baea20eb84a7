"""One training run: (backbone, recipe, seed) -> per-step and per-epoch history, metrics, weights.

``fit`` is the loop both backbones share; ``run`` wires data, model, MLflow and the stage outputs
around it. The frozen path trains only a linear head, on cached backbone features.

Scaling out: under ``torchrun`` every process runs this same code (DistributedDataParallel, gloo on
CPU, nccl on CUDA). ``train.batch_size`` is the global batch: every process draws the same global
permutation and trains on its own contiguous slice of each batch, so an optimisation step sees the
same images whatever the number of processes; ``train.grad_accum_steps`` micro-batches make one
optimisation step. Only rank 0 talks to MLflow and writes files.

Faults: after every epoch rank 0 saves the training state (model, optimizer, step, history, RNG
states) to ``.cache/checkpoints``; a rerun with the same configuration, data and code resumes from it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import tracking
from .checkpoint import Checkpoint, checkpoint_for
from .config import (
    PAPER_IMAGENET_STEPS,
    PAPER_WARMUP_STEPS,
    ConfigError,
    RunConfig,
    TrainConfig,
    scaled_warmup_steps,
)
from .data import ImageTransform, data_source, load_split, make_loader, read_summary
from .distributed import (
    all_gather,
    all_reduce_sum,
    broadcast,
    distributed,
    per_process_batch,
    rank_and_world,
    torchrun_env,
)
from .fsutil import staged_dir
from .model import VisionTransformer, autocast, bf16_supported, count_parameters, parse_model_name
from .schedule import lr_at

Prepare = Callable[[torch.Tensor], torch.Tensor]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU. ``$VIT_REPRO_DEVICE`` overrides the setting."""
    name = os.environ.get("VIT_REPRO_DEVICE", name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {name!r} requested but MPS is not available; use device: auto or cpu")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "bf16" and not bf16_supported(device):
        raise RuntimeError(f"bf16 autocast is not supported on {torch.cuda.get_device_name(device)}; use precision: fp32")


def optimisation_steps(num_images: int, cfg: TrainConfig) -> int:
    """Optimisation steps per epoch: each takes ``batch_size x grad_accum_steps`` images (the last one fewer)."""
    return math.ceil(num_images / (cfg.batch_size * cfg.grad_accum_steps))


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with coupled L2 weight decay (``adam``) or decoupled weight decay (``adamw``)."""
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, foreach=True)


@dataclass
class Evaluation:
    loss: float
    correct: int
    total: int
    confusion: torch.Tensor  # [true, predicted] counts

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    def per_class_accuracy(self, classes: list[str]) -> dict[str, float]:
        hits, support = self.confusion.diag(), self.confusion.sum(1).clamp(min=1)
        return {c: float(hits[i] / support[i]) for i, c in enumerate(classes)}

    @property
    def predicted_classes(self) -> int:
        return int((self.confusion.sum(0) > 0).sum())


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    prepare: Prepare,
    device: torch.device,
    num_classes: int,
    precision: str = "fp32",
    batch_size: int = 64,
) -> Evaluation:
    """Per-image loss and accuracy: sums over every image, divided by the number of images.

    Under torchrun each process evaluates a contiguous shard and the sums are added across processes.
    """
    rank, world = rank_and_world()
    inputs, labels = inputs.tensor_split(world)[rank], labels.tensor_split(world)[rank]
    was_training = model.training
    model.eval()
    loss_sum, confusion = 0.0, torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, len(inputs), batch_size):
        x = prepare(inputs[start : start + batch_size].to(device, non_blocking=True))
        y = labels[start : start + batch_size].to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        pred = logits.argmax(1).cpu()
        confusion += torch.bincount(y.cpu() * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    model.train(was_training)
    if world > 1:
        sums = torch.cat([torch.tensor([loss_sum], dtype=torch.float64), confusion.flatten().double()])
        sums = all_reduce_sum(sums.to(device)).cpu()
        loss_sum, confusion = sums[0].item(), sums[1:].round().long().view(num_classes, num_classes)
    total = int(confusion.sum())
    return Evaluation(loss_sum / total, int(confusion.diag().sum()), total, confusion)


@dataclass
class History:
    steps: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    seed: int,
    prepare: Prepare,
    device: torch.device,
    num_classes: int,
    on_epoch: Callable[[History], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    checkpoint: Checkpoint | None = None,
    resume: dict[str, Any] | None = None,
) -> History:
    """Train ``model`` (only its parameters that require grad) and evaluate on ``test`` after every epoch.

    One optimisation step = ``cfg.grad_accum_steps`` global micro-batches of ``cfg.batch_size`` images;
    its gradient is the mean over all of the step's images, whatever the number of processes.
    ``checkpoint``: save the training state there after every epoch; ``resume``: a state saved so, to go on from.
    """
    rank, world = rank_and_world()
    per_process_batch(cfg.batch_size, world)
    # every process iterates the same global micro-batches, in the same seeded order
    loader = make_loader(train[0], train[1], cfg.batch_size, shuffle=True, seed=seed, pin_memory=device.type == "cuda")
    num_images, accum = len(train[1]), cfg.grad_accum_steps
    total_steps = cfg.epochs * optimisation_steps(num_images, cfg)
    warmup = scaled_warmup_steps(cfg, total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    model.to(device).train()
    if rank > 0:  # rank 0 keeps the single-process random stream (dropout); the others get their own
        torch.manual_seed(seed + 1_000_003 * rank)
    history, first_epoch, step = History(), 1, 0
    if resume is not None:
        history, first_epoch, step = _restore(resume, model, optimizer, loader.generator, device, rank)
    net = model
    if world > 1 and params:  # gradients are all-reduced in place, in DDP's buckets
        device_ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        # the class token's gradient is a slice of a larger tensor, so DDP copies it: a few numbers, harmless
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", disable=not progress or rank > 0, dynamic_ncols=True)
    for epoch in range(first_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        epoch_sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct: all processes
        for micro, (inputs, labels) in enumerate(loader):
            if micro % accum == 0:  # an optimisation step begins
                step_images = min(cfg.batch_size * accum, num_images - micro * cfg.batch_size)  # all processes
                lr = lr_at(step, cfg.lr, total_steps, warmup, cfg.decay)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct
            last = (micro + 1) % accum == 0 or micro + 1 == len(loader)  # ... and ends with this micro-batch
            # this process's contiguous slice of the global micro-batch (may be empty for a short last batch)
            inputs, labels = inputs.tensor_split(world)[rank], labels.tensor_split(world)[rank]
            x, y = prepare(inputs.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
            with nullcontext() if last or net is model else net.no_sync():  # DDP all-reduces once per step
                with autocast(device, cfg.precision):
                    logits = net(x)
                loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
                # DDP averages gradients over processes, so x world: the mean over the step's images
                (loss_sum * (world / step_images)).backward()
            sums += torch.stack([loss_sum.detach().double(), (logits.argmax(1) == y).sum().double()])
            if not last:
                continue
            # the norm before clipping is logged for every recipe: the evidence for or against clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm or math.inf)
            optimizer.step()
            epoch_sums += all_reduce_sum(sums)
            loss = sums[0].item() / step_images
            history.steps.append({"step": step, "epoch": epoch, "lr": lr, "loss": loss, "grad_norm": grad_norm.item()})
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        history.train_seconds += time.perf_counter() - started
        test_eval = evaluate(model, *test, prepare, device, num_classes, cfg.precision)
        row = {
            "epoch": epoch,
            # over the epoch's own batches, as they were trained on (train mode, weights moving), per image
            "train_loss": epoch_sums[0].item() / num_images,
            "train_acc": epoch_sums[1].item() / num_images,
            "test_loss": test_eval.loss,
            "test_acc": test_eval.accuracy,
            "lr": lr,
            "epoch_time_s": time.perf_counter() - started,
        }
        history.epochs.append(row)
        if rank == 0:
            bar.write(
                f"{desc} epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
                f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.3f} ({test_eval.correct}/{test_eval.total}) | "
                f"{row['epoch_time_s']:.1f}s"
            )
        if on_epoch is not None:
            on_epoch(history)
        if checkpoint is not None:
            state = _training_state(model, optimizer, loader.generator, history, epoch, step, device)
            if rank == 0:
                checkpoint.save(state)
    bar.close()
    return history


def _training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    history: History,
    epoch: int,
    step: int,
    device: torch.device,
) -> dict[str, Any]:
    """What ``fit`` needs to go on after ``epoch`` exactly as if never stopped (collective: every process calls it)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
    rng = all_gather((torch.get_rng_state(), cuda))  # dropout draws: one stream per process
    return {
        "epoch": epoch,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": asdict(history),
        "rng": {"torch": [r[0] for r in rng], "cuda": [r[1] for r in rng], "loader": generator.get_state()},
    }


def _restore(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
    rank: int,
) -> tuple[History, int, int]:
    """Load a saved state into the model, optimizer and random generators; return (history, next epoch, step)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["rng"]["loader"])
    if rank < len(state["rng"]["torch"]):  # else: resumed with more processes than saved it
        torch.set_rng_state(state["rng"]["torch"][rank])
        if device.type == "cuda" and len(state["rng"]["cuda"][rank]):
            torch.cuda.set_rng_state(state["rng"]["cuda"][rank], device)
    return History(**state["history"]), state["epoch"] + 1, state["step"]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@dataclass
class Inputs:
    """What a run trains and evaluates on, and how raw inputs become model inputs."""

    model: nn.Module
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    prepare: Prepare
    classes: list[str]
    info: dict[str, Any]  # model description for run.json


def scratch_inputs(cfg: RunConfig, prepared_dir: Path, cache_dir: Path | None) -> Inputs:
    transform = ImageTransform(resize=(cfg.image_size, cfg.image_size))
    train, test = (load_split(prepared_dir, s, transform, cache_dir) for s in ("train", "test"))
    torch.manual_seed(cfg.seed)  # the model's initialisation depends on the seed alone
    vit = parse_model_name(cfg.model, image_size=cfg.image_size, num_classes=len(train.classes), dropout=cfg.dropout)
    model = VisionTransformer(vit)
    info = _model_info(cfg.model, model, vit)
    return Inputs(model, (train.images, train.labels), (test.images, test.labels), transform.normalize, list(train.classes), info)


def frozen_inputs(cfg: RunConfig, features_dir: Path) -> Inputs:
    from .backbone import load_features

    tensors, meta = load_features(features_dir)
    head = nn.Linear(meta["dim"], len(meta["classes"]))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    backbone = parse_model_name(meta["backbone"]["model"], image_size=meta["backbone"]["transform"]["crop"])
    info = _model_info(meta["backbone"]["model"], None, backbone) | {
        "params_trainable": count_parameters(head),
        "params_total": _vit_params(backbone, len(meta["classes"])),
        "features_key": meta["key"],
    }
    return Inputs(
        head,
        (tensors["train_features"], tensors["train_labels"]),
        (tensors["test_features"], tensors["test_labels"]),
        lambda x: x,
        list(meta["classes"]),
        info,
    )


def _vit_params(vit: Any, num_classes: int) -> int:
    with torch.device("meta"):
        return count_parameters(VisionTransformer(type(vit)(**{**vit.__dict__, "num_classes": num_classes})))


def _model_info(name: str, model: nn.Module | None, vit: Any) -> dict[str, Any]:
    total = count_parameters(model) if model is not None else 0
    return {
        "name": name,
        "params_total": total,
        "params_trainable": total,
        "layers": vit.num_layers,
        "hidden": vit.hidden_dim,
        "mlp": vit.mlp_dim,
        "heads": vit.num_heads,
        "patch": vit.patch_size,
        "image_size": vit.image_size,
    }


def run(
    cfg: RunConfig,
    prepared_dir: Path,
    out_dir: Path,
    features_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one (backbone, recipe, seed), log it to MLflow, and write its stage outputs to ``out_dir``.

    Outputs are written to a temporary sibling folder and moved into place only when the run finished,
    so an interrupted or failed run leaves nothing behind but its MLflow record (FAILED or KILLED) and
    its last checkpoint, from which the next run of the same configuration resumes.
    Under torchrun every process calls this; only rank 0 logs to MLflow and writes files.
    """
    started_at = datetime.now(timezone.utc)
    wall_start = time.perf_counter()
    rank, _, world_size = torchrun_env()
    summary = check_inputs(cfg, prepared_dir, out_dir, features_dir, cache_dir, world_size, main=rank == 0)
    device = resolve_device(cfg.train.device)
    check_precision(cfg.train.precision, device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with distributed(device) as device:
        return _run(cfg, summary, prepared_dir, out_dir, features_dir, cache_dir, device, progress, started_at, wall_start)


def check_inputs(
    cfg: RunConfig,
    prepared_dir: Path,
    out_dir: Path,
    features_dir: Path | None,
    cache_dir: Path | None,
    world_size: int,
    main: bool = True,
) -> dict[str, Any]:
    """Everything from the user that can be checked before work starts; returns the data summary."""
    per_process_batch(cfg.train.batch_size, world_size)
    summary = read_summary(prepared_dir)  # missing: "run `dvc repro prepare`"
    if cfg.backbone == "frozen":
        if features_dir is None:
            raise ConfigError("a frozen run needs the `features` stage output: pass --features data/features")
        _check_features(features_dir, summary, cfg)
    if main:  # only rank 0 writes
        _check_writable(Path(out_dir), "output folder (--out)")
        if cache_dir is not None:
            _check_writable(Path(cache_dir), "decoded-image cache (--cache)")
        if cfg.train.checkpoint:
            _check_writable(tracking.repo_root() / ".cache" / "checkpoints", "checkpoint folder")
        tracking.check_backend(tracking.tracking_uri())  # MLFLOW_TRACKING_URI: scheme, server reachable
    return summary


def _check_writable(path: Path, what: str) -> None:
    """``path`` is a folder, or can be made one, that this process can write into."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable; choose another path or fix its permissions")


def _run(
    cfg: RunConfig,
    summary: dict[str, Any],
    prepared_dir: Path,
    out_dir: Path,
    features_dir: Path | None,
    cache_dir: Path | None,
    device: torch.device,
    progress: bool,
    started_at: datetime,
    wall_start: float,
) -> dict[str, Any]:
    rank, world_size = rank_and_world()
    main = rank == 0
    inputs = scratch_inputs(cfg, prepared_dir, cache_dir) if cfg.backbone == "scratch" else frozen_inputs(cfg, features_dir)
    num_classes = len(inputs.classes)
    steps_per_epoch = optimisation_steps(len(inputs.train[1]), cfg.train)
    total_steps = cfg.train.epochs * steps_per_epoch
    schedule = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": scaled_warmup_steps(cfg.train, total_steps),
        "warmup_fraction": cfg.train.warmup_fraction if cfg.train.warmup else 0.0,
        "paper_warmup_steps": PAPER_WARMUP_STEPS,
        "paper_total_steps": PAPER_IMAGENET_STEPS,
        "effective_batch_size": cfg.train.batch_size * cfg.train.grad_accum_steps,  # images per optimisation step
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "world_size": world_size,
    }
    root = tracking.repo_root()
    commit, dirty = tracking.git_state(root)
    config_json = cfg.model_dump(mode="json")
    variant_config = {k: v for k, v in config_json.items() if k != "seed"}
    variant_digest = tracking.config_digest(variant_config)
    checkpoint = resume = None
    if cfg.train.checkpoint:
        checkpoint = checkpoint_for(cfg, root, {"config": config_json, "data": summary["digest"], "model": inputs.info})
        resume = broadcast(checkpoint.load() if main else None)
    provenance = {
        "git_commit": commit,
        "git_dirty": dirty,
        **tracking.versions(),
        "device": str(device),
        "device_name": device_name(device),
        "precision": cfg.train.precision,
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
        "started_at": started_at.isoformat(timespec="seconds"),
    }
    tags = {
        "vit.study": cfg.study,
        "vit.variant": cfg.variant,
        "vit.backbone": cfg.backbone,
        "vit.recipe": cfg.recipe,
        "vit.seed": str(cfg.seed),
        "vit.model": inputs.info["name"],
        "vit.warmup": str(cfg.train.warmup),
        "vit.decay": cfg.train.decay,
        "vit.clip": str(cfg.train.clip_grad_norm),
        "vit.config_digest": variant_digest,
        "vit.dataset": summary["dataset"],
        "vit.data_digest": summary["digest"],
        "vit.pretrained": (cfg.pretrained.label if cfg.pretrained else "none (random init)"),
        "mlflow.source.git.commit": commit,
        "vit.git_dirty": str(dirty),
        "vit.dvc_stage": provenance["dvc_stage"],
        "vit.device": provenance["device_name"],
        "vit.precision": cfg.train.precision,
        "vit.torch": provenance["torch"],
        "vit.torchvision": provenance["torchvision"],
    }
    # only rank 0 opens an MLflow run; the other processes never touch MLflow
    tracker = tracking.mlflow_run(f"vit-repro/{cfg.study}", cfg.run_name, cfg.variant, variant_digest, tags) if main else nullcontext()
    with tracker as handle:
        logged = [0, 0]  # steps, epochs already in the MLflow run

        def log_epoch(history: History) -> None:
            _log_history(handle.run_id, history, *logged)
            logged[:] = len(history.steps), len(history.epochs)

        if main:
            import mlflow

            mlflow.log_params(tracking.flatten("", config_json) | tracking.flatten("schedule", schedule))
            _log_dataset(summary, prepared_dir)
            if resume is not None:  # the new run holds every epoch: the restored ones are logged again here
                mlflow.set_tags({"vit.resumed_from": resume["mlflow_run_id"], "vit.resumed_at_epoch": str(resume["epoch"])})
                if resume["history"]["epochs"]:
                    log_epoch(History(**resume["history"]))
            if checkpoint is not None:
                checkpoint.run_id = handle.run_id

        history = fit(
            inputs.model, inputs.train, inputs.test, cfg.train, cfg.seed, inputs.prepare, device, num_classes,
            on_epoch=log_epoch if main else None, progress=progress, desc=cfg.run_name,
            checkpoint=checkpoint, resume=resume,
        )
        final = evaluate(inputs.model, *inputs.test, inputs.prepare, device, num_classes, cfg.train.precision)
        final_train = evaluate(inputs.model, *inputs.train, inputs.prepare, device, num_classes, cfg.train.precision)
        metrics = {
            "test_acc": final.accuracy,
            "test_loss": final.loss,
            "test_correct": final.correct,
            "test_images": final.total,
            "train_acc": final_train.accuracy,  # the final weights in eval mode, over every training image
            "train_loss": final_train.loss,
            "train_images_per_s": cfg.train.epochs * len(inputs.train[1]) / history.train_seconds,
            "collapsed": final.predicted_classes == 1,
            "predicted_classes": final.predicted_classes,
        }
        metrics["wall_time_s"] = time.perf_counter() - wall_start
        if not main:
            return metrics
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()})
        evaluation = {
            "classes": inputs.classes,
            "confusion_matrix": final.confusion.tolist(),
            "per_class_accuracy": final.per_class_accuracy(inputs.classes),
        }
        provenance["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {
            "status": "FINISHED",
            "variant": cfg.variant,
            "backbone": cfg.backbone,
            "recipe": cfg.recipe,
            "seed": cfg.seed,
            "study": cfg.study,
            "config": config_json,
            "schedule": schedule,
            "model": inputs.info,
            "data": {k: summary[k] for k in ("dataset", "digest", "classes", "counts")}
            | {"source": data_source(summary["dataset"], root)},
            "pretrained": _pretrained_record(cfg, features_dir),
            "evaluation": evaluation,
            "provenance": provenance,
            "mlflow": {
                "tracking_uri": handle.tracking_uri,
                "experiment_id": handle.experiment_id,
                "experiment_name": handle.experiment_name,
                "run_id": handle.run_id,
                "parent_run_id": handle.parent_run_id,
                "weights_artifact": None,
                "resumed_from": resume["mlflow_run_id"] if resume is not None else None,
            },
        }
        with staged_dir(out_dir) as tmp:
            _json(tmp / "metrics.json", metrics)
            _write_csv(tmp / "history.csv", history.epochs)
            _write_csv(tmp / "steps.csv", history.steps)
            record["mlflow"]["weights_artifact"] = _log_artifacts(cfg, inputs, record, tmp)
            _json(tmp / "run.json", record)
        if checkpoint is not None:
            checkpoint.remove()  # finished: nothing to resume
    return metrics


def _check_features(features_dir: Path, summary: dict[str, Any], cfg: RunConfig) -> None:
    from .backbone import BackboneError, read_features_info

    meta = read_features_info(features_dir)
    if meta["data_digest"] != summary["digest"]:
        raise BackboneError(f"features in {features_dir} were computed on other data: re-run `dvc repro features`")
    if cfg.pretrained_name and meta["backbone"]["name"] != cfg.pretrained_name:
        raise BackboneError(
            f"features in {features_dir} come from backbone {meta['backbone']['name']!r}, the study uses "
            f"{cfg.pretrained_name!r}: re-run `dvc repro features`"
        )


def _pretrained_record(cfg: RunConfig, features_dir: Path | None) -> dict[str, Any] | None:
    if cfg.backbone != "frozen" or features_dir is None:
        return None
    from .backbone import read_features_info

    backbone = read_features_info(features_dir)["backbone"]
    return {k: backbone[k] for k in ("name", "label", "model", "source", "sha256", "source_sha256", "pretraining", "transform")}


def device_name(device: torch.device) -> str:
    """A readable name of the compute device: the GPU model, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform

        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type


def _log_dataset(summary: dict[str, Any], prepared_dir: Path) -> None:
    import mlflow
    import pandas as pd

    rows = [
        {"split": split, "class": cls, "images": n}
        for split, counts in summary["counts"].items()
        for cls, n in counts.items()
        if cls != "total"
    ]
    with warnings.catch_warnings():  # mlflow guesses the source type and schema noisily; both are fine here
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            pd.DataFrame(rows), source=str(prepared_dir), name=summary["dataset"], digest=summary["digest"].split(":")[-1][:16]
        )
        mlflow.log_input(dataset, context="training")


def _log_history(run_id: str, history: History, steps_from: int, epochs_from: int) -> None:
    """Per-step and per-epoch metrics not logged yet, in a few batched requests (not one per value)."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(row[key]), now, int(row["step"]))
        for row in history.steps[steps_from:]
        for key in ("loss", "lr", "grad_norm")
    ]
    metrics += [
        Metric(f"epoch_{key}", float(epoch[key]), now, int(epoch["epoch"]))
        for epoch in history.epochs[epochs_from:]
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s")
    ]
    client = mlflow.MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def _log_artifacts(cfg: RunConfig, inputs: Inputs, record: dict[str, Any], folder: Path) -> str | None:
    """Config, history, figures and (for the configured seeds) weights; returns the weights artifact path."""
    import mlflow
    from safetensors.torch import save_file

    import matplotlib.pyplot as plt

    from .plots import confusion_figure, curves_figure

    mlflow.log_dict(record["config"], "config.json")
    mlflow.log_artifact(str(folder / "history.csv"))
    mlflow.log_artifact(str(folder / "steps.csv"))
    mlflow.log_dict(record["evaluation"], "evaluation.json")
    figures = {
        "curves.png": curves_figure(folder / "history.csv", title=cfg.run_name),
        "confusion_matrix.png": confusion_figure(record["evaluation"]["confusion_matrix"], inputs.classes, cfg.run_name),
    }
    for name, figure in figures.items():
        mlflow.log_figure(figure, name)
        plt.close(figure)
    keep = cfg.backbone == "frozen" or cfg.seed in cfg.train.weights_for_seeds
    if not keep:
        return None
    # frozen runs keep only their head (a few KB); the backbone is identified by its sha256 in model.json
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in inputs.model.state_dict().items()}
        save_file(state, Path(tmp) / "model.safetensors")
        model_card = {
            "backbone": cfg.backbone,
            "model": record["model"],
            "image_size": cfg.image_size,
            "dropout": cfg.dropout,
            "classes": inputs.classes,
            "pretrained": record["pretrained"],
            "weights": "head only (nn.Linear)" if cfg.backbone == "frozen" else "full model",
        }
        _json(Path(tmp) / "model.json", model_card)
        mlflow.log_artifacts(tmp, "weights")
    return "weights/model.safetensors"
