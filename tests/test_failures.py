"""Nothing lost (issue 15): a stage that fails or is stopped leaves the last good result byte for byte.

Every test works on a private copy of ``trained_study`` (conftest): a real git+DVC repo where
``dvc repro train-scratch@vit`` has trained a tiny study (Ti/16 at 32 px, 2 seeds x 3 epochs, a
checkpoint after every epoch) and everything is committed. The table of the issue, one test per row:

- a fast failure of a train stage (typo'd key, negative lr, tracking server down, ``device: cuda`` on a
  CPU machine): ``dvc repro`` fails, ``runs/vit`` and ``dvc.lock`` stay as committed, and the command
  itself (``vit-repro train --arm vit``) exits 2 with one ``error:`` line naming the problem and the fix;
- SIGINT, then SIGKILL, of a train stage mid-run: outputs unchanged each time; the reruns keep the runs
  already finished in the staging area and resume the interrupted one from its checkpoint, and the end
  result equals the uninterrupted run's;
- SIGKILL, then a rerun with a changed parameter: the dead process's runs are marked FAILED, the stale
  staging area (and its checkpoint) is removed with a message, the new parent run has its own
  configuration digest and carries params, summary metrics and a duration spanning its seeds;
- a tampered, then a truncated archive at the DVC remote: ``dvc repro prepare@...`` fails naming the
  image or archive and the fix, ``dvc.lock``, ``params.yaml`` and ``data/prepared`` stay as they were;
  with the good remote back it succeeds;
- ``vit-repro check`` with ``train.device: cuda`` on a machine without CUDA: exit 2, one line.

The tracking server killed mid-run is in test_server.py; ``predict`` in test_predict.py; the UI in test_ui.py.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import TrainedStudy
from helpers import (ARM, DATASET, STAGE, VARIANT, Background, assert_git_clean, checkpoint, hold_at,
                     edit_params, error_line, free_port, outputs, parent_runs, results, seed_runs, snapshot,
                     staging_areas, vit_repro)

pytestmark = pytest.mark.slow

def _typo(raw: dict) -> None:
    raw["scratch"][ARM]["train"]["lrr"] = 0.01


def _negative_lr(raw: dict) -> None:
    raw["scratch"][ARM]["train"]["lr"] = -0.001


def _cuda(raw: dict) -> None:
    raw["scratch"][ARM]["train"]["device"] = "cuda"


FAST_FAILURES = {
    # case: (params change or None, extra environment, what the error line must say: the problem and the fix)
    "typo-key": (_typo, {}, ["lrr", "unknown key", "check its spelling"]),
    "negative-lr": (_negative_lr, {}, ["lr", "greater than 0"]),
    "server-down": (None, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"},
                    ["http://127.0.0.1:{port}", "unreachable", "start it", "MLFLOW_TRACKING_URI"]),
    "cuda-on-cpu": (_cuda, {}, ["'cuda'", "CUDA is not available", "set train.device", "auto or cpu"]),
}


@pytest.mark.parametrize("case", list(FAST_FAILURES))
def test_fast_failure_of_a_train_stage_keeps_the_committed_runs(case: str, trained_study: TrainedStudy,
                                                                tmp_path: Path) -> None:
    change, extra, expected = FAST_FAILURES[case]
    if case == "cuda-on-cpu" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `device: cuda` is valid here")
    started = time.monotonic()
    repo = trained_study.copy(tmp_path / "repo")
    port = str(free_port())
    env = {**repo.env, **{k: v.format(port=port) for k, v in extra.items()}}
    expected = [e.format(port=port) for e in expected]
    if change is not None:
        edit_params(repo, change)
    before = outputs(repo)

    # the stage is stale (its params changed) or forced; DVC runs it and it fails at once
    args = ["repro", STAGE] if change is not None else ["repro", "--force", "--single-item", STAGE]
    repro = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo.path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert repro.returncode != 0, repro.stdout[-3000:]
    said = repro.stdout + repro.stderr
    assert all(e in said for e in expected), said[-4000:]
    assert f"failed to reproduce '{STAGE}'" in said, said[-4000:]
    assert outputs(repo) == before  # runs/vit/**, dvc.lock and params.yaml byte for byte
    assert_git_clean(repo, f"runs/{ARM}", "dvc.lock")

    # the command itself: exit 2, one line naming the problem and the fix, no traceback
    direct = vit_repro(repo, "train", "--arm", ARM, env=env)
    assert direct.returncode == 2, direct.stderr[-4000:]
    line = error_line(direct.stderr)
    assert all(e in line for e in expected), line
    assert outputs(repo) == before
    assert_git_clean(repo, f"runs/{ARM}", "dvc.lock")
    print(f"{case}: {line} ({time.monotonic() - started:.0f}s)")


# ------------------------------------------------------------------------ 2. SIGINT and SIGKILL

def test_sigint_then_sigkill_keep_outputs_and_the_rerun_resumes(trained_study: TrainedStudy, tmp_path: Path) -> None:
    started = time.monotonic()
    repo = trained_study.copy(tmp_path / "repo")
    committed = results(repo.path / "runs" / ARM)
    before = outputs(repo)
    force = ("repro", "--force", "--single-item", STAGE)

    # 1. Ctrl-C while seed 1 trains, held after its first epoch's checkpoint (seed 0 is finished in the staging area)
    hold = hold_at(repo, tmp_path, f"{VARIANT}/seed1", 1)
    run = Background(repo, *force, log=tmp_path / "sigint.log")
    run.wait_for(hold.is_held, "seed 1 held after epoch 1")
    rc = run.signal(signal.SIGINT)
    assert rc != 0, run.text()[-3000:]
    assert "interrupted: the MLflow run ended as KILLED" in run.text(), run.text()[-3000:]
    assert outputs(repo) == before
    assert_git_clean(repo, f"runs/{ARM}", "dvc.lock")
    (area,) = staging_areas(repo)
    assert (area / VARIANT / "seed0" / "run.json").is_file() and checkpoint(repo, 1) is not None
    statuses = [(r.data.tags["vit.seed"], r.info.status) for r in seed_runs(repo)]
    assert statuses == [("0", "FINISHED"), ("1", "KILLED")], statuses

    # 2. SIGKILL of everything (DVC too) once the resumed seed 1 has checkpointed its second epoch
    first = checkpoint(repo, 1).stat().st_mtime_ns
    hold = hold_at(repo, tmp_path, f"{VARIANT}/seed1", 2)
    run = Background(repo, *force, log=tmp_path / "sigkill.log")
    run.wait_for(hold.is_held, "seed 1 held after epoch 2")
    assert checkpoint(repo, 1).stat().st_mtime_ns != first
    run.signal(signal.SIGKILL)
    hold.release()
    log = run.text()
    assert f"{VARIANT}/seed0: already trained in this stage's staging area, kept" in log, log[-3000:]
    assert f"{VARIANT}/seed1 epoch 1/" not in log, log[-3000:]  # resumed after epoch 1, not trained again
    assert outputs(repo) == before
    assert_git_clean(repo, f"runs/{ARM}", "dvc.lock")
    assert staging_areas(repo) == [area] and checkpoint(repo, 1) is not None
    assert [r.info.status for r in seed_runs(repo)] == ["FINISHED", "KILLED", "RUNNING"]  # the dead process's

    # 3. the rerun finishes: seed 0 kept, seed 1 resumed from its last checkpoint; the dead run is closed
    rerun = repo.dvc(*force)
    said = rerun.stdout + rerun.stderr
    assert f"{VARIANT}/seed0: already trained in this stage's staging area, kept" in said, said[-3000:]
    assert "marked 2 run(s) left RUNNING by a dead process as FAILED" in said, said[-3000:]  # its seed and parent
    assert f"{VARIANT}/seed1 epoch 3/3" in said and f"{VARIANT}/seed1 epoch 2/3" not in said, said[-3000:]
    assert staging_areas(repo) == []  # replaced runs/vit whole, then removed
    assert results(repo.path / "runs" / ARM) == committed  # exactly the uninterrupted run's results

    runs = seed_runs(repo)
    assert [r.info.status for r in runs] == ["FINISHED", "KILLED", "FAILED", "FINISHED"]
    assert "has ended" in runs[2].data.tags["vit.failure"]
    assert runs[3].data.tags["vit.resumed_from"] == runs[2].info.run_id  # the killed run's checkpoint
    assert runs[3].data.tags["vit.resumed_at_epoch"] == "2"
    print(f"SIGINT, SIGKILL and the resumed rerun: {time.monotonic() - started:.0f}s")


# ---------------------------------------------------- 4. SIGKILL, then a rerun with another parameter

def test_killed_run_is_closed_and_its_stale_checkpoint_removed_after_a_parameter_change(
        trained_study: TrainedStudy, tmp_path: Path) -> None:
    started = time.monotonic()
    repo = trained_study.copy(tmp_path / "repo")
    hold = hold_at(repo, tmp_path, f"{VARIANT}/seed0", 1)
    run = Background(repo, "repro", "--force", "--single-item", STAGE, log=tmp_path / "killed.log")
    run.wait_for(hold.is_held, "seed 0 held after epoch 1")
    assert checkpoint(repo, 0) is not None
    run.signal(signal.SIGKILL)
    hold.release()
    (stale,) = staging_areas(repo)
    old_parent = parent_runs(repo)[0]
    assert old_parent.info.status == "RUNNING" and seed_runs(repo)[0].info.status == "RUNNING"

    edit_params(repo, lambda raw: raw["scratch"][ARM]["train"].update(epochs=1))  # another configuration
    rerun = repo.dvc("repro", STAGE)
    said = rerun.stdout + rerun.stderr
    assert f"{ARM}: removing {stale.name}, unfinished runs of an earlier configuration" in said, said[-3000:]
    assert f"{ARM}: marked 2 run(s) left RUNNING by a dead process as FAILED" in said, said[-3000:]
    assert not stale.exists() and staging_areas(repo) == []  # the orphaned checkpoint went with it

    client = MlflowClient(f"sqlite:///{repo.path / 'mlflow.db'}")
    old_seed, *new_seeds = seed_runs(repo)
    for dead in (client.get_run(old_parent.info.run_id), client.get_run(old_seed.info.run_id)):
        assert dead.info.status == "FAILED" and "has ended" in dead.data.tags["vit.failure"]
    old, new = (client.get_run(p.info.run_id) for p in parent_runs(repo))
    assert old.info.run_id == old_parent.info.run_id
    # one parent per configuration: the digest in a tag and in the name
    assert new.data.tags["vit.config_digest"] != old.data.tags["vit.config_digest"]
    for parent in (old, new):
        assert parent.info.run_name == f"{VARIANT} · {parent.data.tags['vit.config_digest'][:8]}"
    assert new.info.status == "FINISHED"
    assert new.data.params["train.epochs"] == "1" and old.data.params["train.epochs"] == "3"
    assert new.data.params["model"] == "vit:Ti/16" and new.data.params["image_size"] == "32"
    metrics = new.data.metrics
    assert metrics["seeds_finished"] == 2
    assert {"test_bacc_mean", "test_bacc_std", "test_acc_mean", "test_loss_mean"} <= set(metrics)
    assert len(new_seeds) == 2 and {r.data.tags["mlflow.parentRunId"] for r in new_seeds} == {new.info.run_id}
    # the parent spans its seeds
    seeds = [client.get_run(r.info.run_id) for r in new_seeds]
    assert new.info.start_time <= min(s.info.start_time for s in seeds)
    assert new.info.end_time >= max(s.info.end_time for s in seeds)
    print(f"killed, then a new configuration: {time.monotonic() - started:.0f}s; parent "
          f"{new.info.run_name} lasted {(new.info.end_time - new.info.start_time) / 1000:.1f}s")


# ------------------------------------------------------- 5. a tampered or truncated archive at the remote

def tampered_copy(src: Path, dest: Path) -> str:
    """``src`` rewritten with the bytes of one image changed (still a zip, same names); returns that image."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        victim = next(i.filename for i in zin.infolist() if i.filename.endswith(".jpg"))
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == victim:
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
            zout.writestr(info, data)
    return victim


class Remote:
    """The DVC remote ``course-data`` as a folder, or that folder served over HTTP (``python -m http.server``) as
    the real remote is: then ``prepare`` downloads into ``.cache/downloads`` and must delete a bad download."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.folder, self.server = kind, folder, None
        folder.mkdir()
        self.url = str(folder)
        if kind == "http":
            port = free_port()
            self.server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                            "--directory", str(folder)], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
            self.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    import urllib.request

                    urllib.request.urlopen(self.url, timeout=5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and self.server.poll() is None, "http.server did not start"
                    time.sleep(0.2)

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait(timeout=30)


@pytest.mark.parametrize("kind", ["folder", "http"])
def test_bad_archive_at_the_remote_leaves_the_prepared_data_and_tracked_files(kind: str, trained_study: TrainedStudy,
                                                                              shared_datasets: Path,
                                                                              tmp_path: Path) -> None:
    started = time.monotonic()
    repo = trained_study.copy(tmp_path / "repo")
    archive = f"{DATASET}.zip"
    good = shared_datasets / archive
    stage = f"prepare@{DATASET}"
    kept = ("dvc.lock", "params.yaml", f"data/prepared/{DATASET}")
    before = snapshot(repo.path, *kept)
    download = repo.path / ".cache" / "downloads" / archive

    remote = Remote(kind, tmp_path / "remote")
    try:
        repo.dvc("remote", "modify", "--local", "course-data", "url", remote.url)
        victim = tampered_copy(good, remote.folder / archive)
        tampered = repo.dvc("repro", "--force", "--single-item", stage, check=False)
        said = tampered.stdout + tampered.stderr
        assert tampered.returncode != 0 and "Traceback" not in said, said[-3000:]
        line = next(line for line in said.splitlines() if line.startswith("error:"))
        assert f"{archive}: {victim} has sha256" in line and "tampered image" in line, line  # the archive, the image
        assert "DVC remote 'course-data'" in line and "dvc repro" in line, line  # the fix
        assert snapshot(repo.path, *kept) == before
        assert_git_clean(repo)
        assert not download.exists()  # a bad download is never reused

        (remote.folder / archive).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        truncated = repo.dvc("repro", "--force", "--single-item", stage, check=False)
        said = truncated.stdout + truncated.stderr
        assert truncated.returncode != 0 and "Traceback" not in said, said[-3000:]
        line = next(line for line in said.splitlines() if line.startswith("error:"))
        assert f"{archive}: not a readable zip archive" in line and "damaged or truncated" in line, line
        assert "DVC remote 'course-data'" in line, line
        assert snapshot(repo.path, *kept) == before
        assert_git_clean(repo)
        assert not download.exists()
        assert not list((repo.path / "data" / "prepared").glob(f".{DATASET}.partial-*"))  # nothing half-written

        shutil.copy2(good, remote.folder / archive)  # the remote serves the published archive again
        fixed = repo.dvc("repro", "--force", "--single-item", stage)
        assert f"prepared {DATASET}: train 225, test 75 images verified" in fixed.stdout + fixed.stderr
        assert snapshot(repo.path, *kept) == before  # the same images: the same prepared data and lock
        assert_git_clean(repo)
        assert download.is_file() == (kind == "http")
    finally:
        remote.close()
    print(f"{kind} remote: tampered, truncated, then good: {time.monotonic() - started:.0f}s")


# ------------------------------------------------------------------ 6. check covers the device

def test_check_fails_for_a_device_this_machine_lacks(trained_study: TrainedStudy, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `device: cuda` is valid here")
    raw = yaml.safe_load((trained_study.path / "params.yaml").read_text())
    raw["train"]["device"] = "cuda"
    raw["scratch"][ARM]["train"].pop("device", None)  # the shared setting, as a user would change it
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = subprocess.run([str(Path(sys.executable).parent / "vit-repro"), "check", "--params", str(params)],
                          cwd=trained_study.path, env=trained_study.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""  # nothing claims the study is valid
    line = error_line(proc.stderr)
    assert proc.stderr.strip().splitlines() == [line]
    assert "device 'cuda' requested but CUDA is not available on this machine" in line and "auto or cpu" in line, line
