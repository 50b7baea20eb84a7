"""The committed study is what main reproduces: a fresh clone rebuilds what git does not hold, and then
`dvc status` must list no stale train or report stage; one committed frozen run retrains to the same numbers:
to the last bit where this CPU rebuilt the backbone's features bit for bit as the study's machine did, else with
the same predictions and counts and its losses within ``OTHER_CPU_REL`` (an AVX-512 CPU against the study's AVX2
one moved the losses by 3.4e-7 relative, measured).

This is part of the README's test command, so CI fails a submission that changes training code, recipes or
params without rerunning the study, with a message naming the stale stages and the command that refreshes them.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DATA_STAGES, clean_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone(committed_clone: Path) -> Path:
    """A fresh clone of HEAD with its data, weights and features rebuilt (conftest)."""
    return committed_clone


def assert_nothing_stale(clone: Path) -> None:
    """`dvc status` in the clone: no rebuilt data stage differs from dvc.lock, and no train or report stage is stale."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=clone, env=clean_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout or "{}")
    stale = sorted(stage for stage in status if stage.startswith(("train-", "report")))
    rebuilt_stale = sorted(stage for stage in status if stage.split("@")[0] in DATA_STAGES)
    assert not rebuilt_stale, f"rebuilding data, weights and features did not reproduce dvc.lock: {rebuilt_stale}: {status}"
    assert not stale, (
        f"the committed study is stale: {', '.join(stale)} changed since they were run "
        f"({json.dumps({s: status[s] for s in stale})[:1500]}). Refresh it from a clean checkout of this commit: "
        "`dvc repro`, then commit dvc.lock, runs/ and reports/"
    )


def test_no_train_or_report_stage_is_stale_in_a_fresh_clone(clone: Path) -> None:
    assert_nothing_stale(clone)


def test_repro_then_says_up_to_date_and_the_report_rebuilds_byte_for_byte(clone: Path) -> None:
    assert_nothing_stale(clone)  # else `dvc repro` would retrain the study (an hour) before failing
    env = clean_env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{clone.parent / 'nothing-trains.db'}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Data and pipelines are up to date" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    assert not (clone.parent / "nothing-trains.db").exists()  # no stage trained, no MLflow run was started
    committed = (clone / "reports" / "report.md").read_bytes()
    # --single-item: `dvc repro -f report` alone forces every stage upstream of the report too (a full retrain)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "report"], cwd=clone, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (clone / "reports" / "report.md").read_bytes() == committed
    status = subprocess.run(["git", "status", "--porcelain", "reports"], cwd=clone, capture_output=True, text=True)
    assert status.stdout == "", f"dvc repro -f -s report changed committed files:\n{status.stdout}"


OTHER_CPU_REL = 1e-5  # the losses' tolerance where this CPU computes the features differently


def features_digest(lock: str) -> str:
    """The md5 of the features stage's output in a ``dvc.lock`` text."""
    (out,) = yaml.safe_load(lock)["stages"]["features"]["outs"]
    return out["md5"]


def test_a_committed_frozen_run_retrains_to_the_same_numbers(clone: Path, tmp_path: Path) -> None:
    run = "head/225/clip/seed3"
    committed_lock = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=clone, capture_output=True, text=True,
                                    check=True).stdout
    same_features = features_digest((clone / "dvc.lock").read_text()) == features_digest(committed_lock)
    proc = subprocess.run([sys.executable, "-m", "vit_repro.cli", "train", "--arm", "head", "--only", run, "--runs",
                           str(tmp_path / "runs")], cwd=clone,
                          env=clean_env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    committed_dir, again_dir = clone / "runs" / run, tmp_path / "runs" / run
    committed, again = (json.loads((d / "run.json").read_text()) for d in (committed_dir, again_dir))
    if same_features:
        for split in ("train", "test"):
            assert again[split] == committed[split], split  # every number, to the last bit
        assert (again_dir / "predictions.csv").read_bytes() == (committed_dir / "predictions.csv").read_bytes()
        return
    committed_rows, again_rows = (list(csv.DictReader((d / "predictions.csv").open())) for d in (committed_dir, again_dir))
    for split in ("train", "test"):
        assert {k: v for k, v in again[split].items() if k != "loss"} == \
               {k: v for k, v in committed[split].items() if k != "loss"}, split  # accuracies, confusion, counts
        assert again[split]["loss"] == pytest.approx(committed[split]["loss"], rel=OTHER_CPU_REL, abs=0), split
    assert [{k: v for k, v in r.items() if k != "loss"} for r in again_rows] == \
           [{k: v for k, v in r.items() if k != "loss"} for r in committed_rows]  # every image, label and prediction
    loss_gap = max(abs(float(a["loss"]) - float(c["loss"])) for a, c in zip(again_rows, committed_rows, strict=True))
    assert loss_gap <= 2e-5, loss_gap  # per-image losses are written to 6 decimals
    print(f"features rebuilt with other bits than the study's (another CPU kind): the same {len(again_rows)} predictions; "
          f"train loss {again['train']['loss']!r} vs {committed['train']['loss']!r}, test loss {again['test']['loss']!r} "
          f"vs {committed['test']['loss']!r}; per-image losses within {loss_gap:.1e}")
