"""Several processes and gradient accumulation train as one process with the same global batch, within 1e-5.

A tiny scratch ViT (Ti/16 at 32 px, no dropout) on the real prepared dataset. The multi-process run is
a real ``torchrun`` (``python -m torch.distributed.run``, gloo on the CPU) of the ``vit-repro`` CLI,
logging to a real SQLite MLflow store in a temporary folder.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from test_config import cli_env, write_params
from vit_repro import distributed, train
from vit_repro.config import ConfigError, TrainConfig, load_params, resolve_run
from vit_repro.data import ImageTransform, load_split
from vit_repro.model import VisionTransformer, parse_model_name

TOL = 1e-5


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def assert_rows_close(a: list[dict[str, float]], b: list[dict[str, float]], skip: tuple[str, ...] = ()) -> None:
    assert len(a) == len(b) and [list(r) for r in a] == [list(r) for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            if key not in skip:
                assert ra[key] == pytest.approx(rb[key], abs=TOL, rel=TOL), (key, ra, rb)


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], dim: int = 192) -> None:
    """Every weight within TOL, except the attention key bias, which is only checked loosely.

    The key bias adds the same number to every attention logit of a query, so softmax ignores it and its
    exact gradient is 0: what it gets is rounding noise, which Adam scales up to steps of about lr. It does
    not change any output. (Measured at lr 1e-3: key bias up to 4e-4 apart, every other weight within 1e-6.)
    """
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        other = actual[key]
        if key.endswith("attn.qkv.bias"):  # [query | key | value] biases
            torch.testing.assert_close(other[dim : 2 * dim], value[dim : 2 * dim], atol=1e-3, rtol=0, msg=key)
            other, value = torch.cat([other[:dim], other[2 * dim :]]), torch.cat([value[:dim], value[2 * dim :]])
        torch.testing.assert_close(other, value, atol=TOL, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def logged_weights(store: str, run_id: str) -> dict[str, torch.Tensor]:
    import mlflow
    from safetensors.torch import load_file

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="weights/model.safetensors", tracking_uri=store)
    return load_file(path)


@pytest.fixture
def one_thread():
    """Torch's threads spin against each other on a busy CPU (3x slower on 2 shared cores): use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PARAMS = {
    "study": {"name": "cpu-small", "seeds": [0], "recipes": ["paper"]},
    "scratch": {"image_size": 32, "dropout": 0.0},  # dropout draws differ per process: none here
    # a small rate: Adam moves weights whose gradient is ~0 by up to lr per step on rounding noise alone
    "train": {"epochs": 2, "lr": 1e-4, "device": "cpu", "weights_for_seeds": [0]},
}


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, repo_root, prepared_dir, monkeypatch, one_thread):
    """1 process, batch 32 vs torchrun, 2 processes x 8 images x 2 accumulated micro-batches: the same 32 per step."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the checkpoint folder is under the repository root: here
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    experiments = str(repo_root / "experiments")

    one = write_params(tmp_path / "one.yaml", PARAMS)  # in this process, with one thread as each torchrun process
    cfg = resolve_run(load_params(one), "scratch", "paper", 0, experiments)
    train.run(cfg, prepared_dir, tmp_path / "one", cache_dir=tmp_path / "cache", progress=False)

    two = write_params(tmp_path / "two.yaml", PARAMS | {"train": PARAMS["train"] | {"batch_size": 16, "grad_accum_steps": 2}})
    args = ["train", "--params", two, "--experiments", experiments, "--backbone", "scratch", "--recipe", "paper",
            "--seed", "0", "--prepared", prepared_dir, "--cache", tmp_path / "cache", "--out", tmp_path / "two", "--no-progress"]
    # VIT_REPRO_NPROC=2 makes `vit-repro train` (a DVC stage's command) relaunch itself under torchrun
    proc = subprocess.run([sys.executable, "-m", "vit_repro.cli", *map(str, args)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600,
                          env=cli_env(MLFLOW_TRACKING_URI=store, OMP_NUM_THREADS="1", VIT_REPRO_NPROC="2"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("test accuracy") == 1, proc.stdout  # only rank 0 prints the result

    record = {n: json.loads((tmp_path / n / "run.json").read_text()) for n in ("one", "two")}
    assert record["one"]["schedule"]["world_size"] == 1 and record["two"]["schedule"]["world_size"] == 2
    for key in ("effective_batch_size", "steps_per_epoch", "total_steps", "warmup_steps"):
        assert record["one"]["schedule"][key] == record["two"]["schedule"][key], key
    assert record["two"]["schedule"]["grad_accum_steps"] == 2
    assert record["two"]["schedule"]["steps_per_epoch"] == 8  # 225 = 7 x 32 + 1: the last step has 1 image

    assert_same_weights(logged_weights(store, record["two"]["mlflow"]["run_id"]),
                        logged_weights(store, record["one"]["mlflow"]["run_id"]))
    metrics = {n: json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two")}
    for key in ("test_correct", "test_images", "predicted_classes", "collapsed"):
        assert metrics["two"][key] == metrics["one"][key], key
    for key in ("test_acc", "test_loss", "train_acc", "train_loss"):
        assert metrics["two"][key] == pytest.approx(metrics["one"][key], abs=TOL, rel=0), key
    assert_rows_close(read_csv(tmp_path / "two" / "history.csv"), read_csv(tmp_path / "one" / "history.csv"),
                      skip=("epoch_time_s",))
    assert_rows_close(read_csv(tmp_path / "two" / "steps.csv"), read_csv(tmp_path / "one" / "steps.csv"))
    assert record["two"]["evaluation"]["confusion_matrix"] == record["one"]["evaluation"]["confusion_matrix"]

    # one MLflow run per training: rank 1 never touched MLflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("vit-repro/cpu-small")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`vit.kind` = 'seed'")
    assert sorted(r.data.params["schedule.world_size"] for r in runs) == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert [m.step for m in client.get_metric_history(record["two"]["mlflow"]["run_id"], "loss")] == list(range(16))
    assert not list((tmp_path / ".cache" / "checkpoints").glob("*.pt")), "a finished run leaves no checkpoint"


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(parse_model_name("Ti/16", image_size=32, num_classes=3, dropout=0.0))
    with torch.no_grad():  # a non-zero head, so every layer learns from the first step
        nn.init.normal_(model.head.weight, std=0.1)
    return model


def test_gradient_accumulation_equals_one_large_batch(prepared_dir, tmp_path, one_thread):
    split = load_split(prepared_dir, "train", ImageTransform(resize=(32, 32)), tmp_path)
    pick = torch.arange(0, 225, 3)[:70]  # all three classes; 70 = 2 x 32 + 6: a short last step
    images, labels = split.images[pick], split.labels[pick]
    norm = ImageTransform(resize=(32, 32)).normalize
    cpu = torch.device("cpu")
    base = dict(epochs=2, lr=1e-3, weight_decay=0.1, warmup=True, decay="cosine", clip_grad_norm=1.0, device="cpu")
    models, histories = {}, {}
    for name, batch, accum in (("large", 32, 1), ("accumulated", 8, 4)):
        cfg = TrainConfig(batch_size=batch, grad_accum_steps=accum, **base)
        models[name] = _tiny_vit()
        histories[name] = train.fit(models[name], (images, labels), (images[:16], labels[:16]), cfg, 0, norm, cpu, 3,
                                    progress=False)
    large, accumulated = histories["large"], histories["accumulated"]
    assert len(large.steps) == len(accumulated.steps) == 2 * 3  # optimisation steps, not micro-batches
    assert [s["lr"] for s in large.steps] == [s["lr"] for s in accumulated.steps]
    for a, b in zip(large.steps, accumulated.steps):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOL) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=TOL)
    assert any(s["grad_norm"] > 1.0 for s in large.steps), "the clip never acted"
    assert_same_weights(models["accumulated"].state_dict(), models["large"].state_dict())
    assert large.epochs[-1]["train_loss"] == pytest.approx(accumulated.epochs[-1]["train_loss"], abs=TOL)


def test_global_batch_must_divide_among_processes(tmp_path, repo_root, prepared_dir, monkeypatch):
    assert distributed.per_process_batch(32, 4) == 8
    with pytest.raises(ConfigError, match=r"train.batch_size 33 is the global batch of all 2 processes"):
        distributed.per_process_batch(33, 2)
    # as torchrun's second process would see it: refused before any data is read or process group joined
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(train, "scratch_inputs", lambda *a: pytest.fail("data loaded before the batch was checked"))
    path = write_params(tmp_path / "params.yaml", {"train": {"batch_size": 33, "device": "cpu"}})
    cfg = resolve_run(load_params(path), "scratch", "baseline", 0, repo_root / "experiments")
    with pytest.raises(ConfigError, match="multiple of 2"):
        train.run(cfg, prepared_dir, tmp_path / "out")
