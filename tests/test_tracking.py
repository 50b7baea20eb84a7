"""MLflow tracking: where runs go, what a run records, how interrupted and killed runs end, predict.

Every test uses a real SQLite store in a temporary folder (``MLFLOW_TRACKING_URI``) and real
training of a scratch Ti/16 at 32-64 px on the prepared dataset; the command-line tests run the
installed ``vit-repro`` in subprocesses from a temporary project folder.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from test_config import cli_env, vit_repro, write_params
from vit_repro import tracking, train
from vit_repro.config import load_params, resolve_run
from vit_repro.data import read_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPERIMENT = "vit-repro/cpu-small"


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def tiny_updates(image_size: int = 32, epochs: int = 2) -> dict:
    return {"study": {"name": "cpu-small", "seeds": [0, 1], "recipes": ["baseline"]},
            "scratch": {"image_size": image_size}, "train": {"epochs": epochs, "device": "cpu", "weights_for_seeds": [0]}}


def seed_runs(client: MlflowClient, run_name: str) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


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
    assert tracking.tracking_uri(nested) == f"sqlite:///{(tmp_path / 'proj').resolve()}/mlflow.db"
    monkeypatch.chdir(nested)
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'proj').resolve()}/mlflow.db"


def test_mlflow_tracking_uri_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # empty counts as unset
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_check_backend_rejects_unusable_stores(tmp_path):
    with pytest.raises(tracking.TrackingError, match="missing or read-only"):
        tracking.check_backend(f"sqlite:///{tmp_path / 'no-such-folder' / 'mlflow.db'}")
    with pytest.raises(tracking.TrackingError, match="unsupported scheme 'ftp'"):
        tracking.check_backend("ftp://example.invalid/store")
    tracking.check_backend(sqlite_uri(tmp_path))  # an existing, writable folder is fine


# ----------------------------------------------------------------------------- a finished run, read back

@pytest.fixture(scope="module")
def finished(tmp_path_factory, repo_root, prepared_dir):
    """Seeds 0 and 1 of scratch-baseline (Ti/16, 32 px, 2 epochs) trained in-process into a fresh store."""
    root = tmp_path_factory.mktemp("finished")
    uri = sqlite_uri(root)
    # DVC_ROOT is this checkout (for its git commit); no checkpoints, so nothing is written inside it
    updates = tiny_updates()
    updates["train"]["checkpoint"] = False
    params = load_params(write_params(root / "params.yaml", updates))
    head_before = git(repo_root, "rev-parse", "HEAD")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared; contending threads are much slower
    out, metrics = {}, {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("DVC_ROOT", str(repo_root))
        mp.delenv("VIT_REPRO_DEVICE", raising=False)
        try:
            for seed in (0, 1):
                cfg = resolve_run(params, "scratch", "baseline", seed, repo_root / "experiments")
                out[seed] = root / "runs" / "scratch" / "baseline" / f"seed{seed}"
                metrics[seed] = train.run(cfg, prepared_dir, out[seed], cache_dir=root / "cache", progress=False)
        finally:
            torch.set_num_threads(threads)
    records = {s: json.loads((out[s] / "run.json").read_text()) for s in out}
    return {"uri": uri, "root": root, "out": out, "metrics": metrics, "records": records,
            "commits": {head_before, git(repo_root, "rev-parse", "HEAD")}}


def test_finished_run_is_recorded_in_full(finished, prepared_dir):
    client = MlflowClient(finished["uri"])
    record = finished["records"][0]
    run = client.get_run(record["mlflow"]["run_id"])
    assert run.info.run_name == "scratch-baseline/seed0"
    assert run.info.status == "FINISHED"
    assert record["mlflow"]["tracking_uri"] == finished["uri"]
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    # the artifact store sits next to the SQLite file
    assert client.get_experiment(run.info.experiment_id).artifact_location == (finished["root"] / "mlartifacts").as_uri()

    params = run.data.params
    assert params["train.lr"] == "0.001" and params["model"] == "Ti/16" and params["image_size"] == "32"
    assert params["schedule.total_steps"] == "16" and params["schedule.warmup_steps"] == "0"
    assert params["seed"] == "0" and params["train.weights_for_seeds"] == "[0]"

    tags = run.data.tags
    assert tags["vit.variant"] == "scratch-baseline" and tags["vit.seed"] == "0" and tags["vit.kind"] == "seed"
    assert tags["vit.data_digest"] == read_summary(prepared_dir)["digest"]
    assert tags["vit.dataset"] == "pizza_steak_sushi"
    assert tags["mlflow.source.git.commit"] in finished["commits"]
    assert tags["vit.git_dirty"] in {"True", "False"}
    assert tags["vit.device"].startswith("cpu") and tags["vit.precision"] == "fp32"
    assert tags["vit.torch"] == torch.__version__
    # the digest groups a variant's seeds: the whole configuration except the seed
    variant_config = {k: v for k, v in record["config"].items() if k != "seed"}
    assert tags["vit.config_digest"] == tracking.config_digest(variant_config)

    # per-step metrics: one value per optimisation step (8 batches of <= 32 images x 2 epochs)
    for key in ("loss", "lr", "grad_norm"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(16)), key
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    steps_csv = (finished["out"][0] / "steps.csv").read_text().splitlines()[1:]
    assert [float(line.split(",")[3]) for line in steps_csv] == pytest.approx([losses[i] for i in range(16)])
    assert {m.value for m in client.get_metric_history(run.info.run_id, "lr")} == {1e-3}  # baseline: constant
    epoch_acc = client.get_metric_history(run.info.run_id, "epoch_test_acc")
    assert sorted(m.step for m in epoch_acc) == [1, 2]
    assert run.data.metrics["final_test_acc"] == finished["metrics"][0]["test_acc"]
    assert run.data.metrics["final_test_correct"] == finished["metrics"][0]["test_correct"]

    datasets = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert [d.dataset.name for d in datasets] == ["pizza_steak_sushi"]


def test_artifacts_and_weights_only_for_configured_seeds(finished):
    client = MlflowClient(finished["uri"])
    ids = {s: finished["records"][s]["mlflow"]["run_id"] for s in (0, 1)}
    common = {"config.json", "history.csv", "steps.csv", "evaluation.json", "curves.png", "confusion_matrix.png"}
    top0 = {a.path for a in client.list_artifacts(ids[0])}
    top1 = {a.path for a in client.list_artifacts(ids[1])}
    assert top0 == common | {"weights"}
    assert top1 == common  # seed 1 is not in train.weights_for_seeds
    assert {a.path for a in client.list_artifacts(ids[0], "weights")} == {"weights/model.safetensors", "weights/model.json"}
    assert finished["records"][0]["mlflow"]["weights_artifact"] == "weights/model.safetensors"
    assert finished["records"][1]["mlflow"]["weights_artifact"] is None
    local = Path(client.download_artifacts(ids[0], "config.json"))
    assert json.loads(local.read_text()) == finished["records"][0]["config"]
    curves = Path(client.download_artifacts(ids[0], "curves.png"))
    assert curves.read_bytes().startswith(PNG_SIGNATURE)


def test_seeds_share_one_parent_run(finished):
    client = MlflowClient(finished["uri"])
    runs = [client.get_run(finished["records"][s]["mlflow"]["run_id"]) for s in (0, 1)]
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.info.run_name == "scratch-baseline"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["vit.kind"] == "variant" and "vit.seed" not in parent.data.tags
    assert parent.data.tags["vit.config_digest"] == runs[0].data.tags["vit.config_digest"]


def test_parent_run_summarises_the_finished_seeds(finished):
    client = MlflowClient(finished["uri"])
    parent = client.get_run(finished["records"][0]["mlflow"]["parent_run_id"])
    accs = [finished["metrics"][s]["test_acc"] for s in (0, 1)]
    assert parent.data.metrics["test_acc_mean"] == pytest.approx(statistics.fmean(accs))
    assert parent.data.metrics["test_acc_std"] == pytest.approx(statistics.stdev(accs))
    assert parent.data.metrics["seeds_finished"] == 2


# ----------------------------------------------------------------------------- the command line: train

@pytest.fixture(scope="module")
def image_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-cache")


def make_project(folder: Path, repo_root: Path, updates: dict) -> Path:
    folder.mkdir(parents=True)
    shutil.copytree(repo_root / "experiments", folder / "experiments")
    write_params(folder, updates)
    return folder


def train_command(prepared_dir: Path, cache: Path, out: Path, seed: int = 0) -> list[str]:
    return [vit_repro(), "train", "--backbone", "scratch", "--recipe", "baseline", "--seed", str(seed),
            "--prepared", str(prepared_dir), "--cache", str(cache), "--out", str(out), "--no-progress"]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 400.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"vit-repro exited {proc.returncode} before {what}:\n{out}\n{err[-3000:]}")
        try:
            found = predicate()
        except Exception:  # the store is busy (being written by the subprocess): retry
            found = None
        if found:
            return found
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def ready_store(uri: str) -> MlflowClient:
    """Create the SQLite schema before the subprocess starts, so it is never migrated by two processes."""
    client = MlflowClient(uri)
    client.search_experiments()
    return client


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_ends_killed_and_leaves_no_outputs(tmp_path, repo_root, prepared_dir, image_cache, sig):
    # 3 epochs of a few seconds each: the run is mid-training when the signal comes
    project = make_project(tmp_path / "project", repo_root, tiny_updates(epochs=3))
    uri = sqlite_uri(tmp_path)
    client = ready_store(uri)
    out = project / "runs" / "x"
    proc = subprocess.Popen(train_command(prepared_dir, image_cache, out), cwd=project,
                            env=cli_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait until the dataset is logged: the run's try block has begun and training starts next
        def training() -> object:
            for r in seed_runs(client, "scratch-baseline/seed0"):
                if r.info.status == "RUNNING" and client.get_run(r.info.run_id).inputs.dataset_inputs:
                    return r
            return None

        run = wait_for(training, proc, what="a RUNNING run with its dataset logged")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "epoch 3/3" not in stdout, "the run finished before the signal; make it slower"
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert "vit.failure" not in client.get_run(run.info.run_id).data.tags
    assert not out.exists(), "an interrupted run left its output folder"
    assert not (project / "runs").exists() or not any((project / "runs").iterdir()), "half-written outputs left"


@pytest.mark.slow
def test_killed_run_is_closed_as_failed_by_the_next_run(tmp_path, repo_root, prepared_dir, image_cache):
    project = make_project(tmp_path / "project", repo_root, tiny_updates(image_size=32, epochs=2))
    uri = sqlite_uri(tmp_path)
    client = ready_store(uri)
    out = project / "runs" / "x"
    command = train_command(prepared_dir, image_cache, out)
    env = cli_env(MLFLOW_TRACKING_URI=uri)
    proc = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stale = wait_for(lambda: next((r for r in seed_runs(client, "scratch-baseline/seed0")
                                       if r.info.status == "RUNNING"), None), proc, what="a RUNNING run")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    assert client.get_run(stale.info.run_id).info.status == "RUNNING"  # nobody could close it
    assert not out.exists()

    rerun = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    closed = client.get_run(stale.info.run_id)
    assert closed.info.status == "FAILED"
    assert "killed" in closed.data.tags["vit.failure"]
    runs = seed_runs(client, "scratch-baseline/seed0")
    assert len(runs) == 2
    new = next(r for r in runs if r.info.run_id != stale.info.run_id)
    assert new.info.status == "FINISHED"
    assert json.loads((out / "run.json").read_text())["mlflow"]["run_id"] == new.info.run_id
    assert json.loads((out / "metrics.json").read_text())["test_images"] == 75


@pytest.mark.slow
def test_unreachable_tracking_server_fails_fast_without_outputs(tmp_path, repo_root, prepared_dir, image_cache):
    with socket.socket() as s:  # a port that was free a moment ago, and that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    project = make_project(tmp_path / "project", repo_root, tiny_updates())
    proc = subprocess.run(train_command(prepared_dir, image_cache, project / "runs" / "x"), cwd=project,
                          env=cli_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 2
    assert uri in proc.stderr and "unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (project / "runs").exists()
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()


# ----------------------------------------------------------------------------- the command line: predict

def predict(args: list[str], uri: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([vit_repro(), "predict", *args], cwd=cwd, env=cli_env(MLFLOW_TRACKING_URI=uri),
                          capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_predict_with_a_run_id(finished, prepared_dir, tmp_path):
    image = sorted((prepared_dir / "test" / "sushi").glob("*.jpg"))[0]
    run_id = finished["records"][0]["mlflow"]["run_id"]
    plot = tmp_path / "plots" / "out.png"
    proc = predict([str(image), "--run", run_id, "--plot", str(plot), "--json"], finished["uri"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"{image}: ")
    for name in ("pizza", "steak", "sushi"):
        assert f"{name} 0." in first or f"{name} 1." in first
    result = json.loads(proc.stdout[proc.stdout.index("["):proc.stdout.rindex("]") + 1])
    assert len(result) == 1 and result[0]["path"] == str(image)
    probs = result[0]["probabilities"]
    assert list(probs) == ["pizza", "steak", "sushi"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= p <= 1 for p in probs.values())
    assert result[0]["label"] == max(probs, key=probs.get)
    assert f": {result[0]['label']} (" in first
    printed = [float(part.rsplit(" ", 1)[1]) for part in first[first.index("(") + 1:-1].split(", ")]
    assert printed == pytest.approx(list(probs.values()), abs=5e-4)
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    from PIL import Image

    with Image.open(plot) as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 100


def main_predict(args: list[str], uri: str, monkeypatch, capsys) -> tuple[int, str, str]:
    """``vit-repro predict`` in this process (the console script calls the same ``main``)."""
    from vit_repro import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    capsys.readouterr()
    code = cli.main(["predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_rejects_a_text_file(finished, tmp_path, monkeypatch, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    code, out, err = main_predict([str(text), "--run", finished["records"][0]["mlflow"]["run_id"]], finished["uri"],
                                  monkeypatch, capsys)
    assert code == 2 and out == ""  # a user error: a message, not an exception (so no traceback)
    assert err.rstrip().splitlines()[-1].startswith(f"error: {text}")


def test_predict_text_file_message(finished, tmp_path, monkeypatch, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    code, _, err = main_predict([str(text), "--run", finished["records"][0]["mlflow"]["run_id"]], finished["uri"],
                                monkeypatch, capsys)
    assert code == 2
    assert f"{text} is not a readable image" in err


def test_predict_with_unknown_or_weightless_run(finished, prepared_dir, monkeypatch, capsys):
    image = sorted((prepared_dir / "test" / "pizza").glob("*.jpg"))[0]
    unknown = "0123456789abcdef0123456789abcdef"
    code, out, err = main_predict([str(image), "--run", unknown], finished["uri"], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert f"error: cannot get weights of MLflow run {unknown} from {finished['uri']}" in err
    # seed 1 logged no weights (train.weights_for_seeds: [0])
    seed1 = finished["records"][1]["mlflow"]["run_id"]
    code, out, err = main_predict([str(image), "--run", seed1], finished["uri"], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert seed1 in err and "weights_for_seeds" in err
