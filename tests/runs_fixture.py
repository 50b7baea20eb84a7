"""Test fixture: schema-exact run folders (docs/run-outputs.md) for chosen numbers, without training.

    params = fixture_params(recipes=["baseline", "paper"], seeds=[0, 1])
    write_run(tmp_path / "runs", params, "scratch", "baseline", 0, correct="pizza")      # collapsed to pizza
    write_run(tmp_path / "runs", params, "frozen", "paper", 1, correct=(24, 17, 29))     # 70/75 correct
    write_run(tmp_path / "runs", params, "frozen", "paper", 1, ..., status="FAILED")     # a failed run

``correct`` is the number of correctly classified test images per class (pizza, steak, sushi; the
test split holds 25, 19 and 31), or a class name for a collapsed run that predicts only that class.
The confusion matrix, per-class accuracy, test_acc, collapsed and predicted_classes all follow from it.
Everything else is a deterministic function of the arguments, so two writes give identical bytes.
run.json follows what ``vit_repro.train`` writes (docs/run-outputs.md plus ``model.image_size``,
``pretrained.source_sha256``, ``provenance.started_at``/``finished_at``) and adds ``data.source``,
which the report shows when present.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from vit_repro.config import (
    PAPER_IMAGENET_STEPS,
    PAPER_WARMUP_STEPS,
    Params,
    StudyConfig,
    load_params,
    resolve_run,
)
from vit_repro.model import parse_model_name
from vit_repro.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("pizza", "steak", "sushi")
TRAIN_COUNTS = {"pizza": 78, "steak": 75, "sushi": 72}
TEST_COUNTS = {"pizza": 25, "steak": 19, "sushi": 31}
DIGEST = "sha256:" + "ab" * 32


def fixture_params(recipes: Sequence[str] = ("baseline", "warmup", "paper"), seeds: Sequence[int] = (0, 1),
                   study: str = "cpu-small") -> Params:
    """The repository's params.yaml with a smaller study (the cpu-small models: Ti/16 and ViT-S/14 DINOv2)."""
    params = load_params(REPO / "params.yaml")
    return params.model_copy(update={"study": StudyConfig(name=study, seeds=list(seeds), recipes=list(recipes))})


def vit_param_count(name: str, image_size: int, num_classes: int) -> int:
    """Parameters of our ViT (Table 1 sizes), counted by formula: embeddings, blocks, final norm, head."""
    c = parse_model_name(name, image_size=image_size)
    d, m = c.hidden_dim, c.mlp_dim
    embed = 3 * c.patch_size**2 * d + d + d + (c.num_patches + 1) * d  # conv, its bias, class token, positions
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)  # 2 LN, qkv, proj, fc1, fc2
    return embed + c.num_layers * block + 2 * d + d * num_classes + num_classes


def _confusion(correct: Sequence[int] | str) -> list[list[int]]:
    """Rows true class, columns predicted; wrong answers of class i go to class i+1."""
    n = len(CLASSES)
    cm = [[0] * n for _ in range(n)]
    for i, cls in enumerate(CLASSES):
        if isinstance(correct, str):
            cm[i][CLASSES.index(correct)] = TEST_COUNTS[cls]
        else:
            cm[i][i] = correct[i]
            cm[i][(i + 1) % n] = TEST_COUNTS[cls] - correct[i]
    return cm


def write_run(
    runs_dir: Path,
    params: Params,
    backbone: str,
    recipe: str,
    seed: int,
    correct: Sequence[int] | str,
    *,
    test_loss: float = 1.0,
    train_acc: float = 0.5,
    train_loss: float = 0.9,
    wall_time_s: float = 60.0,
    train_images_per_s: float = 40.0,
    status: str = "FINISHED",
) -> Path:
    """Write ``runs_dir/<backbone>/<recipe>/seed<seed>/`` {metrics.json, history.csv, steps.csv, run.json}."""
    cfg = resolve_run(params, backbone, recipe, seed, experiments_dir=REPO / "experiments")
    t = cfg.train
    out = Path(runs_dir) / backbone / recipe / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)

    cm = _confusion(correct)
    n_test = sum(TEST_COUNTS.values())
    n_correct = sum(cm[i][i] for i in range(len(CLASSES)))
    predicted = sum(1 for j in range(len(CLASSES)) if any(row[j] for row in cm))
    metrics = {"test_acc": n_correct / n_test, "test_loss": test_loss, "test_correct": n_correct, "test_images": n_test,
               "train_acc": train_acc, "train_loss": train_loss, "wall_time_s": wall_time_s,
               "train_images_per_s": train_images_per_s, "collapsed": predicted == 1, "predicted_classes": predicted}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    steps_per_epoch = math.ceil(sum(TRAIN_COUNTS.values()) / t.batch_size)
    total = steps_per_epoch * t.epochs
    warm = math.ceil(t.warmup_fraction * total) if t.warmup else 0  # the paper's fraction of training
    lrs = [lr_at(s, t.lr, total, warm, t.decay) for s in range(total)]
    lines = ["step,epoch,lr,loss,grad_norm"]
    for s in range(total):  # a loss that falls and a gradient norm that starts above 1 and settles below it
        loss = train_loss + 0.2 * math.exp(-s / 20)
        grad = 0.4 + 2.0 * math.exp(-s / 15) + 0.05 * seed + 0.1 * math.sin(s)
        lines.append(f"{s},{s // steps_per_epoch + 1},{lrs[s]:.8g},{loss:.6f},{grad:.6f}")
    (out / "steps.csv").write_text("\n".join(lines) + "\n")

    lines = ["epoch,train_loss,train_acc,test_loss,test_acc,lr,epoch_time_s"]
    for e in range(1, t.epochs + 1):
        k = (t.epochs - e) / t.epochs  # 0 at the last epoch, which shows the final numbers
        lines.append(f"{e},{train_loss + 0.3 * k:.6f},{train_acc * (1 - 0.4 * k):.6f},{test_loss + 0.2 * k:.6f},"
                     f"{metrics['test_acc'] * (1 - 0.3 * k):.6f},{lrs[e * steps_per_epoch - 1]:.8g},"
                     f"{wall_time_s / t.epochs:.3f}")
    (out / "history.csv").write_text("\n".join(lines) + "\n")

    vit = parse_model_name(cfg.model, image_size=cfg.image_size)
    total_params = vit_param_count(cfg.model, cfg.image_size, len(CLASSES))
    head = vit.hidden_dim * len(CLASSES) + len(CLASSES)
    pretrained = None
    if cfg.pretrained is not None:
        p = cfg.pretrained
        pretrained = {"name": cfg.pretrained_name, "label": p.label, "model": p.model, "source": p.source,
                      "sha256": p.sha256 or "cd" * 32, "source_sha256": p.sha256 or "ef" * 32,
                      "pretraining": p.pretraining,
                      "transform": {"resize": p.resize, "crop": p.crop, "interpolation": p.interpolation}}
    run_index = params.study.recipes.index(recipe) * 10 + seed + (0 if backbone == "scratch" else 100)
    info = {
        "status": status, "variant": cfg.variant, "backbone": backbone, "recipe": recipe, "seed": seed,
        "study": params.study.name,
        "config": cfg.model_dump(mode="json"),
        "schedule": {"total_steps": total, "steps_per_epoch": steps_per_epoch, "warmup_steps": warm,
                     "paper_warmup_steps": PAPER_WARMUP_STEPS, "paper_total_steps": PAPER_IMAGENET_STEPS,
                     "warmup_fraction": t.warmup_fraction if t.warmup else 0.0},
        "model": {"name": cfg.model, "params_total": total_params,
                  "params_trainable": head if backbone == "frozen" else total_params, "layers": vit.num_layers,
                  "hidden": vit.hidden_dim, "mlp": vit.mlp_dim, "heads": vit.num_heads, "patch": vit.patch_size,
                  "image_size": vit.image_size},
        "data": {"dataset": cfg.dataset, "digest": DIGEST, "classes": list(CLASSES),
                 "source": "../shared/datasets/pizza_steak_sushi.zip",
                 "counts": {"train": TRAIN_COUNTS | {"total": sum(TRAIN_COUNTS.values())},
                            "test": TEST_COUNTS | {"total": n_test}}},
        "pretrained": pretrained,
        "evaluation": {"classes": list(CLASSES), "confusion_matrix": cm,
                       "per_class_accuracy": {c: cm[i][i] / TEST_COUNTS[c] for i, c in enumerate(CLASSES)}},
        "provenance": {"git_commit": "0123456789abcdef0123456789abcdef01234567", "git_dirty": False,
                       "torch": "2.14.1", "torchvision": "0.29.1", "mlflow": "3.17.2", "python": "3.11.7",
                       "platform": "Linux-x86_64", "device": "cpu", "device_name": "cpu (x86_64, 2 threads)",
                       "precision": "fp32",
                       "dvc_stage": f"train-{backbone}@{recipe}-{seed}",
                       "started_at": f"2025-01-01T{run_index // 60:02d}:{run_index % 60:02d}:00+00:00",
                       "finished_at": f"2025-01-01T{run_index // 60:02d}:{run_index % 60:02d}:30+00:00"},
        "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "experiment_id": "1",
                   "experiment_name": f"vit-repro/{params.study.name}",
                   "run_id": f"{run_index:032x}", "parent_run_id": f"{1000 + run_index:032x}",
                   "weights_artifact": "weights/model.safetensors" if seed in t.weights_for_seeds else None},
    }
    (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
