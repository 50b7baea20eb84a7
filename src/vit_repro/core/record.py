"""What a finished run is: ``RunRecord``, written as ``run.json`` beside its CSVs, read back validated.

A run folder (``runs/<arm>/<train set>/<recipe>/seed<k>/``, see docs/run-outputs.md) holds:
``run.json`` (this record), ``history.csv`` (per epoch), ``steps.csv`` (per optimisation step) and
``predictions.csv`` (every test image: true class, predicted class, loss), so the report can recompute
everything, down to the image, without MLflow.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .config import RunConfig
from .errors import UserError
from .fsutil import read_json, write_json

if TYPE_CHECKING:
    from .train import Evaluation, History

FORMAT = "vit-repro-run/2"
RECORD_FILE, HISTORY_FILE, STEPS_FILE, PREDICTIONS_FILE = "run.json", "history.csv", "steps.csv", "predictions.csv"
RUN_FILES = (RECORD_FILE, HISTORY_FILE, STEPS_FILE, PREDICTIONS_FILE)
STEP_COLUMNS = ["step", "epoch", "lr", "loss", "grad_norm", "images"]
EPOCH_COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_balanced_acc", "lr", "epoch_time_s"]
LAYERS_FILE = "layers.txt"  # runs/<arm>/layers.txt: the arm's model layer by layer, once per arm (not per run)
IMAGE_ID_CHARS = 16  # of an image's sha256 in predictions.csv (unique among the study's images: checked)


class RecordError(UserError):
    """A run folder is missing a file or holds a malformed one; the message names the file and the field."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvalRecord(_Record):
    """Results of the final weights on one image set."""

    images: int
    correct: int
    accuracy: float
    balanced_accuracy: float  # mean per-class recall
    loss: float  # mean cross-entropy per image
    confusion: list[list[int]]  # rows: true class, columns: predicted
    recall: list[float]  # per class, in `classes` order
    predicted_classes: int
    collapsed: bool  # one class predicted for every image


class ScheduleRecord(_Record):
    images: int  # training images per epoch
    batch_size: int
    grad_accum_steps: int
    effective_batch: int
    drop_last: bool
    last_batch: int  # images in an epoch's last micro-batch
    epochs: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    warmup_fraction: float
    decay: str
    lr: float  # as configured
    lr_scaling: str
    lr_reference_batch: int
    effective_lr: float  # the rate after warmup, at this batch
    world_size: int


class ModelRecord(_Record):
    name: str
    image_size: int
    params_total: int
    params_trainable: int
    forward_gmacs: float
    layers: int | None = None
    hidden: int | None = None
    mlp: int | None = None
    heads: int | None = None
    patch: int | None = None


class DataRecord(_Record):
    classes: list[str]
    train_set: str
    train_images: int
    train_counts: dict[str, int]
    train_digest: str
    test_images: int
    test_counts: dict[str, int]
    test_digest: str
    datasets: dict[str, str]  # dataset -> manifest digest
    source: str  # the committed (public) URL of the archives


class BackboneRecord(_Record):
    name: str
    label: str
    model: str
    source: str
    origin: str
    sha256: str  # of the converted weights file
    pretraining: str
    provenance: str
    transform: dict[str, Any]
    features_key: str
    features_precision: str


class ProvenanceRecord(_Record):
    git_commit: str
    git_dirty: bool  # uncommitted changes to code or recipes (params.yaml is covered by params_digest)
    params_digest: str
    code_digest: str
    python: str
    torch: str
    torchvision: str
    mlflow: str
    platform: str
    device: str
    device_name: str
    threads: int
    precision: str
    dvc_stage: str
    started_at: str
    finished_at: str
    wall_time_s: float
    train_seconds: float
    train_images_per_s: float


class MlflowRecord(_Record):
    store: str  # the tracking URI; the default SQLite store as a path relative to the repository
    experiment_name: str
    experiment_id: str
    run_id: str
    parent_run_id: str
    weights_artifact: str | None
    resumed_from: str | None


class RunRecord(_Record):
    format: Literal["vit-repro-run/2"] = FORMAT
    status: Literal["FINISHED"] = "FINISHED"
    variant: str
    run_name: str
    config: RunConfig
    schedule: ScheduleRecord
    model: ModelRecord
    data: DataRecord
    backbone: BackboneRecord | None
    search: dict[str, Any] | None  # a probe's validation search
    train: EvalRecord  # final weights, eval mode, every training image
    test: EvalRecord
    provenance: ProvenanceRecord
    mlflow: MlflowRecord | None  # where the shell tracked it; None for a run that nothing tracked


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_run(folder: Path, record: RunRecord, history: History, test: Evaluation, test_ids: tuple[str, ...]) -> None:
    """The run folder's files: the record, the epoch and step histories, every test image's prediction."""
    write_json(folder / RECORD_FILE, record.model_dump(mode="json"))
    write_csv(folder / HISTORY_FILE, history.epochs, EPOCH_COLUMNS)
    write_csv(folder / STEPS_FILE, history.steps, STEP_COLUMNS)
    rows = [{"image": i[:IMAGE_ID_CHARS], "label": int(y), "prediction": int(p), "loss": f"{loss:.6g}"}
            for i, y, p, loss in zip(test_ids, test.labels.tolist(), test.predictions.tolist(), test.losses.tolist())]
    write_csv(folder / PREDICTIONS_FILE, rows, ["image", "label", "prediction", "loss"])


def read_record(run_dir: Path) -> RunRecord:
    """``run_dir/run.json`` validated; a missing, unreadable or malformed file raises ``RecordError``."""
    path = Path(run_dir) / RECORD_FILE
    fix = "rerun its stage (`dvc repro`) or restore the folder from git"
    raw = read_json(path, fix, RecordError)
    try:
        return RunRecord.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise RecordError(f"{path}: field {field}: {e['msg']}{more}; {fix}") from None
