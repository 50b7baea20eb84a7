"""A training stage: every run of one arm, in one process, resumable, its outputs replaced all at once.

``run_arm`` trains each (train set, recipe, seed) of an arm in turn with the core's ``train_run``, each
watched by MLflow (``tracking.RunObserver``), into a staging area, ``.cache/stages/<arm>-<key>/``; only
when every run has finished does the staging area replace ``runs/<arm>`` whole. So a failed or
interrupted stage leaves the previous results exactly as they were, and rerunning it skips the runs
already finished and resumes the interrupted one from its last epoch checkpoint. The key digests what
the runs depend on (configurations, data, features, the core's code): staging areas of another key are
stale and removed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from . import tracking
from .core import digest, source_digest
from .core.checkpoint import Checkpoint
from .core.config import ConfigError, Kind, Params, RunConfig, resolve_arm
from .core.devices import check_precision, resolve_device
from .core.distributed import broadcast, distributed, per_process_batch, torchrun_env
from .core.errors import UserError
from .core.features import Features, load_features, read_features_info
from .core.fsutil import replace_dir
from .core.networks import build_model, layer_summary
from .core.provenance import data_info, provenance
from .core.record import LAYERS_FILE, RUN_FILES, RecordError, RunRecord, read_record
from .core.run import ArmData, Context, Observer, backbone_record, train_run
from .core.splits import read_splits

Log = Callable[[str], None]
HOLD_ENV = "VIT_REPRO_HOLD"  # a file reading "<run name> <epoch>": the stage waits after that epoch while it does


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
    def default(cls, root: Path, runs: Path | None = None) -> "Paths":
        return cls(root, runs or root / "runs", root / "data" / "splits", root / "data" / "prepared",
                   root / "data" / "features", root / ".cache" / "images")


@dataclass
class Stage:
    """What every run of one arm shares: its data, device, context, tracking and staging area."""

    params: Params
    data: ArmData
    ctx: Context
    device: torch.device
    tracker: tracking.Tracker | None  # rank 0 only
    staging: Path
    progress: bool
    partial: bool  # only some runs of the arm (`--only`): the variants' summaries are left as they were


def _check_writable(path: Path, what: str) -> None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable; choose another path or fix its permissions")


def _select(configs: list[RunConfig], only: set[str] | None, arm: str) -> list[RunConfig]:
    if only is None:
        return configs
    unknown = sorted(only - {c.run_name for c in configs})
    if unknown:
        raise ConfigError(f"no run {unknown[0]} in arm {arm!r}: runs are named <arm>/<train set>/<recipe>/seed<k>, "
                          f"e.g. {configs[0].run_name}")
    return [c for c in configs if c.run_name in only]


def _features(params: Params, kind: Kind, paths: Paths) -> Features | None:
    if kind != "frozen":
        return None
    info = read_features_info(paths.features)
    if info["backbone"]["name"] != params.backbone_name:
        raise UserError(f"features in {paths.features} come from backbone {info['backbone']['name']!r}, the study "
                        f"uses {params.backbone_name!r}: run `dvc repro features`")
    return load_features(paths.features)


def run_arm(params: Params, kind: Kind, arm: str, paths: Paths, experiments: Path = Path("experiments"),
            progress: bool = True, log: Log = print, only: set[str] | None = None) -> list[RunRecord]:
    """Train every run of ``kind.arm`` not trained yet for this key; replace ``runs/<arm>`` when all are done.

    ``only``: train just these runs (``<arm>/<train set>/<recipe>/seed<k>``), e.g. to check that one seed
    reproduces; ``paths.runs`` then receives an arm folder holding only them. Under torchrun every process
    calls this and gets the records; only rank 0 talks to MLflow and writes files.
    """
    configs = _select(resolve_arm(params, kind, arm, experiments), only, arm)
    rank, _, world = torchrun_env()
    per_process_batch(configs[0].train.batch_size, world)
    device = resolve_device(configs[0].train.device)
    check_precision(configs[0].train.precision, device)
    splits = read_splits(paths.splits)
    features = _features(params, kind, paths)
    if rank == 0:
        _check_writable(paths.runs, "runs folder")
        _check_writable(paths.root / ".cache", "cache folder")
    key = digest({"runs": [c.model_dump(mode="json") for c in configs], "code": source_digest(),
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
        with distributed(device) as device:
            ctx = Context(provenance(paths.root, device), data_info(splits, paths.prepared, paths.root),
                          backbone_record(features) if features is not None else None)
            data = ArmData(kind, splits, paths.prepared, configs[0].image_size, features, paths.cache)
            tracker = _tracker(params, arm, paths, log) if rank == 0 else None
            stage = Stage(params, data, ctx, device, tracker, staging, progress, partial=only is not None)
            records = _run_all(stage, configs, log)
    finally:
        torch.set_num_threads(threads)
    if rank == 0:
        _write_layers(configs[0], data.num_classes, staging / arm)
        replace_dir(staging / arm, paths.runs / arm)
        shutil.rmtree(staging, ignore_errors=True)
    return records


def _tracker(params: Params, arm: str, paths: Paths, log: Log) -> tracking.Tracker:
    tracker = tracking.Tracker(f"vit-repro/{params.study.name}", paths.root)
    if tracker.closed:
        log(f"{arm}: marked {len(tracker.closed)} run(s) left RUNNING by a dead process as FAILED")
    return tracker


def _write_layers(cfg: RunConfig, num_classes: int, folder: Path) -> None:
    """The arm's model, layer by layer, with shapes and parameters (torchinfo): one file for all its runs."""
    if cfg.kind == "frozen":
        text = f"{cfg.model} backbone, frozen; a linear head on its class token is trained (see run.json `model`)\n"
    else:
        with torch.random.fork_rng(devices=[]):
            text = layer_summary(build_model(cfg.model, cfg.image_size, num_classes, cfg.dropout), cfg.image_size) + "\n"
    (folder / LAYERS_FILE).write_text(f"{cfg.model} at {cfg.image_size} px, {num_classes} classes\n\n{text}")


def _remove_stale_stages(stages: Path, current: Path, arms: set[str], log: Log) -> None:
    """Staging areas of this arm's earlier configurations, and of arms no longer in params.yaml, are stale."""
    arm = current.name.rsplit("-", 1)[0]
    for stale in sorted(stages.glob("*-*")):
        owner = stale.name.rsplit("-", 1)[0]
        if stale != current and (owner == arm or owner not in arms):
            why = "an earlier configuration" if owner == arm else "an arm no longer in params.yaml"
            log(f"{arm}: removing {stale.name}, unfinished runs of {why}")
            shutil.rmtree(stale, ignore_errors=True)


def _run_all(stage: Stage, configs: list[RunConfig], log: Log) -> list[RunRecord]:
    """Every run, variant by variant; each variant's parent MLflow run spans its seeds."""
    by_variant: dict[str, list[RunConfig]] = {}
    for cfg in configs:
        by_variant.setdefault(cfg.variant, []).append(cfg)
    records: list[RunRecord] = []
    for runs in by_variant.values():
        tracker = stage.tracker
        arm = stage.params.arm(runs[0].kind, runs[0].arm)
        parent = tracking.open_variant(tracker, runs[0], stage.ctx, arm.about, arm.seeds) if tracker else ""
        with tracker.parent_open(parent) if tracker else nullcontext():
            done = [_run_one(stage, cfg, parent, log) for cfg in runs]
        if tracker:
            tracker.finish_parent(parent, {} if stage.partial else tracking.variant_summary(done))
        records += done
    return records


def _run_one(stage: Stage, cfg: RunConfig, parent: str, log: Log) -> RunRecord:
    """A run already finished in the staging area is kept; any other is trained (resumed from its checkpoint)."""
    out = stage.staging / cfg.out_dir
    record = broadcast(_finished(out) if stage.tracker else None)
    if record is not None:
        log(f"{cfg.run_name}: already trained in this stage's staging area, kept")
        return record
    checkpoint = Checkpoint(out.with_name(f"{out.name}.checkpoint.pt"), stage.staging.name) if cfg.train.checkpoint else None
    observer = tracking.RunObserver(stage.tracker, parent, stage.ctx) if stage.tracker else Observer()
    if os.environ.get(HOLD_ENV):
        observer = _Held(observer, cfg.run_name, Path(os.environ[HOLD_ENV]))
    record = train_run(cfg, stage.data, stage.ctx, stage.device, out, checkpoint, observer, stage.progress).record
    t = record.test
    log(f"{cfg.run_name}: test balanced accuracy {t.balanced_accuracy:.4f}, accuracy {t.accuracy:.4f} "
        f"({t.correct}/{t.images}), loss {t.loss:.4f}, {record.provenance.wall_time_s:.1f}s")
    return record


class _Held:
    """Another observer, and after each epoch a wait while the file named by ``$VIT_REPRO_HOLD`` reads
    "<this run's name> <this epoch>", touching "<file>.held" meanwhile. The epoch's checkpoint is saved and
    logged by then, so a test (or a person) can signal or inspect the stage at a known state, however fast
    this machine trains."""

    def __init__(self, inner: Observer, run_name: str, hold: Path) -> None:
        self.inner, self.run_name, self.hold = inner, run_name, hold
        self.run, self.finish = inner.run, inner.finish

    def epoch(self, history) -> None:
        self.inner.epoch(history)
        epoch = str(int(history.epochs[-1]["epoch"]))
        while self.hold.is_file() and self.hold.read_text().split() == [self.run_name, epoch]:
            self.hold.with_name(self.hold.name + ".held").touch()
            time.sleep(0.05)


def _finished(out: Path) -> RunRecord | None:
    try:
        return read_record(out) if all((out / f).is_file() for f in RUN_FILES) else None
    except RecordError:
        return None
