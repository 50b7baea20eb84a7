"""Faults: a killed run resumes from its last checkpoint and ends as if never stopped; bad inputs fail first.

A tiny scratch ViT (Ti/16 at 32 px, 3 epochs, dropout 0.1, so the restored random state matters) through
the real ``vit-repro train`` CLI and the real ``dvc repro``, with SQLite MLflow stores in temporary folders.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import create_dvc_repo
from test_config import cli_env, vit_repro, write_params
from test_pipeline import PROJECT_FILES

from vit_repro import checkpoint, train
from vit_repro.backbone import BackboneError
from vit_repro.config import ConfigError, load_params, resolve_run
from vit_repro.data import DataError
from vit_repro.tracking import TrackingError

EPOCHS = 3
PARAMS = {
    "study": {"name": "cpu-small", "seeds": [0], "recipes": ["paper"]},
    "scratch": {"image_size": 32},
    "train": {"epochs": EPOCHS, "device": "cpu"},
}
TIMES = ("epoch_time_s", "wall_time_s", "train_images_per_s")


def train_args(folder: Path, prepared: Path) -> list[str]:
    return [vit_repro(), "train", "--params", str(folder / "params.yaml"),
            "--experiments", str(Path(__file__).parents[1] / "experiments"), "--backbone", "scratch",
            "--recipe", "paper", "--seed", "0", "--prepared", str(prepared), "--cache", str(folder / "cache"),
            "--out", str(folder / "out"), "--no-progress"]


def env_for(folder: Path) -> dict[str, str]:
    return cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}", OMP_NUM_THREADS="1")


def wait_for_checkpoint(folder: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The first checkpoint file written under ``folder`` (polled; the process must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(folder.glob("*.pt"))
        if found:
            return found[0]
        assert proc.poll() is None, f"training ended (exit {proc.returncode}) before writing a checkpoint"
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no checkpoint in {folder} after {timeout}s")


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items() if k not in TIMES} for row in csv.DictReader(fh)]


def assert_same_run(out: Path, reference: Path) -> None:
    """metrics.json, history.csv and steps.csv as an uninterrupted run's, to 1e-6 (times aside)."""
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert metrics.keys() == expected.keys()
    for key in expected.keys() - set(TIMES):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-6), key
    for name in ("history.csv", "steps.csv"):
        rows, expected_rows = read_csv(out / name), read_csv(reference / name)
        assert len(rows) == len(expected_rows), name
        for row, want in zip(rows, expected_rows):
            assert row == pytest.approx(want, abs=1e-6), (name, row, want)


def seed_runs(store: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("vit-repro/cpu-small")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`vit.kind` = 'seed'")
    return sorted(runs, key=lambda r: r.info.start_time)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared_dir) -> Path:
    """The outputs of the same training, never interrupted."""
    folder = tmp_path_factory.mktemp("reference")
    write_params(folder / "params.yaml", PARAMS)
    proc = subprocess.run(train_args(folder, prepared_dir), cwd=folder, env=env_for(folder), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not list((folder / ".cache" / "checkpoints").glob("*")), "a finished run leaves no checkpoint"
    return folder / "out"


@pytest.mark.slow
def test_sigkilled_run_resumes_from_its_last_checkpoint(tmp_path, prepared_dir, reference):
    write_params(tmp_path / "params.yaml", PARAMS)
    checkpoints = tmp_path / ".cache" / "checkpoints"  # under the repository root: here, the cwd
    killed = subprocess.Popen(train_args(tmp_path, prepared_dir), cwd=tmp_path, env=env_for(tmp_path),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = wait_for_checkpoint(checkpoints, killed)
    killed.kill()  # SIGKILL: no handler runs, the MLflow run stays RUNNING
    killed.wait()
    assert path.name.startswith("scratch-paper-seed0-")
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
    assert 1 <= state["epoch"] < EPOCHS and state["step"] == 8 * state["epoch"]
    assert {"model", "optimizer", "history", "rng", "mlflow_run_id", "digest"} <= state.keys()
    assert len(state["history"]["epochs"]) == state["epoch"]
    assert not (tmp_path / "out").exists()

    proc = subprocess.run(train_args(tmp_path, prepared_dir), cwd=tmp_path, env=env_for(tmp_path),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(tmp_path / "out", reference)
    assert not list(checkpoints.glob("*")), "the checkpoint is removed once the run finished"

    first, resumed = seed_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert first.info.run_id == state["mlflow_run_id"]
    assert first.info.status == "FAILED" and "killed" in first.data.tags["vit.failure"]  # found by the rerun
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["vit.resumed_from"] == first.info.run_id
    assert resumed.data.tags["vit.resumed_at_epoch"] == str(state["epoch"])
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["mlflow"]["run_id"] == resumed.info.run_id and record["mlflow"]["resumed_from"] == first.info.run_id

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the resumed run holds every epoch
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "loss")] == list(range(8 * EPOCHS))
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "epoch_test_acc")] == [1, 2, 3]


@pytest.mark.slow
def test_interrupted_dvc_repro_resumes_on_the_next_repro(tmp_path, shared_dir, reference):
    repo = create_dvc_repo(tmp_path / "repo", PROJECT_FILES, remote_url=shared_dir / "datasets", commit=False)
    write_params(repo.path / "params.yaml", PARAMS, shared=shared_dir)
    repo.commit("tiny study")
    repo.env["OMP_NUM_THREADS"] = "1"
    stage = "train-scratch@paper-0"
    # Ctrl-C in a terminal: SIGINT to dvc and the stage command it runs (one process group)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", stage], cwd=repo.path, env=repo.env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(repo.path / ".cache" / "checkpoints", proc)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    assert proc.returncode != 0
    out = repo.path / "runs" / "scratch" / "paper" / "seed0"
    assert not out.exists()

    repo.dvc("repro", stage)
    assert_same_run(out, reference)
    store = f"sqlite:///{repo.path / 'mlflow.db'}"
    first, resumed = seed_runs(store)
    assert first.info.status == "KILLED"
    assert resumed.data.tags["vit.resumed_from"] == first.info.run_id and resumed.info.status == "FINISHED"
    assert "Data and pipelines are up to date" in repo.dvc("repro", stage).stdout


# ----------------------------------------------------------------------------- checkpoint files

def test_unreadable_or_foreign_checkpoints_are_ignored(tmp_path):
    ckpt = checkpoint.Checkpoint(tmp_path / "run.pt", digest="abc")
    assert ckpt.load() is None  # none yet
    ckpt.save({"epoch": 1, "weights": torch.ones(2)})
    assert ckpt.load()["epoch"] == 1 and not list(tmp_path.glob("*.tmp"))
    checkpoint.Checkpoint(ckpt.path, digest="another configuration").save({"epoch": 2})
    with pytest.warns(UserWarning, match="another version or configuration"):
        assert ckpt.load() is None
    ckpt.path.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        assert ckpt.load() is None
    torch.save({"version": checkpoint.CHECKPOINT_VERSION, "digest": "abc", "code": _Pickled()}, ckpt.path)
    with pytest.warns(UserWarning, match="unreadable"):  # weights_only: an object that could run code is refused
        assert ckpt.load() is None
    ckpt.remove()
    assert not list(tmp_path.iterdir())


class _Pickled:
    """Anything but tensors and plain containers."""


# ----------------------------------------------------------------------------- validation before work

def test_bad_paths_and_uris_fail_before_any_work(tmp_path, repo_root, prepared_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("scratch_inputs", "frozen_inputs"):
        monkeypatch.setattr(train, name, lambda *a, **k: pytest.fail("data was loaded before the inputs were checked"))
    params = load_params(write_params(tmp_path / "params.yaml", PARAMS))
    scratch = resolve_run(params, "scratch", "paper", 0, repo_root / "experiments")
    frozen = resolve_run(params, "frozen", "paper", 0, repo_root / "experiments")
    out = tmp_path / "out"

    with pytest.raises(DataError, match="dvc repro prepare"):
        train.run(scratch, tmp_path / "missing", out)
    with pytest.raises(BackboneError, match="dvc repro features"):
        train.run(frozen, prepared_dir, out, features_dir=tmp_path / "no-features")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        train.run(scratch, prepared_dir, tmp_path / "file" / "out")
    with pytest.raises(ConfigError, match=r"--cache"):
        train.run(scratch, prepared_dir, out, cache_dir=tmp_path / "file" / "cache")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(TrackingError, match="unreachable"):
        train.run(scratch, prepared_dir, out)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp://example.invalid/store")
    with pytest.raises(TrackingError, match="unsupported scheme"):
        train.run(scratch, prepared_dir, out)
    assert not out.exists()
