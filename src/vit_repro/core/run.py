"""One training run, a function of its settings, data, device and checkpoint: ``train_run``.

It trains (``train.fit``, or ``train.fit_logistic`` for the converged probe), evaluates the final weights
on the training and test sets, and writes the run folder (``record.write_run``). The shell watches it
through an ``Observer`` (MLflow: ``tracking.RunObserver``), which is told what happens and never changes
a number. Under torchrun every process calls ``train_run`` and gets the record; only rank 0 writes.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .config import Kind, RunConfig
from .distributed import broadcast, rank_and_world
from .features import Features
from .fsutil import staged_dir, write_json
from .images import Augment, ImageTransform, Images, load_images
from .networks import build_model, describe, linear_head
from .record import (BackboneRecord, DataRecord, EvalRecord, MlflowRecord, ProvenanceRecord, RunRecord, ScheduleRecord,
                     write_run)
from .schedule import Schedule
from .splits import Splits
from .train import Data, Evaluation, History, Hooks, Task, evaluate, fit, fit_logistic

WEIGHTS_DIR = "weights"  # a kept run's model.safetensors and model.json: in a frozen run's folder, in MLflow for all
WEIGHTS = f"{WEIGHTS_DIR}/model.safetensors"


class ArmData:
    """The images or features an arm trains and is tested on, loaded once and shared by its runs."""

    def __init__(self, kind: Kind, splits: Splits, prepared: Path, image_size: int, features: Features | None,
                 cache: Path | None = None) -> None:
        self.kind, self.splits, self.prepared, self.features, self.cache = kind, splits, prepared, features, cache
        self.transform = ImageTransform(resize=(image_size, image_size))  # scratch: squash to a square, pixels in [0, 1]
        self._images: dict[str, Images] = {}

    @property
    def num_classes(self) -> int:
        return len(self.splits.classes)

    def __getitem__(self, name: str) -> Data:
        """(inputs, labels) of a named image set: uint8 pixels for scratch arms, feature vectors for frozen ones."""
        subset = self.splits.subset(name)
        if self.features is not None:
            return self.features.select(subset)
        if name not in self._images:
            self._images[name] = load_images(subset, self.prepared, self.transform, self.cache)
        return self._images[name].pixels, self._images[name].labels

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.features is not None else self.transform.to_input(x)


@dataclass(frozen=True)
class Context:
    """What every run of a stage shares and records: what produced it (``provenance``) and what data it saw."""

    provenance: dict[str, Any]  # core.provenance.provenance
    data: dict[str, Any]  # core.provenance.data_info
    backbone: BackboneRecord | None  # frozen arms


@dataclass
class RunResult:
    record: RunRecord
    history: History
    test: Evaluation
    model: torch.nn.Module


class Observer:
    """What the shell sees of a run. The core calls it; it changes nothing. This one observes nothing."""

    @contextmanager
    def run(self, cfg: RunConfig, schedule: ScheduleRecord, resumed: dict[str, Any] | None) -> Iterator[MlflowRecord | None]:
        """Spans the run; yields where it is tracked (None: nowhere). Ends it FAILED or KILLED if the run raises."""
        yield None

    def epoch(self, history: History) -> None:
        """After each epoch (its checkpoint already saved): the history so far."""

    def finish(self, record: RunRecord, folder: Path, weights: Path | None) -> None:
        """The finished run's record, its folder (still staged) and its weights folder, if kept."""


def schedule_for(cfg: RunConfig, images: int) -> Schedule:
    """The steps and learning rates of a run of ``cfg`` on ``images`` training images."""
    t = cfg.train
    epochs = max(1, round(t.images_seen / images)) if t.images_seen else t.epochs
    return Schedule(images=images, batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps, epochs=epochs,
                    drop_last=t.drop_last, base_lr=t.effective_lr, warmup_fraction=t.warmup_fraction if t.warmup else 0.0,
                    decay=t.decay)


def schedule_record(cfg: RunConfig, s: Schedule, world: int) -> ScheduleRecord:
    t = cfg.train
    return ScheduleRecord(
        images=s.images, batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps, effective_batch=t.effective_batch,
        drop_last=t.drop_last, last_batch=s.last_batch, epochs=s.epochs, steps_per_epoch=s.steps_per_epoch,
        total_steps=s.total_steps, warmup_steps=s.warmup_steps, warmup_fraction=s.warmup_fraction, decay=t.decay,
        lr=t.lr, lr_scaling=t.lr_scaling, lr_reference_batch=t.lr_reference_batch, effective_lr=t.effective_lr,
        world_size=world)


def eval_record(ev: Evaluation) -> EvalRecord:
    return EvalRecord(images=ev.total, correct=ev.correct, accuracy=ev.accuracy, balanced_accuracy=ev.balanced_accuracy,
                      loss=ev.loss, confusion=ev.confusion.tolist(), recall=ev.recall,
                      predicted_classes=ev.predicted_classes, collapsed=ev.predicted_classes == 1)


def backbone_record(features: Features) -> BackboneRecord:
    b = features.info["backbone"]
    return BackboneRecord(name=b["name"], label=b["label"], model=b["model"], source=b["source"], origin=b["origin"],
                          sha256=b["sha256"], pretraining=b["pretraining"], provenance=b.get("provenance", ""),
                          transform=b["transform"], features_key=features.info["key"],
                          features_precision=features.info["precision"])


def keeps_weights(cfg: RunConfig) -> bool:
    """Whether a run's weights are kept: every frozen head, and the scratch seeds in ``train.weights_for_seeds``."""
    return cfg.kind == "frozen" or cfg.seed in cfg.train.weights_for_seeds


def train_run(cfg: RunConfig, data: ArmData, ctx: Context, device: torch.device, out: Path,
              checkpoint: Checkpoint | None = None, observer: Observer | None = None,
              progress: bool = False) -> RunResult:
    """Train, evaluate and record one run into the folder ``out`` (rank 0); every process gets the result.

    ``checkpoint``: the training state is saved there after every epoch, and a state saved there by an
    interrupted run of the same configuration is resumed from.
    """
    started_at, wall = datetime.now(timezone.utc), time.perf_counter()
    observer = observer or Observer()
    rank, world = rank_and_world()
    train, test = data[cfg.train_set], data["test"]
    schedule = schedule_for(cfg, len(train[1]))
    torch.manual_seed(cfg.seed)  # a model's initialisation depends on its seed alone
    model = (build_model(cfg.model, cfg.image_size, data.num_classes, cfg.dropout) if cfg.kind == "scratch"
             else linear_head(train[0].shape[1], data.num_classes))
    augment = Augment(cfg.augment, (cfg.image_size, cfg.image_size), cfg.seed) if cfg.augment.enabled else None
    resume = broadcast(checkpoint.load() if rank == 0 and checkpoint is not None else None)
    with observer.run(cfg, schedule_record(cfg, schedule, world), resume) as tracked:
        if checkpoint is not None and tracked is not None:
            checkpoint.run_id = tracked.run_id
        search = None
        if cfg.train.optimizer == "lbfgs":
            model, search = fit_logistic(train, data[f"{cfg.train_set}:val"], data[f"{cfg.train_set}:fit"],
                                         tuple(cfg.train.c_grid), data.num_classes)
            history = History()
        else:
            history = fit(model, Task(train, test, data.to_input, data.num_classes, augment), cfg.train, schedule,
                          cfg.seed, device, Hooks(observer.epoch if rank == 0 else None, checkpoint, resume, progress,
                                                  cfg.run_name))
        fitted = _Fitted(schedule_record(cfg, schedule, world), history, search,
                         evaluate(model, train, data.to_input, device, data.num_classes, cfg.train.precision),
                         evaluate(model, test, data.to_input, device, data.num_classes, cfg.train.precision),
                         sum(p.numel() for p in model.parameters()) if cfg.kind == "frozen" else None)
        if tracked is not None:
            tracked = tracked.model_copy(update={"weights_artifact": WEIGHTS if keeps_weights(cfg) else None,
                                                 "resumed_from": resume["mlflow_run_id"] if resume is not None else None})
        result = RunResult(_record(cfg, data, ctx, fitted, (started_at, wall), tracked), history, fitted.test, model)
        if rank == 0:
            _write(result, data, out, observer)
    if checkpoint is not None and rank == 0:
        checkpoint.remove()  # finished: nothing to resume
    return result


def _write(result: RunResult, data: ArmData, out: Path, observer: Observer) -> None:
    """The run folder, written whole; the observer sees it (and a kept model's weights) before it is swapped in.

    A frozen head's weights (a few KB) are part of its folder, ``weights/``; a kept scratch model's (megabytes)
    are only handed to the observer, from a folder beside it."""
    record = result.record
    with staged_dir(out) as tmp:
        write_run(tmp, record, result.history, result.test, data.splits.test.ids)
        if record.config.kind == "frozen":
            _weights(record, result.model, data, tmp / WEIGHTS_DIR)
        weights = (_weights(record, result.model, data, tmp.with_name(tmp.name + ".weights"))
                   if record.config.kind == "scratch" and keeps_weights(record.config) else None)
        observer.finish(record, tmp, weights)
        if weights is not None:
            shutil.rmtree(weights)


@dataclass
class _Fitted:
    """What training gave: the schedule it followed, its history, a probe's search, the final evaluations."""

    schedule: ScheduleRecord
    history: History
    search: dict[str, Any] | None
    train: Evaluation
    test: Evaluation
    trainable: int | None  # parameters trained, when not all of the model's (a frozen backbone's head)


def _record(cfg: RunConfig, data: ArmData, ctx: Context, fitted: _Fitted, clock: tuple[datetime, float],
            tracked: MlflowRecord | None) -> RunRecord:
    d, subset, history = ctx.data, data.splits.subset(cfg.train_set), fitted.history
    images_seen = sum(s["images"] for s in history.steps)
    return RunRecord(
        variant=cfg.variant, run_name=cfg.run_name, config=cfg, schedule=fitted.schedule,
        model=describe(cfg.model, cfg.image_size, data.num_classes, trainable=fitted.trainable),
        data=DataRecord(classes=list(data.splits.classes), train_set=cfg.train_set, train_images=len(subset),
                        train_counts=subset.counts(), train_digest=d["train_digests"][cfg.train_set],
                        test_images=len(data.splits.test), test_counts=data.splits.test.counts(),
                        test_digest=d["test_digest"], datasets=d["datasets"], source=d["source"]),
        backbone=ctx.backbone if cfg.kind == "frozen" else None, search=fitted.search,
        train=eval_record(fitted.train), test=eval_record(fitted.test),
        provenance=ProvenanceRecord(
            **ctx.provenance, precision=cfg.train.precision, started_at=clock[0].isoformat(timespec="seconds"),
            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            wall_time_s=time.perf_counter() - clock[1], train_seconds=history.train_seconds,
            train_images_per_s=images_seen / history.train_seconds if history.train_seconds else math.nan),
        mlflow=tracked,
    )


def _weights(record: RunRecord, model: torch.nn.Module, data: ArmData, weights: Path) -> Path:
    """``model.safetensors`` and ``model.json``, what ``vit-repro predict`` needs, in the new folder ``weights``."""
    from safetensors.torch import save_file

    cfg = record.config
    weights.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, weights / "model.safetensors")
    write_json(weights / "model.json", {
        "kind": cfg.kind, "model": cfg.model, "image_size": cfg.image_size, "classes": list(data.splits.classes),
        "backbone": record.backbone.model_dump() if record.backbone is not None else None,
        "weights": "head only (nn.Linear on the backbone's class token)" if cfg.kind == "frozen" else "full model",
        "params_total": record.model.params_total,
    })
    return weights
