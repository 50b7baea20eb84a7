"""A training stage: every run of one arm, in one process, resumable, its outputs replaced all at once.

``run_arm`` trains each (train set, recipe, seed) of an arm in turn, logs each to MLflow (``tracking``)
and writes its folder into a staging area, ``.cache/stages/<arm>-<key>/``; only when every run has
finished does the staging area replace ``runs/<arm>`` whole. So a failed or interrupted stage leaves the
previous results exactly as they were, and rerunning it skips the runs already finished and resumes the
interrupted one from its last epoch checkpoint. The key digests everything the runs depend on
(configurations, data, features, training code): staging areas of another key are stale and removed.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import TRAINING_MODULES, tracking
from .backbone import Features, load_features, read_features_info
from .checkpoint import Checkpoint
from .config import ConfigError, Kind, Params, RunConfig, resolve_arm
from .dataset import read_summary, remote_url
from .devices import check_precision, device_name, resolve_device
from .distributed import broadcast, distributed, per_process_batch, rank_and_world, torchrun_env
from .errors import UserError
from .fsutil import replace_dir, staged_dir
from .images import Augment, ImageTransform, Images, load_images
from .models import build_model, describe, linear_head
from .record import (
    HISTORY_FILE, IMAGE_ID_CHARS, PREDICTIONS_FILE, RECORD_FILE, STEPS_FILE, BackboneRecord, DataRecord, EvalRecord,
    MlflowRecord, ProvenanceRecord, RecordError, RunRecord, ScheduleRecord, read_record, write_csv, write_json,
)
from .schedule import Schedule
from .splits import Splits, read_splits
from .train import Evaluation, History, evaluate, fit, fit_logistic

STEP_COLUMNS = ["step", "epoch", "lr", "loss", "grad_norm", "images"]
EPOCH_COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_balanced_acc", "lr", "epoch_time_s"]


@dataclass(frozen=True)
class Paths:
    """Where a stage reads and writes, all below the repository ``root`` by default."""

    root: Path
    runs: Path
    splits: Path
    prepared: Path
    features: Path
    cache: Path | None  # decoded images

    @classmethod
    def default(cls, root: Path) -> "Paths":
        return cls(root, root / "runs", root / "data" / "splits", root / "data" / "prepared", root / "data" / "features",
                   root / ".cache" / "images")


def code_digest() -> str:
    """sha256 of the training code (``TRAINING_MODULES``): a run, a checkpoint, a stage key depend on it."""
    sha = hashlib.sha256()
    package = Path(__file__).parent
    for name in TRAINING_MODULES:
        sha.update(name.encode() + b"\0" + (package / f"{name}.py").read_bytes())
    return sha.hexdigest()[:16]


def _check_writable(path: Path, what: str) -> None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable; choose another path or fix its permissions")


class ArmInputs:
    """The images or features an arm trains and is tested on, loaded once and shared by its runs."""

    def __init__(self, kind: Kind, splits: Splits, paths: Paths, image_size: int, features: Features | None) -> None:
        self.kind, self.splits, self.paths, self.features = kind, splits, paths, features
        self.transform = ImageTransform(resize=(image_size, image_size))  # scratch: squash to a square, pixels in [0, 1]
        self._images: dict[str, Images] = {}

    def data(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of a named image set: uint8 pixels for scratch arms, feature vectors for frozen ones."""
        subset = self.splits.subset(name)
        if self.features is not None:
            return self.features.select(subset)
        if name not in self._images:
            self._images[name] = load_images(subset, self.paths.prepared, self.transform, self.paths.cache)
        return self._images[name].pixels, self._images[name].labels

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.features is not None else self.transform.to_input(x)


def schedule_for(cfg: RunConfig, images: int) -> Schedule:
    t = cfg.train
    epochs = max(1, round(t.images_seen / images)) if t.images_seen else t.epochs
    return Schedule(images=images, batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps, epochs=epochs,
                    drop_last=t.drop_last, base_lr=t.effective_lr, warmup_fraction=t.warmup_fraction if t.warmup else 0.0,
                    decay=t.decay)


def _schedule_record(cfg: RunConfig, s: Schedule, world: int) -> ScheduleRecord:
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


@dataclass
class Stage:
    """What every run of one arm shares: its inputs, device, provenance and tracking."""

    params: Params
    paths: Paths
    inputs: ArmInputs
    device: torch.device
    tracker: tracking.Tracker | None  # rank 0 only
    staging: Path
    provenance: dict[str, Any]
    data_info: dict[str, Any]
    backbone: BackboneRecord | None
    progress: bool
    partial: bool = False  # only some runs of the arm (`--only`): the variants' summaries are left as they were


def run_arm(params: Params, kind: Kind, arm: str, paths: Paths, experiments: Path = Path("experiments"),
            progress: bool = True, log=print, only: set[str] | None = None) -> list[RunRecord]:
    """Train every run of ``kind.arm`` not trained yet for this key; replace ``runs/<arm>`` when all are done.

    ``only``: train just these runs (``<arm>/<train set>/<recipe>/seed<k>``), e.g. to check that one seed
    reproduces; ``paths.runs`` then receives an arm folder holding only them.
    Under torchrun every process calls this; only rank 0 talks to MLflow and writes files.
    """
    configs = resolve_arm(params, kind, arm, experiments)
    if only is not None:
        unknown = sorted(only - {c.run_name for c in configs})
        if unknown:
            raise ConfigError(f"no run {unknown[0]} in arm {arm!r}: runs are named <arm>/<train set>/<recipe>/seed<k>, "
                              f"e.g. {configs[0].run_name}")
        configs = [c for c in configs if c.run_name in only]
    rank, _, world = torchrun_env()
    per_process_batch(configs[0].train.batch_size, world)
    device = resolve_device(configs[0].train.device)
    check_precision(configs[0].train.precision, device)
    splits = read_splits(paths.splits)
    features = None
    if kind == "frozen":
        info = read_features_info(paths.features)
        if info["backbone"]["name"] != params.backbone_name:
            raise UserError(f"features in {paths.features} come from backbone {info['backbone']['name']!r}, the study "
                            f"uses {params.backbone_name!r}: run `dvc repro features`")
        features = load_features(paths.features)
    if rank == 0:
        _check_writable(paths.runs, "runs folder")
        _check_writable(paths.root / ".cache", "cache folder")
    key = tracking.digest({"runs": [c.model_dump(mode="json") for c in configs], "code": code_digest(),
                           "test": splits.test.digest, "train": {k: v.digest for k, v in splits.train_sets.items()},
                           "features": features.info["key"] if features else None})
    staging = paths.root / ".cache" / "stages" / f"{arm}-{key}"
    if rank == 0:
        _remove_stale_stages(paths.root / ".cache" / "stages", staging, set(params.scratch) | set(params.frozen), log)
    torch.use_deterministic_algorithms(True, warn_only=True)
    threads = torch.get_num_threads()
    if kind == "frozen":  # a linear head gains nothing from threads, and one thread gives the same numbers on any CPU
        torch.set_num_threads(1)
    try:
        records = _run_stage(params, kind, configs, paths, features, splits, staging, device, rank, progress, log,
                             partial=only is not None)
    finally:
        torch.set_num_threads(threads)
    if rank == 0:
        replace_dir(staging / arm, paths.runs / arm)
        shutil.rmtree(staging, ignore_errors=True)
    return records


def _remove_stale_stages(stages: Path, current: Path, arms: set[str], log) -> None:
    """Staging areas of this arm's earlier configurations, and of arms no longer in params.yaml, are stale."""
    arm = current.name.rsplit("-", 1)[0]
    for stale in sorted(stages.glob("*-*")):
        owner = stale.name.rsplit("-", 1)[0]
        if stale != current and (owner == arm or owner not in arms):
            why = "an earlier configuration" if owner == arm else "an arm no longer in params.yaml"
            log(f"{arm}: removing {stale.name}, unfinished runs of {why}")
            shutil.rmtree(stale, ignore_errors=True)


def _run_stage(params: Params, kind: Kind, configs: list[RunConfig], paths: Paths, features: Features | None,
               splits: Splits, staging: Path, device: torch.device, rank: int, progress: bool, log,
               partial: bool) -> list[RunRecord]:
    arm = configs[0].arm
    with distributed(device) as device:
        tracker = tracking.Tracker(f"vit-repro/{params.study.name}", paths.root) if rank == 0 else None
        if tracker is not None and tracker.closed:
            log(f"{arm}: marked {len(tracker.closed)} run(s) left RUNNING by a dead process as FAILED")
        stage = Stage(params, paths, ArmInputs(kind, splits, paths, configs[0].image_size, features), device, tracker,
                      staging, _provenance(paths.root, device, configs[0]), _data_info(splits, paths),
                      _backbone_record(features), progress, partial)
        return _run_all(stage, configs, log)


def _run_all(stage: Stage, configs: list[RunConfig], log) -> list[RunRecord]:
    main = stage.tracker is not None
    records: list[RunRecord] = []
    by_variant: dict[str, list[RunConfig]] = {}
    for cfg in configs:
        by_variant.setdefault(cfg.variant, []).append(cfg)
    for variant, runs in by_variant.items():
        parent = _parent(stage, runs[0]) if main else ""
        with stage.tracker.parent_open(parent) if main else nullcontext():
            done = _run_variant(stage, runs, parent, log)
        if main:
            stage.tracker.finish_parent(parent, {} if stage.partial else _parent_summary(done))
        records += done
    return records


def _run_variant(stage: Stage, runs: list[RunConfig], parent: str, log) -> list[RunRecord]:
    main = stage.tracker is not None
    done: list[RunRecord] = []
    for cfg in runs:
        out = stage.staging / cfg.out_dir
        record = broadcast(_finished(out) if main else None)
        if record is not None:
            log(f"{cfg.run_name}: already trained in this stage's staging area, kept")
        else:
            record = train_run(stage, cfg, parent, out)
            if main:
                log(f"{cfg.run_name}: test balanced accuracy {record.test.balanced_accuracy:.4f}, accuracy "
                    f"{record.test.accuracy:.4f} ({record.test.correct}/{record.test.images}), loss "
                    f"{record.test.loss:.4f}, {record.provenance.wall_time_s:.1f}s")
        done.append(record)
    return done


def _finished(out: Path) -> RunRecord | None:
    try:
        return read_record(out) if all((out / f).is_file() for f in (RECORD_FILE, HISTORY_FILE, STEPS_FILE,
                                                                     PREDICTIONS_FILE)) else None
    except RecordError:
        return None


def _parent_summary(records: list[RunRecord]) -> dict[str, float]:
    out: dict[str, float] = {"seeds_finished": len(records)}
    for name, values in (("test_bacc", [r.test.balanced_accuracy for r in records]),
                         ("test_acc", [r.test.accuracy for r in records]), ("test_loss", [r.test.loss for r in records])):
        out[f"{name}_mean"] = statistics.fmean(values)
        out[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
    return out


def _tags(stage: Stage, cfg: RunConfig) -> dict[str, str]:
    t, p = cfg.train, stage.provenance
    return {
        "vit.study": cfg.study, "vit.kind": "seed", "vit.arm": cfg.arm, "vit.variant": cfg.variant,
        "vit.train_set": cfg.train_set, "vit.recipe": cfg.recipe, "vit.seed": str(cfg.seed), "vit.model": cfg.model,
        "vit.warmup": str(t.warmup), "vit.decay": t.decay, "vit.clip": str(t.clip_grad_norm),
        "vit.config_digest": tracking.digest(cfg.model_dump(mode="json", exclude={"seed"})),
        "vit.train_digest": stage.data_info["train_digests"][cfg.train_set], "vit.test_digest": stage.data_info["test_digest"],
        "vit.backbone": cfg.backbone.label if cfg.backbone else "none (random initialisation)",
        "mlflow.source.git.commit": p["git_commit"], "vit.git_dirty": str(p["git_dirty"]),
        "vit.params_digest": p["params_digest"], "vit.code_digest": p["code_digest"], "vit.dvc_stage": p["dvc_stage"],
        "vit.device": p["device_name"], "vit.precision": t.precision, "vit.torch": p["torch"],
    }


def _params(cfg: RunConfig) -> dict[str, str]:
    return tracking.flatten("", cfg.model_dump(mode="json", exclude={"seed", "backbone"}))


def _parent(stage: Stage, cfg: RunConfig) -> str:
    arm = stage.params.arm(cfg.kind, cfg.arm)
    tags = {k: v for k, v in _tags(stage, cfg).items() if k not in ("vit.seed", "vit.kind")}
    about = " ".join(arm.about.split())
    description = (f"{cfg.variant}: arm `{cfg.arm}` ({about}), recipe `{cfg.recipe}`, {cfg.train_set} training images; "
                   f"{arm.seeds} seeds nested below. Configuration digest {tags['vit.config_digest']}.")
    return stage.tracker.parent(cfg.variant, tags["vit.config_digest"], _params(cfg), tags, description)


def train_run(stage: Stage, cfg: RunConfig, parent: str, out: Path) -> RunRecord | None:
    """Train, evaluate and record one run; returns its record (on every process)."""
    started_at, wall = datetime.now(timezone.utc), time.perf_counter()
    rank, world = rank_and_world()
    main = rank == 0
    inputs, device = stage.inputs, stage.device
    train, test = inputs.data(cfg.train_set), inputs.data("test")
    schedule = schedule_for(cfg, len(train[1]))
    torch.manual_seed(cfg.seed)  # a model's initialisation depends on its seed alone
    if cfg.kind == "scratch":
        model = build_model(cfg.model, cfg.image_size, len(stage.inputs.splits.classes), cfg.dropout)
        model_record = describe(cfg.model, cfg.image_size, len(stage.inputs.splits.classes))
    else:
        model = linear_head(train[0].shape[1], len(stage.inputs.splits.classes))
        model_record = describe(cfg.model, cfg.image_size, len(stage.inputs.splits.classes),
                                trainable=sum(p.numel() for p in model.parameters()))
    augment = Augment(cfg.augment, (cfg.image_size, cfg.image_size), cfg.seed) if cfg.augment.enabled else None
    checkpoint = Checkpoint(out.with_name(f"{out.name}.checkpoint.pt"), stage.staging.name) if cfg.train.checkpoint else None
    resume = broadcast(checkpoint.load() if main and checkpoint is not None else None)
    tracker = stage.tracker
    run = tracker.run(parent, cfg.run_name, _params(cfg) | tracking.flatten("schedule", _schedule_record(
        cfg, schedule, world).model_dump()), _tags(stage, cfg)) if main else nullcontext()
    with run as handle:
        logged = [0, 0]

        def log_epoch(history: History) -> None:
            tracker.log_history(handle.run_id, history.steps[logged[0]:], history.epochs[logged[1]:])
            logged[:] = len(history.steps), len(history.epochs)

        if main and resume is not None:
            tracker._log(handle.run_id, tags={"vit.resumed_from": resume["mlflow_run_id"],
                                              "vit.resumed_at_epoch": str(resume["epoch"])})
        if main and checkpoint is not None:
            checkpoint.run_id = handle.run_id
        search = None
        if cfg.train.optimizer == "lbfgs":
            model, search = fit_logistic(train, inputs.data(f"{cfg.train_set}:val"), inputs.data(f"{cfg.train_set}:fit"),
                                         tuple(cfg.train.c_grid), len(stage.inputs.splits.classes))
            history = History()
        else:
            history = fit(model, train, test, cfg.train, schedule, cfg.seed, inputs.to_input, device,
                          len(stage.inputs.splits.classes), augment=augment, on_epoch=log_epoch if main else None,
                          progress=stage.progress, desc=cfg.run_name, checkpoint=checkpoint, resume=resume)
        final_test = evaluate(model, test, inputs.to_input, device, len(stage.inputs.splits.classes), cfg.train.precision)
        final_train = evaluate(model, train, inputs.to_input, device, len(stage.inputs.splits.classes), cfg.train.precision)
        if not main:
            return None
        record = _record(stage, cfg, schedule, world, model_record, search, final_train, final_test, history,
                         started_at, wall, handle, resume)
        with staged_dir(out) as tmp:
            _write_run(tmp, record, history, final_test, test_ids=inputs.splits.test.ids)
            weights = _weights(stage, cfg, model, model_record, tmp) if record.mlflow.weights_artifact else None
            tracker.finish(handle.run_id, _final_metrics(record), tmp, weights)
            if weights is not None:
                shutil.rmtree(weights)
    if checkpoint is not None:
        checkpoint.remove()  # finished: nothing to resume
    return record


def _record(stage: Stage, cfg: RunConfig, schedule: Schedule, world: int, model_record, search, final_train: Evaluation,
            final_test: Evaluation, history: History, started_at: datetime, wall: float, handle, resume) -> RunRecord:
    d, p = stage.data_info, stage.provenance
    keep = cfg.kind == "frozen" or cfg.seed in cfg.train.weights_for_seeds
    images_seen = sum(s["images"] for s in history.steps)
    return RunRecord(
        variant=cfg.variant, run_name=cfg.run_name, config=cfg,
        schedule=_schedule_record(cfg, schedule, world), model=model_record,
        data=DataRecord(classes=list(stage.inputs.splits.classes), train_set=cfg.train_set,
                        train_images=len(stage.inputs.splits.subset(cfg.train_set)),
                        train_counts=stage.inputs.splits.subset(cfg.train_set).counts(),
                        train_digest=d["train_digests"][cfg.train_set], test_images=len(stage.inputs.splits.test),
                        test_counts=stage.inputs.splits.test.counts(), test_digest=d["test_digest"],
                        datasets=d["datasets"], source=d["source"]),
        backbone=stage.backbone if cfg.kind == "frozen" else None, search=search,
        train=eval_record(final_train), test=eval_record(final_test),
        provenance=ProvenanceRecord(
            **p, precision=cfg.train.precision, started_at=started_at.isoformat(timespec="seconds"),
            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            wall_time_s=time.perf_counter() - wall, train_seconds=history.train_seconds,
            train_images_per_s=images_seen / history.train_seconds if history.train_seconds else math.nan),
        mlflow=MlflowRecord(store=stage.tracker.store, experiment_name=stage.tracker.experiment_name,
                            experiment_id=stage.tracker.experiment_id, run_id=handle.run_id, parent_run_id=handle.parent_id,
                            weights_artifact="weights/model.safetensors" if keep else None,
                            resumed_from=resume["mlflow_run_id"] if resume is not None else None),
    )


def _final_metrics(record: RunRecord) -> dict[str, float]:
    out = {f"final_test_{k}": float(getattr(record.test, k)) for k in ("accuracy", "balanced_accuracy", "loss")}
    out |= {f"final_train_{k}": float(getattr(record.train, k)) for k in ("accuracy", "balanced_accuracy", "loss")}
    out |= {"final_collapsed": float(record.test.collapsed), "wall_time_s": record.provenance.wall_time_s,
            "train_images_per_s": record.provenance.train_images_per_s}
    return {k: v for k, v in out.items() if v == v}


def _write_run(folder: Path, record: RunRecord, history: History, test: Evaluation, test_ids: tuple[str, ...]) -> None:
    write_json(folder / RECORD_FILE, record.model_dump(mode="json"))
    write_csv(folder / HISTORY_FILE, history.epochs, EPOCH_COLUMNS)
    write_csv(folder / STEPS_FILE, history.steps, STEP_COLUMNS)
    rows = [{"image": i[:IMAGE_ID_CHARS], "label": int(y), "prediction": int(p), "loss": f"{loss:.6g}"}
            for i, y, p, loss in zip(test_ids, test.labels.tolist(), test.predictions.tolist(), test.losses.tolist())]
    write_csv(folder / PREDICTIONS_FILE, rows, ["image", "label", "prediction", "loss"])


def _weights(stage: Stage, cfg: RunConfig, model: torch.nn.Module, model_record, folder: Path) -> Path:
    """``model.safetensors`` and ``model.json`` (what ``vit-repro predict`` needs) in a folder beside the run's."""
    from safetensors.torch import save_file

    weights = folder.with_name(folder.name + ".weights")
    weights.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, weights / "model.safetensors")
    write_json(weights / "model.json", {
        "kind": cfg.kind, "model": cfg.model, "image_size": cfg.image_size, "classes": list(stage.inputs.splits.classes),
        "backbone": stage.backbone.model_dump() if stage.backbone and cfg.kind == "frozen" else None,
        "weights": "head only (nn.Linear on the backbone's class token)" if cfg.kind == "frozen" else "full model",
        "params_total": model_record.params_total,
    })
    return weights


def _provenance(root: Path, device: torch.device, cfg: RunConfig) -> dict[str, Any]:
    commit, dirty = tracking.git_state(root)
    from .config import _read_yaml

    params_file = root / "params.yaml"
    params_digest = tracking.digest(_read_yaml(params_file)) if params_file.is_file() else "none"
    return {"git_commit": commit, "git_dirty": dirty, "params_digest": params_digest, "code_digest": code_digest(),
            **tracking.versions(), "device": str(device), "device_name": device_name(device),
            "threads": torch.get_num_threads(), "dvc_stage": os.environ.get("DVC_STAGE", "")}


def _data_info(splits: Splits, paths: Paths) -> dict[str, Any]:
    datasets = {}
    for name in sorted({i.dataset for i in splits.all_images()}):
        datasets[name] = read_summary(paths.prepared / name)["digest"]
    try:
        source = remote_url(paths.root, public=True)
    except UserError:
        source = "unknown"
    return {"train_digests": {k: v.digest for k, v in splits.train_sets.items()}, "test_digest": splits.test.digest,
            "datasets": datasets, "source": source}


def _backbone_record(features: Features | None) -> BackboneRecord | None:
    if features is None:
        return None
    b = features.info["backbone"]
    return BackboneRecord(name=b["name"], label=b["label"], model=b["model"], source=b["source"], origin=b["origin"],
                          sha256=b["sha256"], pretraining=b["pretraining"], provenance=b.get("provenance", ""),
                          transform=b["transform"], features_key=features.info["key"],
                          features_precision=features.info["precision"])
