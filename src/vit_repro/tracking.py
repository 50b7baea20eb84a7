"""MLflow: where runs are stored, how a run starts and ends, what it is tagged with.

Default store: ``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts``. The repository
is found through ``DVC_ROOT`` (set by DVC, and pointing at the real repository even when a queued
experiment runs in a temporary copy), so ``dvc repro``, ``dvc exp run`` and ``dvc exp run --queue``
all write to the same store. ``MLFLOW_TRACKING_URI`` overrides it (e.g. a tracking server).

Parallel queue workers (``dvc queue start -j N``) may share the SQLite store: MLflow waits up to 20 s
on a locked database, and ``store_lock`` serialises the one step that is not safe in parallel, the
creation of a new store's tables (and of the study's experiment). For many workers or several machines
use a tracking server instead (README, "Tracking server and parallel experiments").
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
LOCK_SUFFIX = "-init.lock"  # mlflow.db-init.lock, beside the store (ignored by git with /mlflow.db-*)


class TrackingError(RuntimeError):
    """The tracking backend is unusable; the message says which and how to fix it."""


def repo_root(start: Path | None = None) -> Path:
    """The project's root: ``$DVC_ROOT`` if set, else the nearest folder above holding ``.dvc`` or ``.git``."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root(root) / STORE_FILE}"


def check_backend(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a clear message, if a tracking server is unreachable or a store is unusable."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server at {uri} answered HTTP {resp.status} on /health")
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server at {uri} is unreachable ({exc}). Start it (`mlflow server --host "
                f"127.0.0.1 --port PORT`), fix MLFLOW_TRACKING_URI, or unset it to use the local SQLite store."
            ) from None
    elif scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"cannot write the MLflow store in {folder}: the folder is missing or read-only")
    elif scheme not in ("file", "databricks", "postgresql", "mysql", "mssql", ""):
        raise TrackingError(f"MLFLOW_TRACKING_URI={uri!r} has an unsupported scheme {scheme!r}")


@contextmanager
def store_lock(uri: str, timeout_s: float = 300.0) -> Iterator[None]:
    """Hold an exclusive lock beside an SQLite store while a process opens it for the first time.

    MLflow creates a new SQLite store's tables on first use without locking, so two queue workers
    starting together on a fresh store race ("table ... already exists") and one run is lost. Other
    backends (servers, database servers) need no lock; without ``fcntl`` (Windows) there is none.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    store = Path(uri.removeprefix("sqlite:///"))
    lock = store.with_name(store.name + LOCK_SUFFIX)
    with open(lock, "a") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingError(
                        f"waited {timeout_s:.0f}s for {lock}, held by another process opening the MLflow store; "
                        "if no other run is starting, the holder is stuck: end it and retry"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the repository; ("unknown", True) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, bool(status.strip())


def versions() -> dict[str, str]:
    import mlflow
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "mlflow": mlflow.__version__,
        "platform": platform.platform(),
    }


def config_digest(config: Mapping[str, Any]) -> str:
    """Short stable digest of a configuration, used to group the seeds of one variant."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config -> {"train.lr": "0.001", ...} for ``mlflow.log_params``."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for k, v in value.items():
            out |= flatten(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return {prefix: json.dumps(value) if isinstance(value, (list, tuple)) else str(value)}


@dataclass
class RunHandle:
    run_id: str
    experiment_id: str
    experiment_name: str
    parent_run_id: str
    tracking_uri: str


def _experiment(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by a parallel worker
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _parent(client: Any, experiment_id: str, variant: str, digest: str, tags: Mapping[str, str]) -> str:
    """The variant's parent run (one per variant and configuration), created on first use and left FINISHED."""
    query = f"tags.`vit.variant` = '{variant}' AND tags.`vit.config_digest` = '{digest}' AND tags.`vit.kind` = 'variant'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=variant, tags={**tags, "vit.kind": "variant"})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def close_stale_runs(client: Any, experiment_id: str, run_name: str, config_digest_: str) -> list[str]:
    """Mark runs of this (variant, seed) left RUNNING by a killed process as FAILED; return their ids."""
    query = (
        f"attributes.run_name = '{run_name}' AND attributes.status = 'RUNNING' "
        f"AND tags.`vit.config_digest` = '{config_digest_}'"
    )
    stale = [r.info.run_id for r in client.search_runs([experiment_id], filter_string=query)]
    for run_id in stale:
        client.set_tag(run_id, "vit.failure", "process ended without closing the run (killed); found by a later run")
        client.set_terminated(run_id, "FAILED")
    return stale


class Interrupted(BaseException):
    """Raised from SIGTERM so the run ends as KILLED, like Ctrl-C."""


@contextmanager
def mlflow_run(
    experiment_name: str,
    run_name: str,
    variant: str,
    variant_digest: str,
    tags: Mapping[str, str],
) -> Iterator[RunHandle]:
    """Start a nested run under the variant's parent; end it FINISHED, FAILED (error) or KILLED (signal)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    check_backend(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):  # a new store's tables, and the experiment, are created by one worker at a time
        client = MlflowClient(uri)
        experiment_id = _experiment(client, experiment_name, uri)
    close_stale_runs(client, experiment_id, run_name, variant_digest)
    parent_id = _parent(client, experiment_id, variant, variant_digest, {k: v for k, v in tags.items() if k != "vit.seed"})
    all_tags = {**tags, "vit.kind": "seed", "mlflow.parentRunId": parent_id}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    status = "FAILED"
    handle = RunHandle(run.info.run_id, experiment_id, experiment_name, parent_id, uri)
    try:
        yield handle
        status = "FINISHED"
    except (KeyboardInterrupt, Interrupted):
        status = "KILLED"
        raise
    except BaseException as exc:
        mlflow.set_tag("vit.failure", f"{type(exc).__name__}: {exc}"[:5000])
        raise
    finally:
        mlflow.end_run(status)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    update_parent_summary(handle)  # only reached when the run FINISHED: it counts itself


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def update_parent_summary(handle: RunHandle, metric: str = "final_test_acc") -> None:
    """Log mean/std of a seed metric over the parent's finished seed runs, so the compare view shows variants.

    The parent gets ``test_acc_mean``, ``test_acc_std`` and ``seeds_finished``.
    """
    import statistics

    from mlflow.tracking import MlflowClient

    client = MlflowClient(handle.tracking_uri)
    children = client.search_runs(
        [handle.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{handle.parent_run_id}' AND attributes.status = 'FINISHED'",
    )
    values = [r.data.metrics[metric] for r in children if metric in r.data.metrics]
    if not values:
        return
    name = metric.removeprefix("final_")
    client.log_metric(handle.parent_run_id, f"{name}_mean", statistics.fmean(values))
    client.log_metric(handle.parent_run_id, f"{name}_std", statistics.stdev(values) if len(values) > 1 else 0.0)
    client.log_metric(handle.parent_run_id, "seeds_finished", len(values))

