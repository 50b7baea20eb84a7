"""Training against a real ``mlflow server`` that stops answering (issue 15): nothing hangs, nothing is lost.

- A port that accepts connections but never answers: ``vit-repro train`` fails at once (the health check,
  5 s), exit 2, one line, nothing written.
- The server killed (SIGKILL of its process group: connections refused) or frozen (SIGSTOP: connections
  accepted, never answered) after the first epoch of a run that has two more to go: the stage fails
  within ``tracking.REQUEST_BOUND_S`` of its next request (plus the rest of that epoch and process exit;
  the measured time is printed), with one ``error:`` line and no traceback; the runs
  and ``dvc.lock`` stay as committed and the run's checkpoint is kept. The server is restarted on the same
  port and store: the rerun marks the run the dead process left RUNNING as FAILED, resumes from the
  checkpoint, completes, and its results equal the uninterrupted run's; everything is read back through
  the server's REST API with plain HTTP (experiment kind, parents with their summaries, artifacts served
  by the server).

Each uses a private copy of ``trained_study`` (conftest) and ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TrainedStudy
from servers import HOST, MlflowServer, kill_mlflow
from helpers import (ARM, STAGE, VARIANT, Background, assert_git_clean, checkpoint, error_line, hold_at, outputs,
                     results, staging_areas)
from vit_repro import tracking

pytestmark = pytest.mark.slow

EXPERIMENT = "vit-repro/cpu"


def start_server(mlflow_servers, home: Path, study: TrainedStudy, port: int | None = None) -> MlflowServer:
    """``mlflow server`` on an SQLite store in ``home`` (created empty, tables ready) with artifacts it serves."""
    if not (home / "db.sqlite").exists():
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy2(study.empty_store, home / "db.sqlite")
    return mlflow_servers("server", "--backend-store-uri", f"sqlite:///{home / 'db.sqlite'}",
                          "--artifacts-destination", str(home / "art"), cwd=home, port=port)


def test_a_server_that_never_answers_fails_training_within_seconds(trained_study: TrainedStudy, tmp_path: Path) -> None:
    """A listening port that never replies (hung server, wrong service): no hang, a clear error, nothing written."""
    repo = trained_study.copy(tmp_path / "repo")
    before = outputs(repo)
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(8)  # connections complete in the kernel; nobody ever reads or answers
        uri = f"http://{HOST}:{silent.getsockname()[1]}"
        started = time.monotonic()
        proc = subprocess.run([str(Path(sys.executable).parent / "vit-repro"), "train", "--arm", ARM], cwd=repo.path,
                              env={**repo.env, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=240)
        elapsed = time.monotonic() - started
    print(f"a silent server: failed after {elapsed:.0f}s")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert uri in line and "unreachable" in line and "start it" in line, line
    assert elapsed < 90, f"took {elapsed:.0f}s"  # the 5 s health check plus start-up; MLflow alone retries for minutes
    assert outputs(repo) == before and staging_areas(repo) == []


def api_runs(server: MlflowServer, experiment_id: str, kind: str) -> list[dict]:
    found = server.api("runs/search", body={"experiment_ids": [experiment_id], "max_results": 1000,
                                            "filter": f"tags.`vit.role` = '{kind}'",
                                            "order_by": ["attributes.start_time ASC"]})
    return found.get("runs", [])


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_server_that_dies_mid_run_fails_the_stage_within_the_bound_and_the_rerun_resumes(
        fault: str, trained_study: TrainedStudy, mlflow_servers, tmp_path: Path) -> None:
    """``killed``: SIGKILL (connections refused); ``frozen``: SIGSTOP (connections accepted, never answered, so
    every attempt runs into MLflow's request timeout: the case ``REQUEST_BOUND_S`` is for)."""
    started = time.monotonic()
    repo = trained_study.copy(tmp_path / "repo")
    committed = results(repo.path / "runs" / ARM)
    before = outputs(repo)
    home = tmp_path / "server"
    server = start_server(mlflow_servers, home, trained_study)
    repo.env["MLFLOW_TRACKING_URI"] = server.url
    force = ("repro", "--force", "--single-item", STAGE)

    # 3 epochs per seed: kill the server while seed 0 is held after its first epoch (logged and checkpointed)
    hold = hold_at(repo, tmp_path, f"{VARIANT}/seed0", 1)
    run = Background(repo, *force, log=tmp_path / "killed.log")
    run.wait_for(hold.is_held, "seed 0 held after epoch 1")
    if fault == "killed":
        kill_mlflow(server)
    else:
        os.killpg(server.proc.pid, signal.SIGSTOP)
    killed = time.monotonic()
    hold.release()
    try:
        rc = run.proc.wait(timeout=tracking.REQUEST_BOUND_S + 240)
    except subprocess.TimeoutExpired:
        run.signal(signal.SIGKILL)
        raise AssertionError(f"training hung after the server was killed:\n{run.text()[-4000:]}") from None
    elapsed = time.monotonic() - killed
    log = run.text()
    epochs = [float(s) for s in re.findall(r"epoch \d+/\d+: .*\| ([\d.]+)s$", log, flags=re.M)]
    # the rest of the epoch that was training when the server died, one bounded request, then exit (DVC too)
    bound = max(epochs) + tracking.REQUEST_BOUND_S + 30
    print(f"{fault} server: the stage failed {elapsed:.1f}s after the fault (bound {bound:.0f}s: an epoch of "
          f"{max(epochs):.1f}s + REQUEST_BOUND_S {tracking.REQUEST_BOUND_S}s + 30s to exit)")
    assert rc != 0 and elapsed < bound, log[-4000:]
    line = error_line(log)
    # the checkpoint is saved before the epoch is logged: the failing request is epoch 1's or epoch 2's log
    assert re.search(f"the MLflow tracking server at {re.escape(server.url)} stopped answering while logging epoch [12]'s "
                     "metrics", line), line
    assert "checkpoint is kept" in line and "rerun `dvc repro` to resume" in line, line
    assert f"{VARIANT}/seed0 epoch 3/3" not in log  # it failed, long before the run would have finished
    assert outputs(repo) == before
    assert_git_clean(repo, f"runs/{ARM}", "dvc.lock")
    assert checkpoint(repo, 0) is not None

    # the server back on its port and store: the rerun closes the dead run, resumes and completes
    kill_mlflow(server)  # a frozen server still holds its port
    server = start_server(mlflow_servers, home, trained_study, port=server.port)
    rerun = repo.dvc(*force)
    said = rerun.stdout + rerun.stderr
    assert f"{ARM}: marked 2 run(s) left RUNNING by a dead process as FAILED" in said, said[-3000:]
    assert f"{VARIANT}/seed0 epoch 1/3" not in said and f"{VARIANT}/seed0 epoch 3/3" in said, said[-3000:]
    assert results(repo.path / "runs" / ARM) == committed  # the same results as the uninterrupted run

    experiment = server.api("experiments/get-by-name", {"experiment_name": EXPERIMENT})["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    dead, *finished = api_runs(server, experiment["experiment_id"], "seed")
    assert dead["info"]["status"] == "FAILED" and "has ended" in tags(dead)["vit.failure"]
    assert [r["info"]["status"] for r in finished] == ["FINISHED", "FINISHED"]
    assert tags(finished[0])["vit.resumed_from"] == dead["info"]["run_id"]
    at = int(tags(finished[0])["vit.resumed_at_epoch"])  # 1: the epoch-2 log failed before its checkpoint was saved
    assert at in (1, 2) and f"{VARIANT}/seed0 epoch {at + 1}/3" in said and f"seed0 epoch {at}/3" not in said
    (parent,) = api_runs(server, experiment["experiment_id"], "variant")
    assert parent["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert metrics["seeds_finished"] == 2 and "test_bacc_mean" in metrics
    assert {p["key"] for p in parent["data"]["params"]} >= {"train.lr", "train.epochs", "model", "image_size"}
    for run in finished:
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:")  # stored and served by the server
        listed = server.api("artifacts/list", {"run_id": run["info"]["run_id"]})
        assert {"run.json", "history.csv", "predictions.csv"} <= {f["path"] for f in listed["files"]}
    assert len(list((home / "art").rglob("model.safetensors"))) == 1  # seed 0's weights, on the server's disk
    print(f"{fault} server, restarted, resumed: {time.monotonic() - started:.0f}s in all")
