"""``vit_repro.tracking`` against real MLflow SQLite stores, without training: where runs go, how the experiment
is set up, how runs end, how runs of dead processes are closed, one parent per configuration, bounded requests.

Training through DVC with faults is in test_failures.py; a tracking server that dies mid-run in test_server.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vit_repro import tracking
from vit_repro.core import digest, flatten
from vit_repro.core.provenance import git_state

EXPERIMENT = "vit-repro/test"


# ----------------------------------------------------------------------------- where the store is

def test_repo_root_honours_dvc_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "real-repo"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nested = tmp_path / "elsewhere" / "deep"
    nested.mkdir(parents=True)
    assert tracking.repo_root() == (tmp_path / "real-repo").resolve()
    assert tracking.repo_root(nested) == (tmp_path / "real-repo").resolve()
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'real-repo').resolve()}/mlflow.db"


def test_repo_root_without_dvc_root_finds_the_enclosing_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "proj" / ".dvc").mkdir(parents=True)
    nested = tmp_path / "proj" / "src" / "pkg"
    nested.mkdir(parents=True)
    assert tracking.repo_root(nested) == (tmp_path / "proj").resolve()
    assert tracking.in_repository(nested)
    monkeypatch.chdir(nested)
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'proj').resolve()}/mlflow.db"
    outside = tmp_path / "outside"
    outside.mkdir()
    assert not tracking.in_repository(outside)


def test_mlflow_tracking_uri_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # empty counts as unset
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_public_uri_hides_passwords_and_the_checkout_path(tmp_path):
    assert tracking.public_uri(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path) == "sqlite:///mlflow.db"
    assert tracking.public_uri("http://user:secret@host:5000", tmp_path) == "http://host:5000"
    assert tracking.public_uri("http://host:5000", tmp_path) == "http://host:5000"


def test_check_backend_rejects_unusable_stores(tmp_path):
    with pytest.raises(tracking.TrackingError, match="missing or read-only"):
        tracking.check_backend(f"sqlite:///{tmp_path / 'no-such-folder' / 'mlflow.db'}")
    with pytest.raises(tracking.TrackingError, match="unsupported scheme 'ftp'"):
        tracking.check_backend("ftp://example.invalid/store")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(tracking.TrackingError, match="unreachable.*start it"):
        tracking.check_backend(f"http://127.0.0.1:{port}")
    tracking.check_backend(f"sqlite:///{tmp_path / 'mlflow.db'}")  # an existing, writable folder is fine


# ----------------------------------------------------------------------------- bounded requests

def test_http_limits_bound_every_request_unless_the_user_chose(monkeypatch):
    for key in tracking.HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")  # the user's own setting wins
    tracking.bound_http_requests()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
    for key, value in tracking.HTTP_LIMITS.items():
        if key != "MLFLOW_HTTP_REQUEST_TIMEOUT":
            assert os.environ[key] == value
    # the stated bound covers every attempt's timeout and the back-off between them
    limits = tracking.HTTP_LIMITS
    attempts = int(limits["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) + 1
    backoff = sum(float(limits["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) * 2 ** i for i in range(attempts - 1))
    assert attempts * float(limits["MLFLOW_HTTP_REQUEST_TIMEOUT"]) + backoff <= tracking.REQUEST_BOUND_S


def test_transport_failures_are_told_from_other_mlflow_errors():
    import requests
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise requests.exceptions.ConnectionError("refused")
        except Exception as exc:
            raise MlflowException(f"API request to http://h/api failed with exception {exc}")
    except MlflowException as wrapped:
        assert tracking._unanswered(wrapped)
    assert tracking._unanswered(requests.exceptions.ReadTimeout("slow"))
    assert not tracking._unanswered(MlflowException("Changing param values is not allowed"))
    assert not tracking._unanswered(ValueError("bad"))


# ----------------------------------------------------------------------------- a real store

@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An SQLite store with MLflow's tables created (once: migrations take seconds)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def root(tmp_path, empty_store, monkeypatch) -> Path:
    """A repository root holding a copy of the empty store; the store of every Tracker made in the test."""
    (tmp_path / ".dvc").mkdir()
    shutil.copy2(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def client(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def test_the_experiment_is_created_beside_the_store_as_a_training_experiment(root):
    tracker = tracking.Tracker(EXPERIMENT, root)
    exp = client(root).get_experiment(tracker.experiment_id)
    assert exp.name == EXPERIMENT
    assert exp.artifact_location == (root / "mlartifacts").as_uri()
    assert exp.tags[tracking.EXPERIMENT_KIND[0]] == tracking.EXPERIMENT_KIND[1] == "custom_model_development"
    assert tracker.store == "sqlite:///mlflow.db"

    other = client(root).create_experiment("made-elsewhere")  # an existing experiment without the kind gets it
    exp_name = client(root).get_experiment(other).name
    assert tracking.Tracker(exp_name, root).experiment_id == other
    assert client(root).get_experiment(other).tags[tracking.EXPERIMENT_KIND[0]] == tracking.EXPERIMENT_KIND[1]


def test_one_parent_per_configuration_with_its_params_and_summary(root):
    tracker = tracking.Tracker(EXPERIMENT, root)
    params = {"train.lr": "0.001", "model": "vit:Ti/16"}
    first = tracker.parent("vit/225/baseline", "aaaaaaaaaaaa1", params, {"vit.variant": "vit/225/baseline"}, "about")
    again = tracker.parent("vit/225/baseline", "aaaaaaaaaaaa1", params, {"vit.variant": "vit/225/baseline"}, "about")
    other = tracker.parent("vit/225/baseline", "bbbbbbbbbbbb2", params, {"vit.variant": "vit/225/baseline"}, "about")
    assert first == again != other
    runs = {r: client(root).get_run(r) for r in (first, other)}
    assert runs[first].info.run_name == "vit/225/baseline · aaaaaaaa"
    assert runs[other].info.run_name == "vit/225/baseline · bbbbbbbb"
    assert runs[first].data.params == params and runs[first].data.tags["mlflow.note.content"] == "about"
    with tracker.run(first, "vit/225/baseline/seed0", {"seed": "0"}, {"vit.seed": "0"}) as handle:
        tracker.log_history(handle.run_id, [{"step": 0, "loss": 1.0, "lr": 0.1, "grad_norm": 2.0}],
                            [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": float("nan"),
                              "test_acc": float("nan"), "test_balanced_acc": float("nan"), "epoch_time_s": 1.5}])
    tracker.finish_parent(first, {"test_bacc_mean": 0.5, "test_bacc_std": float("nan"), "seeds_finished": 1})
    parent, seed = client(root).get_run(first), client(root).get_run(handle.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics == {"test_bacc_mean": 0.5, "seeds_finished": 1}
    assert parent.info.start_time <= seed.info.start_time and parent.info.end_time >= seed.info.end_time
    assert seed.info.status == "FINISHED" and seed.data.tags["mlflow.parentRunId"] == first
    assert set(seed.data.metrics) == {"loss", "lr", "grad_norm", "epoch_train_loss", "epoch_train_acc", "epoch_seconds"}


def test_a_run_ends_failed_on_an_error_and_killed_on_ctrl_c_or_sigterm(root):
    tracker = tracking.Tracker(EXPERIMENT, root)
    parent = tracker.parent("v", "d" * 12, {}, {}, "")
    ids = {}
    with pytest.raises(ValueError):
        with tracker.run(parent, "error", {}, {}) as handle:
            ids["error"] = handle.run_id
            raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt):
        with tracker.run(parent, "ctrl-c", {}, {}) as handle:
            ids["ctrl-c"] = handle.run_id
            raise KeyboardInterrupt
    with pytest.raises(tracking.Interrupted):
        with tracker.run(parent, "sigterm", {}, {}) as handle:
            ids["sigterm"] = handle.run_id
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    runs = {k: client(root).get_run(v) for k, v in ids.items()}
    assert runs["error"].info.status == "FAILED" and runs["error"].data.tags["vit.failure"] == "ValueError: boom"
    assert runs["ctrl-c"].info.status == "KILLED" and runs["sigterm"].info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_runs_of_dead_processes_are_closed_by_the_next_start_of_any_run(root):
    """Any RUNNING run of the experiment (another variant, another configuration) whose process is gone is
    marked FAILED when a Tracker opens the experiment; live ones are left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tracker = tracking.Tracker(EXPERIMENT, root)
    c = client(root)
    me = tracking._process_tags()

    def running(name: str, tags: dict[str, str]) -> str:
        return c.create_run(tracker.experiment_id, run_name=name, tags=tags).info.run_id

    ids = {
        "dead-here": running("other-variant/seed0", {**me, "vit.pid": str(dead.pid)}),
        "reused-pid": running("x/seed1", {**me, "vit.pid_started": "1.00"}),  # this pid, another start time
        "alive-here": running("x/seed2", me),
        "silent-elsewhere": running("y/seed0", {"vit.host": "elsewhere", "vit.heartbeat": "1000"}),
        "beating-elsewhere": running("y/seed1", {"vit.host": "elsewhere", "vit.heartbeat": f"{time.time():.0f}"}),
    }
    closed = tracking.Tracker(EXPERIMENT, root).closed
    assert sorted(closed) == sorted(ids[k] for k in ("dead-here", "reused-pid", "silent-elsewhere"))
    status = {k: c.get_run(v) for k, v in ids.items()}
    for key in ("dead-here", "reused-pid", "silent-elsewhere"):
        assert status[key].info.status == "FAILED", key
        assert status[key].data.tags["vit.failure"].endswith("; closed by a later run")
    assert "has ended" in status["dead-here"].data.tags["vit.failure"]
    assert "no heartbeat" in status["silent-elsewhere"].data.tags["vit.failure"]
    assert status["alive-here"].info.status == status["beating-elsewhere"].info.status == "RUNNING"


# ----------------------------------------------------------------------------- provenance

def test_git_dirty_ignores_params_and_outputs_but_not_code(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e.invalid",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e.invalid"})

    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "params.yaml").write_text("lr: 1\n")
    git("add", "-A")
    git("commit", "-qm", "init")
    commit, dirty = git_state(tmp_path)
    assert len(commit) == 40 and not dirty
    (tmp_path / "params.yaml").write_text("lr: 2\n")  # what `dvc exp run -S` does
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "out.json").write_text("{}")
    assert git_state(tmp_path) == (commit, False)
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path) == (commit, True)
    assert git_state(tmp_path / "not-a-repo") == ("unknown", True)


def test_flatten_and_digest_are_stable():
    assert flatten("", {"train": {"lr": 0.001, "betas": [0.9, 0.999]}, "model": "vit:Ti/16"}) == {
        "train.lr": "0.001", "train.betas": "[0.9, 0.999]", "model": "vit:Ti/16"}
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2}) and len(digest({})) == 12
