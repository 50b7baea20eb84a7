"""Training against a real MLflow tracking server, read back through its REST API with plain HTTP.

One module-scoped ``mlflow server`` (SQLite backend, artifacts served by the server from its own
folder) on 127.0.0.1; one tiny scratch run (Ti/16 at 32 px, 2 epochs) logs to it through
``MLFLOW_TRACKING_URI``. The unreachable-server case (nothing listening) is in test_tracking.py; here
a server that accepts connections but never answers must not hang training either.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from servers import HOST, MlflowServer, http
from test_config import cli_env, vit_repro, write_params

pytestmark = pytest.mark.slow

EPOCHS = 2
STEPS_PER_EPOCH = 8  # 225 training images, batch 32
UPDATES = {
    "study": {"name": "cpu-small", "seeds": [0], "recipes": ["baseline"]},
    "scratch": {"image_size": 32},
    "train": {"epochs": EPOCHS, "device": "cpu", "weights_for_seeds": [0]},
}


def train_command(prepared: Path, cache: Path, out: Path) -> list[str]:
    return [vit_repro(), "train", "--backbone", "scratch", "--recipe", "baseline", "--seed", "0",
            "--prepared", str(prepared), "--cache", str(cache), "--out", str(out), "--no-progress"]


def project(folder: Path, repo_root: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "experiments").mkdir()
    for recipe in (repo_root / "experiments").glob("*.yaml"):
        (folder / "experiments" / recipe.name).write_text(recipe.read_text())
    write_params(folder, UPDATES)
    return folder


@pytest.fixture(scope="module")
def server(mlflow_servers, tmp_path_factory) -> MlflowServer:
    home = tmp_path_factory.mktemp("mlflow-server")
    return mlflow_servers(
        "server", "--backend-store-uri", f"sqlite:///{home / 'db.sqlite'}", "--artifacts-destination", str(home / "art"),
        cwd=home, wait=False,  # starts while the data is prepared; `trained` waits for it
    )


@pytest.fixture(scope="module")
def trained(server: MlflowServer, tmp_path_factory, repo_root: Path, prepared_dir: Path) -> Path:
    """The stage-output folder of one finished run logged to ``server``."""
    server.wait_ready()
    folder = project(tmp_path_factory.mktemp("server-run") / "project", repo_root)
    out = folder / "runs" / "seed0"
    proc = subprocess.run(train_command(prepared_dir, folder / "cache", out), cwd=folder,
                          env=cli_env(MLFLOW_TRACKING_URI=server.url), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}\n--- server log ---\n{server.log_tail()}"
    return out


def test_run_is_read_back_through_the_rest_api(server: MlflowServer, trained: Path) -> None:
    record = json.loads((trained / "run.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    assert record["mlflow"]["tracking_uri"] == server.url
    # nothing was written to a local store: everything went to the server
    assert not (trained.parents[1] / "mlflow.db").exists() and not (trained.parents[1] / "mlartifacts").exists()

    experiment = server.api("experiments/get-by-name", {"experiment_name": "vit-repro/cpu-small"})["experiment"]
    assert experiment["experiment_id"] == record["mlflow"]["experiment_id"]
    found = server.api("runs/search", body={
        "experiment_ids": [experiment["experiment_id"]], "filter": "tags.`vit.kind` = 'seed'", "max_results": 100,
    })["runs"]
    assert [r["info"]["run_id"] for r in found] == [record["mlflow"]["run_id"]]

    run = server.api("runs/get", {"run_id": record["mlflow"]["run_id"]})["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "scratch-baseline/seed0"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.epochs"] == str(EPOCHS) and params["image_size"] == "32" and params["model"] == "Ti/16"
    logged = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert logged["final_test_acc"] == pytest.approx(metrics["test_acc"])
    assert logged["final_test_loss"] == pytest.approx(metrics["test_loss"])
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["vit.variant"] == "scratch-baseline" and tags["vit.seed"] == "0"

    history = server.api("metrics/get-history", {"run_id": run["info"]["run_id"], "metric_key": "loss",
                                                  "max_results": 1000})["metrics"]
    assert sorted(m["step"] for m in history) == list(range(EPOCHS * STEPS_PER_EPOCH))

    parent = server.api("runs/get", {"run_id": tags["mlflow.parentRunId"]})["run"]
    assert parent["info"]["status"] == "FINISHED" and parent["info"]["run_name"] == "scratch-baseline"


def test_artifacts_are_stored_and_served_by_the_server(server: MlflowServer, trained: Path) -> None:
    run_id = json.loads((trained / "run.json").read_text())["mlflow"]["run_id"]
    run = server.api("runs/get", {"run_id": run_id})["run"]
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:")  # proxied: clients never touch the folder

    listed = server.api("artifacts/list", {"run_id": run_id})
    names = {f["path"] for f in listed["files"]}
    assert {"config.json", "history.csv", "steps.csv", "evaluation.json", "curves.png", "weights"} <= names
    weights = server.api("artifacts/list", {"run_id": run_id, "path": "weights"})
    assert {f["path"] for f in weights["files"]} == {"weights/model.json", "weights/model.safetensors"}

    # downloaded through the server, byte for byte the stage output
    query = urllib.parse.urlencode({"run_uuid": run_id, "path": "history.csv"})
    status, body = http(f"{server.url}/get-artifact?{query}")
    assert status == 200 and body == (trained / "history.csv").read_bytes()
    # and stored in the server's --artifacts-destination
    stored = list((server.log.parent / "art").rglob("model.safetensors"))
    assert len(stored) == 1 and run_id in stored[0].parts


def test_a_server_that_never_answers_fails_training_within_seconds(tmp_path: Path, repo_root: Path,
                                                                     prepared_dir: Path) -> None:
    """A listening port that never replies (hung server, wrong service): no hang, a clear error, no outputs."""
    folder = project(tmp_path / "project", repo_root)
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(8)  # connections complete in the kernel; nobody ever reads or answers
        uri = f"http://{HOST}:{silent.getsockname()[1]}"
        started = time.monotonic()
        proc = subprocess.run(train_command(prepared_dir, folder / "cache", folder / "runs" / "seed0"), cwd=folder,
                              env=cli_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=240)
        elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert uri in proc.stderr and "unreachable" in proc.stderr and "Traceback" not in proc.stderr
    # the 5 s health check plus start-up; MLflow's own client would retry for minutes
    assert elapsed < 60, f"took {elapsed:.0f}s"
    assert not (folder / "runs").exists() and not (folder / "cache").exists()  # failed before loading any data
    assert not (folder / "mlflow.db").exists() and not (folder / "mlartifacts").exists()
