"""The regime sweep behind the `vit` and `resnet` arms: where does training from scratch work on 225 images?

Every candidate trains on the 225-image training set minus its validation fold (`225:fit`, 180 images) and is
scored on that fold (`225:val`, 45 images): the test set is never read. Candidates vary what issue 14 asks to
choose by measurement: the learning-rate scaling rule (square root or linear in the batch, from Table 3's
ImageNet rate), augmentation (none, or random-resized crop + flip) and the budget of images seen, for our
ViT-Ti/16 and torchvision's ResNet-18 at 64 px, with the `paper` recipe (warmup, cosine decay, clipping) and
AdamW with decoupled weight decay 0.3 (the ImageNet row). Each (candidate, seed) is one real `train.fit` run.

    python benchmarks/scratch_regime.py --models vit:Ti/16 --seeds 0 1 2 3 --out benchmarks/results/scratch_regime.json
    python benchmarks/scratch_regime.py --seeds 0 --budgets 2700 --out /tmp/quick.json   # a quick look

Each finished run is appended to ``<out>.jsonl``; a rerun skips those and adds the rest (more seeds, say).

The results (JSON, JSONL and a Markdown table beside them) are committed; params.yaml's `vit` and `resnet` arms take
the candidate with the best mean validation balanced accuracy among those that fit the study's time budget.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from vit_repro.config import AugmentConfig, TrainConfig, load_params
from vit_repro.devices import resolve_device
from vit_repro.images import Augment, ImageTransform, load_images
from vit_repro.models import build_model
from vit_repro.schedule import Schedule
from vit_repro.splits import read_splits
from vit_repro.tables import markdown_table
from vit_repro.train import evaluate, fit

AUGMENTS = {"none": AugmentConfig(), "crop+flip": AugmentConfig(crop_scale=(0.35, 1.0), flip=True)}


def run(model_name: str, rule: str, augment: str, budget: int, seed: int, data, to_input, size: int,
        device: torch.device) -> dict:
    (train_x, train_y), (val_x, val_y) = data
    cfg = TrainConfig(optimizer="adamw", lr=3e-3, lr_scaling=rule, weight_decay=0.3, warmup=True, decay="cosine",
                      clip_grad_norm=1.0, images_seen=budget, eval_every=10_000, checkpoint=False, device=str(device))
    epochs = max(1, round(budget / len(train_y)))
    schedule = Schedule(len(train_y), cfg.batch_size, 1, epochs, True, cfg.effective_lr, cfg.warmup_fraction, cfg.decay)
    torch.manual_seed(seed)
    model = build_model(model_name, size, 3, dropout=0.1)
    aug = Augment(AUGMENTS[augment], (size, size), seed) if AUGMENTS[augment].enabled else None
    started = time.perf_counter()
    fit(model, (train_x, train_y), (val_x, val_y), cfg, schedule, seed, to_input, device, 3, augment=aug, progress=False)
    seconds = time.perf_counter() - started
    val = evaluate(model, (val_x, val_y), to_input, device, 3)
    train = evaluate(model, (train_x, train_y), to_input, device, 3)
    return {"model": model_name, "lr_rule": rule, "lr": cfg.effective_lr, "augment": augment, "images_seen": budget,
            "epochs": epochs, "seed": seed, "seconds": round(seconds, 1), "val_balanced_accuracy": val.balanced_accuracy,
            "val_loss": val.loss, "train_accuracy": train.accuracy, "collapsed": val.predicted_classes == 1}


def summarize(rows: list[dict]) -> list[dict]:
    keys = ("model", "lr_rule", "augment", "images_seen")
    out = []
    for key, group in itertools.groupby(sorted(rows, key=lambda r: tuple(str(r[k]) for k in keys)),
                                        key=lambda r: tuple(r[k] for k in keys)):
        group = list(group)
        bacc = [r["val_balanced_accuracy"] for r in group]
        out.append(dict(zip(keys, key)) | {
            "seeds": len(group), "val bal. acc. % (mean)": f"{100 * statistics.fmean(bacc):.1f}",
            "per seed": ", ".join(f"{100 * b:.1f}" for b in bacc),
            "val loss": f"{statistics.fmean(r['val_loss'] for r in group):.3f}",
            "train acc. %": f"{100 * statistics.fmean(r['train_accuracy'] for r in group):.1f}",
            "collapsed": sum(r["collapsed"] for r in group), "s per run": f"{statistics.fmean(r['seconds'] for r in group):.0f}"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit:Ti/16", "resnet18"])
    parser.add_argument("--rules", nargs="+", default=["sqrt", "linear"])
    parser.add_argument("--augments", nargs="+", default=list(AUGMENTS), choices=list(AUGMENTS))
    parser.add_argument("--budgets", nargs="+", type=int, default=[5400], help="images seen per run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    splits = read_splits(Path("data/splits"))
    transform = ImageTransform(resize=(args.image_size, args.image_size))
    fit_set = load_images(splits.subset("225:fit"), Path("data/prepared"), transform, Path(".cache/images"))
    val_set = load_images(splits.subset("225:val"), Path("data/prepared"), transform, Path(".cache/images"))
    data = ((fit_set.pixels, fit_set.labels), (val_set.pixels, val_set.labels))
    device = resolve_device(load_params(args.params).train.device)
    log = args.out.with_suffix(".jsonl")  # one line per finished run: a rerun skips them, and adds what is new
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = {(r["model"], r["lr_rule"], r["augment"], r["images_seen"], r["seed"]) for r in rows}
    log.parent.mkdir(parents=True, exist_ok=True)
    for key in itertools.product(args.models, args.rules, args.augments, args.budgets, args.seeds):
        if key in done:
            continue
        r = run(*key, data, transform.to_input, args.image_size, device)
        rows.append(r)
        with open(log, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        print(f"{' '.join(map(str, key[:4]))} seed {key[4]}: val balanced accuracy {r['val_balanced_accuracy']:.3f}, "
              f"{r['seconds']:.0f}s", file=sys.stderr, flush=True)
    table = summarize(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": rows, "summary": table, "fit_images": len(fit_set), "val_images": len(val_set),
                                    "torch_threads": torch.get_num_threads()}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown_table(table) + "\n")
    print(markdown_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
