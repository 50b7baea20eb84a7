"""The project the benchmark runs against (``--repo``): whether it holds a section's inputs, copying it, and
running commands (git, dvc) in it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .options import BenchError, Options


def missing_inputs(section: str, opts: Options) -> str | None:
    """Why ``section`` cannot run with ``--repo`` (None: it can)."""
    repo = opts.repo
    needs: list[str] = []
    if section in ("frozen", "data"):
        needs = ["data/splits/splits.json"]
        with contextlib.suppress(Exception):
            from ..core.config import load_params

            needs += [f"data/prepared/{d}" for d in load_params(opts.params).data.datasets]
    if section == "frozen":
        needs += ["models/pretrained/backbone.json", "data/features/features.json", "dvc.yaml"]
    missing = [n for n in needs if not (repo / n).exists()]
    if missing:
        return (f"{repo} lacks {', '.join(missing)}: build them there first (`dvc repro "
                f"{'features' if section == 'frozen' else 'splits'}`) or pass --repo")
    if section == "frozen":
        import importlib.util

        if importlib.util.find_spec("dvc") is None:
            return "dvc is not installed in this Python environment"
        if _run(["git", "rev-parse", "--git-dir"], repo, dict(os.environ)).returncode != 0:
            return f"{repo} is not a git repository (its tracked files are what the frozen section copies)"
        from ..core.config import load_params

        params = load_params(opts.params)
        info = json.loads((repo / "data/features/features.json").read_text())
        if info.get("backbone", {}).get("name") != params.backbone_name:
            return (f"{repo}/data/features come from backbone {info.get('backbone', {}).get('name')!r}, the study uses "
                    f"{params.backbone_name!r}: run `dvc repro features` there first")
    return None


COPIED_OUTPUTS = ("data/prepared", "data/splits", "models/pretrained", "data/features", ".cache/images")
NOT_COPIED = ("runs/", "reports/", "dvc.lock", ".cache/", "mlruns/", "mlartifacts/", "mlflow.db")


def _env(work: Path, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid",
               MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    env.pop("DVC_ROOT", None)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def copy_repo(repo: Path, dest: Path, env: dict[str, str]) -> None:
    """The working tree's files that git tracks or would track (no outputs), committed in a new git repo, plus the
    built data (``COPIED_OUTPUTS``) copied in."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], repo, env)
    if listed.returncode != 0:
        raise BenchError(f"{repo} is not a git repository ({listed.stderr.strip()[:200]}); pass --repo the project's root")
    for rel in filter(None, listed.stdout.split("\0")):
        src = repo / rel
        if rel.startswith(NOT_COPIED) or rel.startswith(COPIED_OUTPUTS) or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "vit-repro bench"]):
        proc = _run(cmd, dest, env)
        if proc.returncode != 0:
            raise BenchError(f"`{' '.join(cmd)}` failed in the benchmark's copy: {proc.stderr.strip()[-300:]}")
    for rel in COPIED_OUTPUTS:
        if (repo / rel).is_dir():
            shutil.copytree(repo / rel, dest / rel, dirs_exist_ok=True)


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    proc = _run(cmd, cwd, env)
    return time.perf_counter() - start, proc
