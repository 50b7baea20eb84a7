"""The runs a study expects, read from their folders and validated: ``load_study`` -> ``Study``.

MLflow is never queried: the report depends on exactly what DVC tracks. A run is *finished* when its
folder holds a valid record and its CSVs; *missing* when there is no folder; *failed* when a file is
missing or malformed (the reason names the file and the field); *stale* when its record was made with
other settings than the study's (the reason names the settings that differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.config import Params, RunConfig, resolve_study
from ..core.record import HISTORY_FILE, PREDICTIONS_FILE, STEPS_FILE, RecordError, RunRecord, read_record
from ..core import flatten

FINISHED, MISSING, FAILED, STALE = "finished", "missing", "failed", "stale"


@dataclass(frozen=True, eq=False)
class Run:
    """One expected run and what its folder holds."""

    config: RunConfig
    status: str
    reason: str = ""
    record: RunRecord | None = None
    history: pd.DataFrame | None = None
    steps: pd.DataFrame | None = None
    predictions: pd.DataFrame | None = None  # image, label, prediction, loss: every test image

    @property
    def finished(self) -> bool:
        return self.status == FINISHED


@dataclass(frozen=True, eq=False)
class Study:
    params: Params
    runs: list[Run]
    runs_name: str = "runs"

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    def variants(self, arm: str | None = None) -> list[str]:
        """Every variant (``arm/train set/recipe``) in study order."""
        return list(dict.fromkeys(r.config.variant for r in self.runs if arm in (None, r.config.arm)))

    def seeds(self, variant: str) -> list[Run]:
        """The finished runs of a variant, by seed."""
        return sorted((r for r in self.finished if r.config.variant == variant), key=lambda r: r.config.seed)

    def first(self, variant: str) -> Run | None:
        runs = self.seeds(variant)
        return runs[0] if runs else None

    def frame(self) -> pd.DataFrame:
        """One row per expected run: identity, status, and the headline metrics of the finished ones."""
        rows = []
        for r in self.runs:
            c, rec = r.config, r.record if r.finished else None
            rows.append({
                "arm": c.arm, "kind": c.kind, "train_set": c.train_set, "recipe": c.recipe, "variant": c.variant,
                "seed": c.seed, "status": r.status, "reason": r.reason,
                "bacc": rec.test.balanced_accuracy if rec else np.nan, "acc": rec.test.accuracy if rec else np.nan,
                "loss": rec.test.loss if rec else np.nan, "correct": rec.test.correct if rec else np.nan,
                "images": rec.test.images if rec else np.nan, "train_acc": rec.train.accuracy if rec else np.nan,
                "collapsed": rec.test.collapsed if rec else False, "wall_s": rec.provenance.wall_time_s if rec else np.nan,
            })
        return pd.DataFrame(rows)

    def correctness(self, variant: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(correct [seeds, images] bool, labels [images], seeds) of a variant's finished runs on the test set."""
        runs = self.seeds(variant)
        if not runs:
            return np.zeros((0, 0), bool), np.zeros(0, int), []
        labels = runs[0].predictions["label"].to_numpy()
        correct = np.stack([(r.predictions["prediction"] == r.predictions["label"]).to_numpy() for r in runs])
        return correct, labels, [r.config.seed for r in runs]


def _differences(expected: RunConfig, found: RunConfig) -> list[str]:
    a, b = flatten("", expected.model_dump(mode="json")), flatten("", found.model_dump(mode="json"))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise RecordError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise RecordError(f"{path}: unreadable ({type(exc).__name__})") from None
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise RecordError(f"{path}: column(s) {absent} missing")
    return frame


def read_run(folder: Path, expected: RunConfig, test_ids: list[str] | None = None) -> Run:
    """One run folder, validated against the configuration the study expects."""
    if not folder.is_dir():
        return Run(expected, MISSING, "no output folder (not trained yet, or its stage failed)")
    try:
        record = read_record(folder)
        differ = _differences(expected, record.config)
        if differ:
            shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
            return Run(expected, STALE, f"made with other settings ({shown})", record)
        history = _read_csv(folder / HISTORY_FILE, ["epoch", "train_loss", "test_balanced_acc"])
        steps = _read_csv(folder / STEPS_FILE, ["step", "lr", "loss", "grad_norm"])
        predictions = _read_csv(folder / PREDICTIONS_FILE, ["image", "label", "prediction", "loss"])
    except RecordError as exc:
        return Run(expected, FAILED, str(exc))
    if len(predictions) != record.test.images or int((predictions["label"] == predictions["prediction"]).sum()) != record.test.correct:
        return Run(expected, FAILED, f"{folder / PREDICTIONS_FILE}: does not agree with the record's test results", record)
    if test_ids is not None and list(predictions["image"]) != test_ids:
        return Run(expected, FAILED, f"{folder / PREDICTIONS_FILE}: another test set than the study's other runs", record)
    return Run(expected, FINISHED, "", record, history, steps, predictions)


def load_study(runs_dir: Path, params: Params, experiments: Path = Path("experiments")) -> Study:
    """Every run the study expects (``resolve_study``), read from ``runs_dir/<arm>/<train set>/<recipe>/seed<k>``."""
    runs_dir = Path(runs_dir)
    runs: list[Run] = []
    test_ids: list[str] | None = None
    for cfg in resolve_study(params, experiments):
        run = read_run(runs_dir / cfg.out_dir, cfg, test_ids)
        if run.finished and test_ids is None:
            test_ids = list(run.predictions["image"])
        runs.append(run)
    return Study(params, runs, runs_dir.name)
