"""Several processes and gradient accumulation train as one process with the same global batch, within 1e-5.

A tiny scratch ViT (Ti/16 at 32 px, no dropout) on 65 real images (2 x 32 + 1: the last step holds one
image, so one process's share of it is empty). The multi-process run is a real ``torchrun``
(``python -m torch.distributed.run``, gloo on the CPU) of ``fit`` and ``evaluate``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import write_params
from vit_repro.core import distributed
from vit_repro.core.config import ConfigError, TrainConfig, load_params
from vit_repro.core.images import ImageTransform, load_images
from vit_repro.core.networks import build_model
from vit_repro.core.run import schedule_for
from vit_repro.stage import Paths, run_arm
from vit_repro.core.schedule import Schedule
from vit_repro.core.splits import Subset
from vit_repro.core.train import History, Task, evaluate, fit

TOL = 1e-5
CPU = torch.device("cpu")
SMALL = ImageTransform(resize=(32, 32))
# the paper's recipe (warmup, cosine decay, clipping, coupled weight decay) at a small rate: Adam moves weights
# whose gradient is ~0 by up to lr per step on rounding noise alone
RECIPE = dict(epochs=2, lr=1e-4, weight_decay=0.1, warmup=True, decay="cosine", clip_grad_norm=1.0, device="cpu",
              drop_last=False)


def schedule(cfg: TrainConfig, images: int) -> Schedule:
    """The schedule a run of ``cfg`` gets (the runner's mapping from settings to steps)."""
    return schedule_for(SimpleNamespace(train=cfg), images)


@pytest.fixture
def one_thread():
    """Torch's threads spin against each other on a busy CPU (3x slower on 2 shared cores): use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(splits, prepared_root: Path, tmp_path_factory):
    """65 training images of all three classes and 20 test images, at 32 px."""
    cache = tmp_path_factory.mktemp("images-cache")
    train = load_images(Subset("65", splits.subset("225").images[::3][:65]), prepared_root, SMALL, cache)
    test = load_images(Subset("20", splits.test.images[::10][:20]), prepared_root, SMALL, cache)
    assert set(train.labels.tolist()) == {0, 1, 2}
    return (train.pixels, train.labels), (test.pixels, test.labels)


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("vit:Ti/16", 32, 3, dropout=0.0)  # dropout draws differ per process: none here
    with torch.no_grad():  # a non-zero head, so every layer learns from the first step
        nn.init.normal_(model.head.weight, std=0.1)
    return model


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], dim: int = 192) -> None:
    """Every weight within TOL, except the attention key bias, which is only checked loosely.

    The key bias adds the same number to every attention logit of a query, so softmax ignores it and its
    exact gradient is 0: what it gets is rounding noise, which Adam scales up to steps of about lr. It does
    not change any output.
    """
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        other = actual[key]
        if key.endswith("attn.qkv.bias"):  # [query | key | value] biases
            torch.testing.assert_close(other[dim : 2 * dim], value[dim : 2 * dim], atol=1e-3, rtol=0, msg=key)
            other, value = torch.cat([other[:dim], other[2 * dim :]]), torch.cat([value[:dim], value[2 * dim :]])
        torch.testing.assert_close(other, value, atol=TOL, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def assert_histories_close(a: History, b: History) -> None:
    assert len(a.steps) == len(b.steps) and len(a.epochs) == len(b.epochs)
    for sa, sb in zip(a.steps, b.steps):
        assert (sa["step"], sa["epoch"], sa["lr"], sa["images"]) == (sb["step"], sb["epoch"], sb["lr"], sb["images"])
        assert sa["loss"] == pytest.approx(sb["loss"], abs=TOL) and sa["grad_norm"] == pytest.approx(sb["grad_norm"], rel=TOL)
    for ea, eb in zip(a.epochs, b.epochs):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_balanced_acc"):
            assert ea[key] == pytest.approx(eb[key], abs=TOL), key


TORCHRUN_SCRIPT = """
import json, sys
from dataclasses import asdict
import torch
from safetensors.torch import save_file
from vit_repro.core.config import TrainConfig
from vit_repro.core.distributed import distributed, rank_and_world
from vit_repro.core.images import ImageTransform
from vit_repro.core.train import Task, evaluate, fit
from test_distributed import schedule, tiny_vit

torch.set_num_threads(1)
folder = sys.argv[1]
(train, test), recipe = torch.load(f"{folder}/data.pt"), json.loads(sys.argv[2])
cfg = TrainConfig(**recipe)
to_input = ImageTransform(resize=(32, 32)).to_input
with distributed(torch.device("cpu")) as device:
    rank, world = rank_and_world()
    model = tiny_vit()
    history = fit(model, Task(train, test, to_input, 3), cfg, schedule(cfg, len(train[1])), 0, device)
    ev = evaluate(model, test, to_input, device, 3)
    json.dump({"world": world, "history": asdict(history), "predictions": ev.predictions.tolist(),
               "losses": ev.losses.tolist()}, open(f"{folder}/rank{rank}.json", "w"))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{folder}/model.safetensors")
"""


@pytest.mark.slow
def test_two_processes_train_like_one(data, tmp_path: Path, one_thread) -> None:
    """1 process, batch 32 vs torchrun, 2 processes x 8 images x 2 accumulated micro-batches: the same 32 per step."""
    one_cfg = TrainConfig(batch_size=32, **RECIPE)
    one = tiny_vit()
    one_history = fit(one, Task(data[0], data[1], SMALL.to_input, 3), one_cfg, schedule(one_cfg, 65), 0, CPU)
    one_eval = evaluate(one, data[1], SMALL.to_input, CPU, 3)

    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "script.py").write_text(TORCHRUN_SCRIPT)
    two = {**RECIPE, "batch_size": 16, "grad_accum_steps": 2}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                                                             os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "script.py"), str(tmp_path), json.dumps(two)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    histories = [History(**r["history"]) for r in ranks]
    assert histories[0].steps == histories[1].steps, "every process logs the same, all-reduced numbers"
    assert [s["images"] for s in histories[0].steps] == [32, 32, 1] * 2  # the last step: 1 image, on rank 0 alone
    assert_histories_close(histories[0], one_history)
    assert_same_weights(load_file(tmp_path / "model.safetensors"), one.state_dict())
    # evaluation under torchrun: each process takes a shard, the predictions are gathered in order
    for r in ranks:
        assert r["predictions"] == one_eval.predictions.tolist()
        assert r["losses"] == pytest.approx(one_eval.losses.tolist(), abs=TOL)


@pytest.mark.parametrize("drop_last", [False, True])
def test_gradient_accumulation_equals_one_large_batch(data, drop_last: bool, one_thread) -> None:
    train, test = data
    models, histories = {}, {}
    for name, batch, accum in (("large", 32, 1), ("accumulated", 8, 4)):
        cfg = TrainConfig(batch_size=batch, grad_accum_steps=accum, **(RECIPE | {"lr": 1e-3, "drop_last": drop_last}))
        sched = schedule(cfg, 65)
        models[name] = tiny_vit()
        histories[name] = fit(models[name], Task(train, test, SMALL.to_input, 3), cfg, sched, 0, CPU)
        assert len(histories[name].steps) == sched.total_steps  # optimisation steps, not micro-batches
    large, accumulated = histories["large"], histories["accumulated"]
    assert [s["images"] for s in large.steps] == ([32, 32] if drop_last else [32, 32, 1]) * 2
    assert_histories_close(accumulated, large)
    assert any(s["grad_norm"] > 1.0 for s in large.steps), "the clip never acted"
    assert_same_weights(models["accumulated"].state_dict(), models["large"].state_dict())


def test_global_batch_must_divide_among_processes(tmp_path: Path, repo_root: Path, monkeypatch) -> None:
    assert distributed.per_process_batch(32, 4) == 8
    with pytest.raises(ConfigError, match=r"train.batch_size 33 is the global batch of all 2 processes"):
        distributed.per_process_batch(33, 2)
    # as torchrun's second process would see it: refused before any data is read or process group joined
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    params = load_params(write_params(tmp_path / "params.yaml", {"train": {"batch_size": 33, "device": "cpu"}}))
    paths = Paths.default(tmp_path / "empty")  # no splits, images or features: reading any would fail otherwise
    with pytest.raises(ConfigError, match="use a multiple of 2 or another number of processes"):
        run_arm(params, "frozen", "head", paths, experiments=repo_root / "experiments", progress=False)
    assert not (tmp_path / "empty").exists()
