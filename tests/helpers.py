"""Helpers the test modules share (imported from here, never from another test module).

- the project's params.yaml, modified: ``deep_update``, ``write_params``; a ``vit-repro`` subprocess: ``cli_env``,
  ``vit_repro_exe``;
- a trained study in a temporary repo (``conftest.trained_study``) and what a failure must leave alone:
  ``snapshot``, ``outputs``, ``assert_git_clean``, ``error_line``, ``edit_params``, ``vit_repro``, ``Background``
  (``dvc repro`` in its own process group), ``staging_areas``, ``checkpoint``, ``seed_runs``, ``parent_runs``,
  ``results``, ``free_port``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from conftest import DvcRepo, clean_env
from vit_repro.stage import HOLD_ENV

REPO = Path(__file__).resolve().parents[1]

def deep_update(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_params(path: Path, updates: dict[str, Any] | None = None) -> Path:
    """The repo's params.yaml, deep-updated with ``updates``, written to ``path`` (a file or a folder)."""
    data = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), updates or {})
    path = Path(path)
    if path.is_dir():
        path = path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a `vit-repro` subprocess: no inherited store or repo root, this Python's scripts first."""
    env = clean_env()
    env["OMP_NUM_THREADS"] = "1"  # the CPU is shared: one thread per process avoids contention
    env.update(extra)
    return env


def vit_repro_exe() -> str:
    exe = shutil.which("vit-repro", path=cli_env()["PATH"])
    assert exe, "the vit-repro console script is not installed"
    return exe



ARM = "vit"
STAGE = f"train-scratch@{ARM}"
VARIANT = "vit/225/baseline"
DATASET = "pizza_steak_sushi"
EXPERIMENT = "vit-repro/cpu"


# ----------------------------------------------------------------------------------------- helpers

def snapshot(root: Path, *paths: str) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders, relative to ``root``), by relative path."""
    out = {}
    for rel in paths:
        path = root / rel
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def outputs(repo: DvcRepo) -> dict[str, str]:
    """What a failed train stage must leave alone: the committed runs of the arm, dvc.lock, params.yaml."""
    return snapshot(repo.path, f"runs/{ARM}", "dvc.lock", "params.yaml")


def assert_git_clean(repo: DvcRepo, *paths: str) -> None:
    status = repo.git("status", "--porcelain", "--untracked-files=all", "--", *paths).stdout
    assert status == "", f"git status of {paths}:\n{status}"


def error_line(stderr: str) -> str:
    """The command's one ``error:`` line; no traceback."""
    assert "Traceback" not in stderr, stderr[-4000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-4000:]
    return lines[0]


def edit_params(repo: DvcRepo, change) -> None:
    raw = yaml.safe_load((repo.path / "params.yaml").read_text())
    change(raw)
    (repo.path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def vit_repro(repo: DvcRepo, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "vit-repro"
    return subprocess.run([str(exe), *args], cwd=repo.path, env=env or repo.env, capture_output=True, text=True,
                          timeout=300)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Background:
    """``dvc repro`` running in its own process group (as a terminal's foreground job), output to a log file."""

    def __init__(self, repo: DvcRepo, *args: str, log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=repo.path, env=repo.env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, ready, what: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"dvc exited {self.proc.returncode} before {what}:\n{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
                raise AssertionError(f"no {what} after {timeout_s:.0f}s:\n{self.text()[-4000:]}")
            time.sleep(0.2)

    def signal(self, sig: signal.Signals) -> int:
        """Send ``sig`` to the whole group (DVC and the stage's command, like Ctrl-C); its exit status."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@dataclass
class Hold:
    """``$VIT_REPRO_HOLD`` of a repository: its train stage waits after one epoch of one run (``stage._Held``)."""

    file: Path

    def is_held(self) -> bool:
        return self.file.with_name(self.file.name + ".held").exists()

    def release(self) -> None:
        self.file.unlink(missing_ok=True)
        self.file.with_name(self.file.name + ".held").unlink(missing_ok=True)


def hold_at(repo: DvcRepo, folder: Path, run_name: str, epoch: int) -> Hold:
    """Make ``repo``'s train stage wait after ``epoch`` of ``run_name`` (checkpoint saved) until released or killed."""
    hold = Hold(folder / "hold")
    hold.release()
    hold.file.write_text(f"{run_name} {epoch}\n")
    repo.env[HOLD_ENV] = str(hold.file)
    return hold


def staging_areas(repo: DvcRepo) -> list[Path]:
    return sorted((repo.path / ".cache" / "stages").glob(f"{ARM}-*"))


def checkpoint(repo: DvcRepo, seed: int) -> Path | None:
    found = [area / VARIANT / f"seed{seed}.checkpoint.pt" for area in staging_areas(repo)]
    return next((p for p in found if p.is_file()), None)


def seed_runs(repo: DvcRepo) -> list:
    client = MlflowClient(f"sqlite:///{repo.path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return [] if exp is None else client.search_runs([exp.experiment_id], "tags.`vit.role` = 'seed'",
                                                     order_by=["attributes.start_time ASC"])


def parent_runs(repo: DvcRepo) -> list:
    client = MlflowClient(f"sqlite:///{repo.path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return [] if exp is None else client.search_runs([exp.experiment_id], "tags.`vit.role` = 'variant'",
                                                     order_by=["attributes.start_time ASC"])


def results(runs: Path) -> dict[str, object]:
    """What an uninterrupted run and a resumed one must agree on: every run's evaluations, curves and predictions
    (history.csv without its wall-clock column)."""
    import csv
    import json

    out: dict[str, object] = {}
    for seed_dir in sorted(runs.glob("*/*/seed*")):
        rel = str(seed_dir.relative_to(runs))
        record = json.loads((seed_dir / "run.json").read_text())
        out[f"{rel}:test"] = record["test"]
        out[f"{rel}:train"] = record["train"]
        with open(seed_dir / "history.csv") as fh:
            out[f"{rel}:history"] = [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in csv.DictReader(fh)]
        out[f"{rel}:steps"] = (seed_dir / "steps.csv").read_text()
        out[f"{rel}:predictions"] = (seed_dir / "predictions.csv").read_text()
    return out


# ------------------------------------------------------------------------------- 1. fast failures

