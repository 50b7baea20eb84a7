"""Parallel experiments: `dvc exp run --queue` + `dvc queue start -j 2` sharing the repository's SQLite store.

Evidence behind the design (tracking.store_lock): on a *fresh* store two MLflow processes starting
together both create its tables and one of them fails ("table ... already exists", "duplicate column",
alembic "expected to match one row") - one run lost. Once the tables exist, MLflow's 20 s SQLite busy
timeout absorbs the two workers' writes. So tracking.py lets one process at a time open the store for
the first time, and these tests start from a store that does not exist yet, the worst case.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_FILES, DvcRepo, create_dvc_repo, tiny_study
from helpers import cli_env

pytestmark = pytest.mark.slow

TARGET = "train-scratch@vit-seed"
VARIANTS = {"lr-a": "0.001", "lr-b": "0.002"}
BAD_SIGNS = ("database is locked", "already exists", "duplicate column", "Traceback")


def seed_runs(store: Path) -> list[dict]:
    """Seed runs in an SQLite store, read with sqlite3 itself (no MLflow in the test process)."""
    with sqlite3.connect(store) as db:
        rows = db.execute(
            "SELECT r.run_uuid, r.name, r.status, r.start_time, r.end_time, p.value FROM runs r "
            "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'vit.role' AND t.value = 'seed' "
            "LEFT JOIN params p ON p.run_uuid = r.run_uuid AND p.key = 'train.lr'"
        ).fetchall()
        final = dict(db.execute("SELECT run_uuid, value FROM latest_metrics WHERE key = 'final_test_accuracy'").fetchall())
    keys = ("run_id", "name", "status", "start", "end", "lr")
    return [dict(zip(keys, row), final_test_acc=final.get(row[0])) for row in rows]


def queue_status(repo: DvcRepo, attempts: int = 5) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed ...} from `dvc queue status`.

    While a worker writes its state file, `dvc queue status` can read it half-written and exit 255
    ("Expecting value: line 1 column 1"): that is retried, a second apart; a lasting failure is not."""
    for attempt in range(attempts):
        proc = repo.dvc("queue", "status", check=False)
        if proc.returncode == 0:
            break
        assert attempt + 1 < attempts, f"dvc queue status failed {attempts} times: {proc.stdout}{proc.stderr}"
        time.sleep(1)
    out = proc.stdout
    return {cols[1]: cols[-1] for line in out.splitlines() if len(cols := line.split()) >= 4 and cols[1] in VARIANTS}


@pytest.fixture(scope="module")
def queued(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Iterator[DvcRepo]:
    """Two queued variants of one tiny scratch stage, run by two parallel workers on a store not yet created."""
    repo = create_dvc_repo(tmp_path_factory.mktemp("queue") / "repo", PROJECT_FILES, remote_url=shared_dir / "datasets",
                           commit=False)
    repo.env["OMP_NUM_THREADS"] = "1"  # two workers on a shared 2-core machine: no thread oversubscription
    params = tiny_study(yaml.safe_load((repo.path / "params.yaml").read_text()), scratch_seeds=1, one_dataset=True)
    params["train"]["device"] = "cpu"
    (repo.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repo.commit("tiny study")
    repo.dvc("repro", "prepare", "splits")
    repo.commit("prepared")
    assert not (repo.path / "mlflow.db").exists()
    for name, lr in VARIANTS.items():
        repo.dvc("exp", "run", "--queue", TARGET, "-S", f"train.lr={lr}", "-n", name)
    # the workers are daemons that outlive `dvc queue start`: give them a file, not this process's pipe,
    # so a worker that lingers after the queue is empty (seen once: asleep for minutes) cannot block the test
    with open(repo.path.parent / "queue-start.log", "w") as log:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], cwd=repo.path, env=repo.env,
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    deadline = time.monotonic() + 400
    while (status := queue_status(repo)) and any(s in ("Queued", "Running") for s in status.values()):
        if time.monotonic() > deadline:
            repo.dvc("queue", "kill", *VARIANTS, check=False)
            kill_processes_in(repo.path)
            pytest.fail(f"queue not finished after 400s: {status}")
        time.sleep(10)
    logs = {name: repo.dvc("queue", "logs", name, check=False) for name in VARIANTS}
    (repo.path.parent / "queue.log").write_text("\n".join(f"=== {n}\n{p.stdout}{p.stderr}" for n, p in logs.items()))
    assert set(status) == set(VARIANTS) and set(status.values()) == {"Success"}, (
        f"{status}\n" + "\n".join(f"=== {n}\n{p.stdout[-3000:]}{p.stderr[-3000:]}" for n, p in logs.items())
    )
    yield repo
    kill_processes_in(repo.path)


def kill_processes_in(folder: Path) -> None:
    """Kill what still runs in ``folder`` (a queue worker that did not exit); Linux /proc only."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def test_both_queued_runs_land_in_the_repo_store(queued: DvcRepo) -> None:
    runs = seed_runs(queued.path / "mlflow.db")
    assert sorted(r["lr"] for r in runs) == sorted(VARIANTS.values())  # none lost, none duplicated
    assert all(r["status"] == "FINISHED" and r["name"] == "vit-seed/225/baseline/seed0" for r in runs)
    # the workers ran in temporary copies under .dvc/tmp/exps; DVC_ROOT sent both to the one store
    assert not list((queued.path / ".dvc" / "tmp").rglob("mlflow.db"))
    log = (queued.path.parent / "queue.log").read_text()
    assert not [sign for sign in BAD_SIGNS if sign in log], log[-4000:]


def test_the_two_workers_really_overlapped(queued: DvcRepo) -> None:
    a, b = seed_runs(queued.path / "mlflow.db")
    assert a["start"] < b["end"] and b["start"] < a["end"], "the runs did not overlap: nothing was tested in parallel"


def test_dvc_and_mlflow_agree_on_each_experiment(queued: DvcRepo) -> None:
    shown = json.loads(queued.dvc("exp", "show", "--json").stdout)
    lrs = {r["lr"] for r in seed_runs(queued.path / "mlflow.db")}
    found = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            if exp["name"] in VARIANTS:
                found[exp["name"]] = str(exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]["lr"])
    assert found == VARIANTS and set(found.values()) == lrs


WORKER = """
import sys, time
from pathlib import Path
import mlflow
from vit_repro import tracking
folder, n = Path(sys.argv[1]), sys.argv[2]
(folder / f"ready{n}").touch()
while not (folder / "go").exists():  # everything imported: only the store's first use races
    time.sleep(0.01)
tracker = tracking.Tracker("vit-repro/race", folder)
parent = tracker.parent(f"v{n}", f"digest{n}", {"train.lr": n}, {"vit.variant": f"v{n}"}, "a race")
with tracker.run(parent, f"v{n}/seed0", {"train.lr": n}, {"vit.variant": f"v{n}"}) as run:
    tracker.log_history(run.run_id, [{"step": 0, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0}], [])
"""
WORKERS = 2


def test_processes_opening_a_fresh_store_together_all_log(tmp_path: Path) -> None:
    """The race itself, without DVC: processes released at the same instant on a store not yet created.

    Without tracking.store_lock this lost one of two runs nearly every time (3 of 3 tries).
    """
    store = tmp_path / "mlflow.db"
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(n)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(WORKERS)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{n}").exists() for n in range(WORKERS)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker did not start"
            time.sleep(0.1)
        (tmp_path / "go").touch()
        results = [(p.communicate(timeout=240)[1], p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [rc for _, rc in results] == [0] * WORKERS, "\n".join(err[-2000:] for err, _ in results)
    runs = seed_runs(store)
    assert len(runs) == WORKERS and {r["status"] for r in runs} == {"FINISHED"}
