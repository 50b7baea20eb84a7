"""Training: reproducible runs, per-image accuracy, the frozen shortcut's equivalence, gradient clipping.

Everything runs on the real prepared dataset with real models (a Ti/16 at 32 px, or the shared
ViT-S/14 DINOv2 backbone) and a real SQLite MLflow store in a temporary folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_config import write_params
from vit_repro import backbone, train
from vit_repro.config import TrainConfig, load_params, resolve_run
from vit_repro.data import ImageTransform, load_split
from vit_repro.model import VisionTransformer, parse_model_name

CPU = torch.device("cpu")
TIMING_KEYS = {"wall_time_s", "train_images_per_s"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the CPU is shared with other jobs, and two contending threads run ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tensor-cache")


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # the project root: checkpoints go to tmp_path/.cache
    monkeypatch.delenv("VIT_REPRO_DEVICE", raising=False)
    return uri


def tiny_cfg(tmp_path: Path, repo_root: Path, seed: int, recipe: str = "paper", **train_updates):
    """A scratch Ti/16 at 32 px (4 patches), 2 epochs on all 225 training images, on the CPU."""
    path = write_params(
        tmp_path / "params.yaml",
        {"study": {"name": "cpu-small", "seeds": [0, 1], "recipes": [recipe]}, "scratch": {"image_size": 32},
         "train": {"epochs": 2, "device": "cpu", **train_updates}},
    )
    return resolve_run(load_params(path), "scratch", recipe, seed, repo_root / "experiments")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def without(rows: list[dict[str, str]], *keys: str) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in keys} for row in rows]


# ----------------------------------------------------------------------------- reproducibility

@pytest.mark.slow
def test_same_seed_same_run_other_seed_other_run(tmp_path, repo_root, prepared_dir, cache_dir, store):
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = tiny_cfg(tmp_path, repo_root, seed)
        outs[name] = tmp_path / "runs" / name
        train.run(cfg, prepared_dir, outs[name], cache_dir=cache_dir, progress=False)

    def metrics(name: str) -> dict:
        return json.loads((outs[name] / "metrics.json").read_text())

    a, b, c = metrics("a"), metrics("b"), metrics("c")
    assert set(a) == {"test_acc", "test_loss", "test_correct", "test_images", "train_acc", "train_loss",
                      "wall_time_s", "train_images_per_s", "collapsed", "predicted_classes"}
    same = {k: v for k, v in a.items() if k not in TIMING_KEYS}
    assert same == {k: v for k, v in b.items() if k not in TIMING_KEYS}

    hist_a, hist_b, hist_c = (read_csv(outs[n] / "history.csv") for n in "abc")
    assert list(hist_a[0]) == ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s"]
    assert len(hist_a) == 2
    assert without(hist_a, "epoch_time_s") == without(hist_b, "epoch_time_s")

    steps_a, steps_b, steps_c = (read_csv(outs[n] / "steps.csv") for n in "abc")
    assert list(steps_a[0]) == ["step", "epoch", "lr", "loss", "grad_norm"]
    assert [int(r["step"]) for r in steps_a] == list(range(16))  # ceil(225 / 32) = 8 steps x 2 epochs
    assert steps_a == steps_b

    # another seed: another initialisation and another batch order, so other numbers
    assert [r["loss"] for r in steps_c] != [r["loss"] for r in steps_a]
    assert (c["test_loss"], c["train_loss"]) != (a["test_loss"], a["train_loss"])
    # ... but the same schedule: the learning rate depends on the step alone
    assert [r["lr"] for r in steps_c] == [r["lr"] for r in steps_a]

    run_a, run_b = (json.loads((outs[n] / "run.json").read_text()) for n in "ab")
    assert run_a["evaluation"] == run_b["evaluation"]
    assert run_a["mlflow"]["run_id"] != run_b["mlflow"]["run_id"]
    assert run_a["mlflow"]["parent_run_id"] == run_b["mlflow"]["parent_run_id"]  # same variant and config


@pytest.mark.slow
def test_metrics_are_per_image_and_agree_with_run_json(tmp_path, repo_root, prepared_dir, cache_dir, store):
    cfg = tiny_cfg(tmp_path, repo_root, 0, recipe="baseline", epochs=1)
    out = tmp_path / "runs" / "scratch" / "baseline" / "seed0"
    returned = train.run(cfg, prepared_dir, out, cache_dir=cache_dir, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    record = json.loads((out / "run.json").read_text())
    assert returned == metrics
    assert metrics["test_images"] == 75
    assert metrics["test_acc"] == metrics["test_correct"] / 75  # per image, not per batch
    confusion = record["evaluation"]["confusion_matrix"]
    assert [sum(row) for row in confusion] == [25, 19, 31]  # rows: true class pizza, steak, sushi
    assert sum(map(sum, confusion)) == 75
    assert sum(confusion[i][i] for i in range(3)) == metrics["test_correct"]
    predicted = sum(1 for j in range(3) if any(confusion[i][j] for i in range(3)))
    assert metrics["predicted_classes"] == predicted
    assert metrics["collapsed"] == (predicted == 1)
    per_class = record["evaluation"]["per_class_accuracy"]
    assert per_class == pytest.approx({c: confusion[i][i] / n for i, (c, n) in enumerate(zip(("pizza", "steak", "sushi"), (25, 19, 31)))})
    # the last epoch's test accuracy in history.csv is the same evaluation of the same weights
    assert float(read_csv(out / "history.csv")[-1]["test_acc"]) == pytest.approx(metrics["test_acc"])
    assert 0 <= metrics["train_acc"] <= 1 and metrics["train_acc"] * 225 == pytest.approx(round(metrics["train_acc"] * 225))
    expected_schedule = {"steps_per_epoch": 8, "total_steps": 8, "warmup_steps": 0, "warmup_fraction": 0.0,
                         "paper_warmup_steps": 10_000, "paper_total_steps": 93_835}
    assert {k: record["schedule"][k] for k in expected_schedule} == expected_schedule
    assert record["status"] == "FINISHED" and record["variant"] == "scratch-baseline"
    assert not list(out.parent.glob(".seed0.tmp-*")), "the staging folder was left behind"


# ----------------------------------------------------------------------------- frozen features == full model

@pytest.mark.slow
def test_head_on_cached_features_equals_head_through_full_model(tmp_path, shared_dir, prepared_dir, cache_dir):
    params = load_params(write_params(tmp_path / "params.yaml", shared=shared_dir))
    spec = params.backbones["vit_s14_dinov2"]
    pretrained = tmp_path / "pretrained"
    info = backbone.fetch(spec, "vit_s14_dinov2", pretrained)
    assert info["model"] == "S/14" and (pretrained / backbone.WEIGHTS_FILE).is_file()

    transform = backbone.transform_for(spec)
    train_split = load_split(prepared_dir, "train", transform, cache_dir)
    test_split = load_split(prepared_dir, "test", transform, cache_dir)
    pick_train = torch.arange(0, 225, 14)[:16]  # 16 images from all three classes
    pick_test = torch.arange(0, 75, 10)[:8]
    images, labels = train_split.images[pick_train], train_split.labels[pick_train]
    test_images, test_labels = test_split.images[pick_test], test_split.labels[pick_test]
    assert set(labels.tolist()) == {0, 1, 2}

    # the paper's recipe on the frozen head: 4 steps per epoch, 2 epochs, warmup ceil(0.107 * 8) = 1 step,
    # cosine decay, and a clip small enough to act on some steps
    cfg = params.train.model_copy(update={"epochs": 2, "batch_size": 4, "warmup": True, "decay": "cosine",
                                          "clip_grad_norm": 0.5, "device": "cpu"})
    seed = 3

    # A: through the whole model; only the head requires grad
    model, loaded = backbone.load_backbone(pretrained, 3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["heads.head.weight", "heads.head.bias"]
    body_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("heads.")}
    hist_a = train.fit(model, (images, labels), (test_images, test_labels), cfg, seed,
                       prepare=transform.normalize, device=CPU, num_classes=3, progress=False)

    # B: a zero-initialised linear layer on features computed once
    fresh, _ = backbone.load_backbone(pretrained, 3)
    feats = backbone.extract_features(fresh, images, transform, CPU)
    test_feats = backbone.extract_features(fresh, test_images, transform, CPU)
    assert feats.shape == (16, 384)
    linear = nn.Linear(384, 3)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    hist_b = train.fit(linear, (feats, labels), (test_feats, test_labels), cfg, seed,
                       prepare=lambda x: x, device=CPU, num_classes=3, progress=False)

    # the backbone did not move, and the head learned something
    assert all(torch.equal(v, body_before[k]) for k, v in model.state_dict().items() if k in body_before)
    assert model.head.weight.abs().max() > 1e-4
    torch.testing.assert_close(model.head.weight.detach(), linear.weight.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.head.bias.detach(), linear.bias.detach(), atol=1e-6, rtol=0)

    assert len(hist_a.steps) == len(hist_b.steps) == 8
    assert [s["lr"] for s in hist_a.steps] == [s["lr"] for s in hist_b.steps]
    assert hist_a.steps[0]["lr"] == 0.0  # warmup starts at 0
    for sa, sb in zip(hist_a.steps, hist_b.steps):
        assert sa["loss"] == pytest.approx(sb["loss"], abs=1e-5)
        assert sa["grad_norm"] == pytest.approx(sb["grad_norm"], abs=1e-5)
    assert any(s["grad_norm"] > 0.5 for s in hist_a.steps), "the clip never acted; lower it"
    for ea, eb in zip(hist_a.epochs, hist_b.epochs):
        assert ea["test_loss"] == pytest.approx(eb["test_loss"], abs=1e-5)
        assert ea["test_acc"] == eb["test_acc"]
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], abs=1e-5)


# ----------------------------------------------------------------------------- gradient clipping

@pytest.fixture(scope="module")
def small_batch(prepared_dir, cache_dir):
    split = load_split(prepared_dir, "train", ImageTransform(resize=(32, 32)), cache_dir)
    pick = torch.arange(0, 225, 15)  # 15 images, all classes
    return split.images[pick], split.labels[pick]


def _tiny_vit(seed: int) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(parse_model_name("Ti/16", image_size=32, num_classes=3))
    with torch.no_grad():  # a non-zero head, so gradients reach every layer
        nn.init.normal_(model.head.weight, std=0.1)
    return model


def _one_step(model: nn.Module, batch, clip: float | None) -> train.History:
    images, labels = batch
    cfg = TrainConfig(epochs=1, batch_size=len(labels), lr=1e-3, weight_decay=0.0, clip_grad_norm=clip, device="cpu")
    norm = ImageTransform(resize=(32, 32)).normalize
    return train.fit(model, (images, labels), (images, labels), cfg, 0, prepare=norm, device=CPU, num_classes=3,
                     progress=False)


def test_clipping_bounds_the_update_and_logs_the_norm_before_clipping(small_batch):
    images, labels = small_batch
    norm = ImageTransform(resize=(32, 32)).normalize
    # the global gradient norm of the first step, computed by hand on the same weights and images
    ref = _tiny_vit(0)
    loss = F.cross_entropy(ref(norm(images)), labels)
    loss.backward()
    expected_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref.parameters())).item()
    assert expected_norm > 1e-3

    start = {k: v.clone() for k, v in _tiny_vit(0).state_dict().items()}
    unclipped, clipped = _tiny_vit(0), _tiny_vit(0)
    clip = 1e-12
    h_free = _one_step(unclipped, small_batch, None)
    h_clip = _one_step(clipped, small_batch, clip)

    for hist in (h_free, h_clip):
        assert len(hist.steps) == 1
        assert hist.steps[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert hist.steps[0]["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)  # before clipping
        assert hist.steps[0]["grad_norm"] > clip

    def max_update(model: nn.Module) -> float:
        return max((v - start[k]).abs().max().item() for k, v in model.state_dict().items())

    # Adam's first step moves every parameter with a non-zero gradient by lr * g / (|g| + eps) ~ lr
    assert max_update(unclipped) == pytest.approx(1e-3, rel=1e-2)
    # clipped to a global norm of 1e-12, every |g| <= 1e-12, so each update is <= lr * 1e-12 / 1e-8 = 1e-7
    assert 0 < max_update(clipped) <= 1e-3 * clip / 1e-8 * 1.001
