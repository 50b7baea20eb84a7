"""Shared test fixtures: project paths, the offline datasets, prepared data, and temporary git+DVC repos.

Fixtures (all documented below):
- ``repo_root``: this checkout's root folder.
- ``shared_dir`` / ``shared_datasets``: ``../shared`` and ``../shared/datasets`` beside the checkout
  (CI clones the repo next to a ``shared`` folder); a test that needs them fails, it is not skipped.
- ``prepared_dataset(name)``: prepare a dataset from the shared archive once per session, return its folder.
- ``prepared_dir``: the prepared ``pizza_steak_sushi`` (225/75) folder, ready for ``load_split``.
- ``make_dvc_repo(...)``: a fresh git+DVC repo in a temp folder with chosen project files copied in.
- ``mlflow_servers(...)``: real ``mlflow server`` / ``mlflow ui`` processes on 127.0.0.1, stopped after the module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from servers import MlflowServer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DVC_REMOTE = "course-data"  # the remote that data.dvc imports from (see .dvc/config)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The project's root folder (holding params.yaml, dvc.yaml, src/)."""
    return ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout: offline datasets and pretrained weights (read-only)."""
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} not found: the tests need the offline data beside the checkout (see README, 'Offline')")
    return SHARED


@pytest.fixture(scope="session")
def shared_datasets(shared_dir: Path) -> Path:
    """``../shared/datasets``: the verified pizza_steak_sushi zips and their per-image sha256 lists."""
    return shared_dir / "datasets"


@pytest.fixture(scope="session")
def prepared_dataset(shared_datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``prepared_dataset("pizza_steak_sushi")`` -> a prepared folder, made once per session (treat as read-only)."""
    from vit_repro import data

    made: dict[str, Path] = {}

    def get(dataset: str = "pizza_steak_sushi") -> Path:
        if dataset not in made:
            spec = data.DATASETS[dataset]
            out = tmp_path_factory.mktemp("prepared") / dataset
            data.prepare(shared_datasets / spec.archive, dataset, out, manifest=data.manifest_path(dataset, ROOT))
            made[dataset] = out
        return made[dataset]

    return get


@pytest.fixture(scope="session")
def prepared_dir(prepared_dataset: Callable[[str], Path]) -> Path:
    """The prepared pizza_steak_sushi (225/75) folder: train/<class>/*.jpg, test/<class>/*.jpg, summary.json."""
    return prepared_dataset("pizza_steak_sushi")


@dataclass
class DvcRepo:
    """A temporary git+DVC repository; ``run``/``dvc``/``git`` execute in it and return the finished process."""

    path: Path
    env: dict[str, str]

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(a) for a in args], cwd=self.path, env=self.env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def dvc(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "dvc", *args, check=check)

    def git(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("git", *args, check=check)

    def commit(self, message: str = "test") -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)


def create_dvc_repo(
    path: Path,
    files: Iterable[str] = (),
    remote_url: str | Path | None = None,
    commit: bool = True,
) -> DvcRepo:
    """A fresh git+DVC repo at ``path`` with project ``files`` copied in (see ``make_dvc_repo``)."""
    path.mkdir(parents=True)
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    repo = DvcRepo(path, env)
    repo.git("init", "-q")
    repo.dvc("init", "-q")
    for rel in files:
        src, dst = ROOT / rel, path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    if remote_url is not None:
        repo.dvc("remote", "modify", "--local", DVC_REMOTE, "url", str(remote_url))
    if commit:
        repo.commit("initial")
    return repo


@pytest.fixture
def make_dvc_repo(tmp_path: Path) -> Callable[..., DvcRepo]:
    """Factory: ``make_dvc_repo(files=(...), remote_url=None, name="repo", commit=True) -> DvcRepo``.

    Runs ``git init`` and ``dvc init`` in ``tmp_path/<name>``, copies ``files`` (paths relative to the
    project root, files or folders; ``.dvc/config`` brings the project's remotes), and, when
    ``remote_url`` is given, runs ``dvc remote modify --local course-data url <remote_url>`` there, as an
    offline machine does (a relative URL is relative to the repo root, as on the command line).
    The subprocess environment disables DVC analytics and sets a git identity, and puts this Python's
    scripts folder first on PATH so stage commands such as ``vit-repro`` resolve to this install.
    """

    def make(
        files: Iterable[str] = (),
        remote_url: str | Path | None = None,
        name: str = "repo",
        commit: bool = True,
    ) -> DvcRepo:
        return create_dvc_repo(tmp_path / name, files, remote_url, commit)

    return make


@pytest.fixture(scope="module")
def mlflow_servers() -> Iterator[Callable[..., "MlflowServer"]]:
    """Factory: ``mlflow_servers("server" | "ui", *args, cwd=folder, wait=True) -> MlflowServer`` (tests/servers.py).

    Starts ``mlflow <command> <args>`` on 127.0.0.1 at a free port and returns once ``/health`` answers
    (``wait=False``: at once; call ``server.wait_ready()`` before use);
    every server started is stopped (its whole process group) when the test module ends.
    """
    from servers import start_mlflow, stop_mlflow

    started: list = []

    def start(command: str, *args: str, cwd: Path, wait: bool = True) -> "MlflowServer":
        server = start_mlflow(command, *args, cwd=cwd, wait=wait)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            stop_mlflow(server)
