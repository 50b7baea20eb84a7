"""One training run: (backbone, recipe, seed) -> per-step and per-epoch history, metrics, weights.

``fit`` is the loop both backbones share; ``run`` wires data, model, MLflow and the stage outputs
around it. The frozen path trains only a linear head, on cached backbone features.
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import tracking
from .fsutil import staged_dir
from .config import PAPER_IMAGENET_STEPS, PAPER_WARMUP_STEPS, RunConfig, TrainConfig, scaled_warmup_steps
from .data import ImageTransform, data_source, load_split, make_loader, read_summary
from .model import VisionTransformer, count_parameters, parse_model_name
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
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"bf16 autocast is not supported on {torch.cuda.get_device_name(device)}; use precision: fp32")


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
    """Per-image loss and accuracy: sums over every image, divided by the number of images."""
    was_training = model.training
    model.eval()
    loss_sum, confusion = 0.0, torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, len(inputs), batch_size):
        x = prepare(inputs[start : start + batch_size].to(device, non_blocking=True))
        y = labels[start : start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        pred = logits.argmax(1).cpu()
        confusion += torch.bincount(y.cpu() * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    model.train(was_training)
    correct = int(confusion.diag().sum())
    return Evaluation(loss_sum / len(inputs), correct, len(inputs), confusion)


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
) -> History:
    """Train ``model`` (only its parameters that require grad) and evaluate on ``test`` after every epoch."""
    loader = make_loader(train[0], train[1], cfg.batch_size, shuffle=True, seed=seed)
    total_steps = cfg.epochs * len(loader)
    warmup = scaled_warmup_steps(cfg, total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    history = History()
    step = 0
    model.to(device).train()
    bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        seen, correct, loss_sum = 0, 0, 0.0
        for inputs, labels in loader:
            lr = lr_at(step, cfg.lr, total_steps, warmup, cfg.decay)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = prepare(inputs.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # the norm before clipping is logged for every recipe: the evidence for or against clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm or math.inf)
            optimizer.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
            history.steps.append(
                {"step": step, "epoch": epoch, "lr": lr, "loss": loss.item(), "grad_norm": grad_norm.item()}
            )
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        history.train_seconds += time.perf_counter() - started
        test_eval = evaluate(model, *test, prepare, device, num_classes, cfg.precision)
        row = {
            "epoch": epoch,
            # over the epoch's own batches, as they were trained on (train mode, weights moving), per image
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_loss": test_eval.loss,
            "test_acc": test_eval.accuracy,
            "lr": lr,
            "epoch_time_s": time.perf_counter() - started,
        }
        history.epochs.append(row)
        bar.write(
            f"{desc} epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
            f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.3f} ({test_eval.correct}/{test_eval.total}) | "
            f"{row['epoch_time_s']:.1f}s"
        )
        if on_epoch is not None:
            on_epoch(history)
    bar.close()
    return history


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
    so an interrupted or failed run leaves nothing behind but its MLflow record (FAILED or KILLED).
    """
    started_at = datetime.now(timezone.utc)
    wall_start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    check_precision(cfg.train.precision, device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    summary = read_summary(prepared_dir)
    if cfg.backbone == "scratch":
        inputs = scratch_inputs(cfg, prepared_dir, cache_dir)
    else:
        if features_dir is None:
            raise ValueError("a frozen run needs features_dir (the `features` stage output)")
        inputs = frozen_inputs(cfg, features_dir)
        _check_features(features_dir, summary, cfg)
    num_classes = len(inputs.classes)
    steps_per_epoch = math.ceil(len(inputs.train[1]) / cfg.train.batch_size)
    total_steps = cfg.train.epochs * steps_per_epoch
    schedule = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": scaled_warmup_steps(cfg.train, total_steps),
        "warmup_fraction": cfg.train.warmup_fraction if cfg.train.warmup else 0.0,
        "paper_warmup_steps": PAPER_WARMUP_STEPS,
        "paper_total_steps": PAPER_IMAGENET_STEPS,
    }
    root = tracking.repo_root()
    commit, dirty = tracking.git_state(root)
    config_json = cfg.model_dump(mode="json")
    variant_config = {k: v for k, v in config_json.items() if k != "seed"}
    variant_digest = tracking.config_digest(variant_config)
    provenance = {
        "git_commit": commit,
        "git_dirty": dirty,
        **tracking.versions(),
        "device": str(device),
        "device_name": _device_name(device),
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
    with tracking.mlflow_run(f"vit-repro/{cfg.study}", cfg.run_name, cfg.variant, variant_digest, tags) as handle:
        import mlflow

        mlflow.log_params(tracking.flatten("", config_json) | tracking.flatten("schedule", schedule))
        _log_dataset(summary, prepared_dir)
        logged_steps = 0

        def log_epoch(history: History) -> None:
            nonlocal logged_steps
            _log_history(handle.run_id, history, logged_steps)
            logged_steps = len(history.steps)

        history = fit(
            inputs.model, inputs.train, inputs.test, cfg.train, cfg.seed, inputs.prepare, device, num_classes,
            on_epoch=log_epoch, progress=progress, desc=cfg.run_name,
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
            },
        }
        with staged_dir(out_dir) as tmp:
            _json(tmp / "metrics.json", metrics)
            _write_csv(tmp / "history.csv", history.epochs)
            _write_csv(tmp / "steps.csv", history.steps)
            record["mlflow"]["weights_artifact"] = _log_artifacts(cfg, inputs, record, tmp)
            _json(tmp / "run.json", record)
        tracking.update_parent_summary(handle)
    return metrics


def _check_features(features_dir: Path, summary: dict[str, Any], cfg: RunConfig) -> None:
    from .backbone import load_features

    meta = load_features(features_dir)[1]
    if meta["data_digest"] != summary["digest"]:
        raise RuntimeError(f"features in {features_dir} were computed on other data: re-run `dvc repro features`")
    if cfg.pretrained_name and meta["backbone"]["name"] != cfg.pretrained_name:
        raise RuntimeError(
            f"features in {features_dir} come from backbone {meta['backbone']['name']!r}, the study uses "
            f"{cfg.pretrained_name!r}: re-run `dvc repro features`"
        )


def _pretrained_record(cfg: RunConfig, features_dir: Path | None) -> dict[str, Any] | None:
    if cfg.backbone != "frozen" or features_dir is None:
        return None
    from .backbone import load_features

    backbone = load_features(features_dir)[1]["backbone"]
    return {k: backbone[k] for k in ("name", "label", "model", "source", "sha256", "source_sha256", "pretraining", "transform")}


def _device_name(device: torch.device) -> str:
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


def _log_history(run_id: str, history: History, start: int) -> None:
    """Per-step and per-epoch metrics in a few batched requests (one per epoch, not one per value)."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(row[key]), now, int(row["step"]))
        for row in history.steps[start:]
        for key in ("loss", "lr", "grad_norm")
    ]
    epoch = history.epochs[-1]
    metrics += [
        Metric(f"epoch_{key}", float(epoch[key]), now, int(epoch["epoch"]))
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
