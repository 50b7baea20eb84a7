"""What produced a run: the git commit, the parameter file, the code, the versions, the device and the data."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from . import digest, source_digest
from .config import read_yaml
from .dataset import read_summary, remote_url
from .devices import device_name
from .errors import UserError
from .splits import Splits

CODE_PATHS = ("src", "experiments", "dvc.yaml", "pyproject.toml", "data/manifests")  # what git_dirty looks at


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty): dirty means uncommitted changes to code, recipes or the pipeline (``CODE_PATHS``).

    ``params.yaml`` is left out on purpose: ``dvc exp run -S`` edits it, and the run records its params
    digest instead. Outputs written by earlier stages (``runs/``, ``dvc.lock``) are not code either.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        return git("rev-parse", "HEAD").strip(), bool(git("status", "--porcelain", "--", *CODE_PATHS).strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def versions() -> dict[str, str]:
    """Python, torch, torchvision and MLflow versions (MLflow read from its metadata: the core never imports it)."""
    import torchvision

    try:
        mlflow = version("mlflow")
    except PackageNotFoundError:
        mlflow = "none"
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "mlflow": mlflow, "platform": platform.platform()}


def provenance(root: Path, device: torch.device) -> dict[str, Any]:
    """The fields of ``ProvenanceRecord`` that every run of a stage shares."""
    commit, dirty = git_state(root)
    params_file = root / "params.yaml"
    params_digest = digest(read_yaml(params_file)) if params_file.is_file() else "none"
    return {"git_commit": commit, "git_dirty": dirty, "params_digest": params_digest, "code_digest": source_digest(),
            **versions(), "device": str(device), "device_name": device_name(device),
            "threads": torch.get_num_threads(), "dvc_stage": os.environ.get("DVC_STAGE", "")}


def data_info(splits: Splits, prepared: Path, root: Path) -> dict[str, Any]:
    """Digests of the training sets, the test set and the datasets, and where the archives come from."""
    datasets = {name: read_summary(prepared / name)["digest"] for name in sorted({i.dataset for i in splits.all_images()})}
    try:
        source = remote_url(root, public=True)
    except UserError:
        source = "unknown"
    return {"train_digests": {k: v.digest for k, v in splits.train_sets.items()}, "test_digest": splits.test.digest,
            "datasets": datasets, "source": source}
