"""The committed study is what main reproduces: a fresh clone rebuilds what git does not hold, and then
`dvc status` must list no stale train or report stage; one committed frozen run retrains to the same numbers.

This is part of the README's test command, so CI fails a submission that changes training code, recipes or
params without rerunning the study, with a message naming the stale stages and the command that refreshes them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REBUILT = ("prepare", "splits", "pretrained", "features")  # what git does not hold, rebuilt from the sources


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory, repo_root: Path, shared_dir: Path, wheel_cache: Path) -> Path:
    """A fresh clone of the committed HEAD with the offline dataset setting and the data, weights and features rebuilt."""
    path = tmp_path_factory.mktemp("committed") / "clone"
    subprocess.run(["git", "clone", "-q", str(repo_root), str(path)], check=True)
    env = _env(path)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "--local", "course-data", "url",
                    str(shared_dir / "datasets")], cwd=path, env=env, check=True)
    (path / ".cache").mkdir()
    (path / ".cache" / "wheels").symlink_to(wheel_cache)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "features"], cwd=path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return path


def _env(path: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "VIT_REPRO_DEVICE")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def test_no_train_or_report_stage_is_stale_in_a_fresh_clone(clone: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=clone, env=_env(clone),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout or "{}")
    stale = sorted(stage for stage in status if stage.startswith(("train-", "report")))
    rebuilt_stale = sorted(stage for stage in status if stage.split("@")[0] in REBUILT)
    assert not rebuilt_stale, f"rebuilding data, weights and features did not reproduce dvc.lock: {rebuilt_stale}: {status}"
    assert not stale, (
        f"the committed study is stale: {', '.join(stale)} changed since they were run "
        f"({json.dumps({s: status[s] for s in stale})[:1500]}). Refresh it from a clean checkout of this commit: "
        "`dvc repro`, then commit dvc.lock, runs/ and reports/"
    )


def test_repro_then_says_up_to_date_and_the_report_rebuilds_byte_for_byte(clone: Path) -> None:
    env = _env(clone) | {"MLFLOW_TRACKING_URI": f"sqlite:///{clone.parent / 'nothing-trains.db'}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Data and pipelines are up to date" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    assert not (clone.parent / "nothing-trains.db").exists()  # no stage trained, no MLflow run was started
    committed = (clone / "reports" / "report.md").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "-f", "report"], cwd=clone, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (clone / "reports" / "report.md").read_bytes() == committed
    status = subprocess.run(["git", "status", "--porcelain", "reports"], cwd=clone, capture_output=True, text=True)
    assert status.stdout == "", f"dvc repro -f report changed committed files:\n{status.stdout}"


def test_a_committed_frozen_run_retrains_to_the_same_numbers(clone: Path, tmp_path: Path) -> None:
    run = "head/225/clip/seed3"
    proc = subprocess.run([sys.executable, "-m", "vit_repro.cli", "train", "--arm", "head", "--only", run, "--runs",
                           str(tmp_path / "runs")], cwd=clone,
                          env=_env(clone) | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    committed = json.loads((clone / "runs" / run / "run.json").read_text())
    again = json.loads((tmp_path / "runs" / run / "run.json").read_text())
    for split in ("train", "test"):
        assert again[split] == committed[split], split  # every number, to the last bit
    assert (tmp_path / "runs" / run / "predictions.csv").read_text() == (clone / "runs" / run / "predictions.csv").read_text()
