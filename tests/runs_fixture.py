"""Test fixture: schema-exact run folders (``record.RunRecord`` + CSVs) for chosen per-image predictions, without training.

    params = fixture_params(tmp_path)                               # a small study: arms vit (scratch), head, probe
    study = {cfg.run_name: cfg for cfg in resolve_study(params, EXPERIMENTS)}
    write_run(runs, cfg, correct=0.8, seed_rng=rng)                 # each test image right with probability 0.8
    write_run(runs, cfg, predict=0)                                 # collapsed: class 0 for every image

The test set is ``TEST_LABELS`` (30 images, 10 per class). Every field of the record follows from the
arguments through the project's own code (``core.run.eval_record``, ``core.run.schedule_for``), so the report
reads exactly what training writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from vit_repro.core.config import Params, RunConfig, load_params
from vit_repro.core.networks import describe
from vit_repro.core.record import (
    HISTORY_FILE, PREDICTIONS_FILE, RECORD_FILE, STEPS_FILE, BackboneRecord, DataRecord, MlflowRecord, ProvenanceRecord, RunRecord,
    write_csv, write_json,
)
from vit_repro.core.record import EPOCH_COLUMNS, STEP_COLUMNS
from vit_repro.core.run import eval_record, schedule_for, schedule_record
from vit_repro.core.train import Evaluation

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
TEST_LABELS = np.repeat([0, 1, 2], 10)
IMAGE_IDS = [f"{i:016x}" for i in range(len(TEST_LABELS))]
CLASSES = ["pizza", "steak", "sushi"]


def fixture_params(tmp_path: Path, **report) -> Params:
    """The repository's params.yaml with a small study: a scratch ViT, the frozen head and the probe."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["scratch"] = {"vit": raw["scratch"]["vit"] | {"recipes": {"225": ["baseline", "clip"]}, "seeds": 4,
                                                      "image_size": 32}}
    raw["frozen"]["head"] |= {"recipes": {"225": ["baseline", "clip", "baseline-keep-last", "clip-keep-last"],
                                          "450": ["baseline"]}, "seeds": 5}
    raw["studies"] = {"cpu": raw["studies"]["cpu"]}
    raw["report"] = raw["report"] | {"versus": [], "bootstrap_draws": 200} | report
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path)


def predictions(correct: float, rng: np.random.Generator) -> np.ndarray:
    """Per-image predictions: right with probability ``correct``, else the next class."""
    right = rng.random(len(TEST_LABELS)) < correct
    return np.where(right, TEST_LABELS, (TEST_LABELS + 1) % 3)


def write_run(runs_dir: Path, cfg: RunConfig, predict: np.ndarray | int, commit: str = "c0ffee" * 6 + "abcd",
              dirty: bool = False) -> Path:
    """The folder ``runs_dir/<cfg.out_dir>`` as training writes it, for the given test predictions."""
    pred = np.full(len(TEST_LABELS), predict) if isinstance(predict, int) else np.asarray(predict)
    labels = torch.tensor(TEST_LABELS)
    losses = torch.tensor(np.where(pred == TEST_LABELS, 0.3, 1.6), dtype=torch.float64)
    test = Evaluation(labels, torch.tensor(pred), losses, 3)
    n_train = 450 if cfg.train_set == "450" else 225
    schedule = schedule_for(cfg, n_train)
    record = RunRecord(
        variant=cfg.variant, run_name=cfg.run_name, config=cfg, schedule=schedule_record(cfg, schedule, 1),
        model=describe(cfg.model, cfg.image_size, 3),
        data=DataRecord(classes=CLASSES, train_set=cfg.train_set, train_images=n_train,
                        train_counts={c: n_train // 3 for c in CLASSES}, train_digest=f"sha256:{cfg.train_set}",
                        test_images=len(TEST_LABELS), test_counts={c: 10 for c in CLASSES}, test_digest="sha256:test",
                        datasets={"pizza_steak_sushi": "sha256:ds"}, source="https://example.invalid/data"),
        backbone=BackboneRecord(name="vit_s14_dinov2", label="ViT-S/14 (test)", model="S/14", source="file",
                                origin="test", sha256="b" * 64, pretraining="test", provenance="test fixture",
                                transform={"resize": 256, "crop": 224, "interpolation": "bicubic"}, features_key="f" * 16,
                                features_precision="fp32") if cfg.kind == "frozen" else None,
        search={"C": 1.0} if cfg.train.optimizer == "lbfgs" else None,
        train=eval_record(test), test=eval_record(test),
        provenance=ProvenanceRecord(
            git_commit=commit, git_dirty=dirty, params_digest="p" * 12, code_digest="c" * 16, python="3.11", torch="2",
            torchvision="0", mlflow="3", platform="linux", device="cpu", device_name="cpu (test)", threads=1,
            precision="fp32", dvc_stage="", started_at="2026-01-01T00:00:00+00:00",
            finished_at=f"2026-01-01T00:{cfg.seed:02d}:00+00:00", wall_time_s=1.0, train_seconds=0.5,
            train_images_per_s=100.0),
        mlflow=MlflowRecord(store="sqlite:///mlflow.db", experiment_name="vit-repro/cpu", experiment_id="1",
                            run_id=f"run{cfg.seed}", parent_run_id="parent", weights_artifact=None, resumed_from=None),
    )
    folder = runs_dir / cfg.out_dir
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / RECORD_FILE, record.model_dump(mode="json"))
    bacc = test.balanced_accuracy
    write_csv(folder / HISTORY_FILE, [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5, "test_loss": 1.0,
                                       "test_acc": test.accuracy, "test_balanced_acc": bacc, "lr": 1e-3,
                                       "epoch_time_s": 0.1} for e in (1, 2)], EPOCH_COLUMNS)
    write_csv(folder / STEPS_FILE, [{"step": s, "epoch": 1 + s // 7, "lr": schedule.lr(s), "loss": 1.0, "grad_norm": 0.5 + s % 3,
                                     "images": 32} for s in range(14)], STEP_COLUMNS)
    write_csv(folder / PREDICTIONS_FILE, [{"image": i, "label": int(y), "prediction": int(p), "loss": float(l)}
                                          for i, y, p, l in zip(IMAGE_IDS, TEST_LABELS, pred, losses.tolist())],
              ["image", "label", "prediction", "loss"])
    return folder
