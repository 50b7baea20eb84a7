"""The ``frozen`` section: the recipe grid under ``dvc repro`` against one feature pass under ``dvc repro``, in
a temporary copy of ``--repo``, and the seed notebook's approach, extrapolated."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .options import NUM_CLASSES, BenchError, Options
from .repo import _env, _timed, copy_repo
from .targets import Grid
from .timing import Job, measure


def grid_params(params_file: Path, grid: Grid) -> None:
    """Rewrite ``params_file`` so that frozen arm ``grid.arm`` runs exactly the grid, and nothing else changes."""
    import yaml

    raw = yaml.safe_load(params_file.read_text())
    arms = raw.get("frozen") or {}
    if grid.arm not in arms:
        raise BenchError(f"frozen_grid.arm {grid.arm!r} is not a frozen arm of {params_file.name} ({sorted(arms)})")
    arms[grid.arm] = {**arms[grid.arm], "recipes": {grid.train_set: list(grid.recipes)}, "seeds": grid.seeds}
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def frozen_section(opts: Options, grid: Grid, device, log: Callable[[str], None]) -> dict[str, Any]:
    """The frozen grid under ``dvc repro`` vs one feature pass under ``dvc repro``, and the seed's approach."""
    import torch
    import torch.nn.functional as F

    from ..backbone import load_backbone, transform_for
    from ..core.config import load_params, resolve_arm
    from ..core.devices import autocast
    from ..core.images import load_images
    from ..core.record import RECORD_FILE
    from ..core.run import schedule_for
    from ..core.splits import Subset, read_splits

    grid = Grid(grid.arm, grid.train_set, grid.recipes, opts.frozen_seeds or grid.seeds)
    runs = len(grid.recipes) * grid.seeds
    out: dict[str, Any] = {"arm": grid.arm, "train_set": grid.train_set, "recipes": list(grid.recipes),
                           "seeds": grid.seeds, "runs": runs}
    with tempfile.TemporaryDirectory(prefix="vit-bench-frozen-") as tmp:
        work = Path(tmp)
        copy, env = work / "repo", _env(work, opts.threads)
        env["VIT_REPRO_DEVICE"] = str(device)
        log(f"[bench]   frozen: copying {opts.repo} with its built data")
        copy_repo(opts.repo.resolve(), copy, env)
        grid_params(copy / "params.yaml", grid)
        params = load_params(copy / "params.yaml")
        splits = read_splits(copy / "data" / "splits")
        spec = params.backbone
        transform = transform_for(spec)
        # decoded pixels for the feature pass (untimed: the data section times decoding), as compute_features reads them
        load_images(Subset("study", splits.all_images()), copy / "data" / "prepared", transform, copy / ".cache" / "images")
        # the MLflow store's tables, untimed (9 s for a new SQLite store here): a study's store exists after its first stage
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_experiments()
        dvc = [sys.executable, "-m", "dvc", "repro", "--single-item", "--force"]

        log(f"[bench]   frozen: dvc repro train-frozen@{grid.arm} ({runs} runs)")
        grid_s, proc = _timed([*dvc, f"train-frozen@{grid.arm}"], copy, env)
        if proc.returncode != 0:
            return out | {"failed": f"dvc repro train-frozen@{grid.arm} exited {proc.returncode}: "
                                    + " ".join(proc.stderr.split())[-400:]}
        records = [json.loads(p.read_text()) for p in (copy / "runs" / grid.arm).rglob(RECORD_FILE)]
        if len(records) != runs:
            return out | {"failed": f"dvc repro train-frozen@{grid.arm} wrote {len(records)} runs, expected {runs}"}
        in_runs = sum(r["provenance"]["wall_time_s"] for r in records)

        log("[bench]   frozen: dvc repro features (one feature pass)")
        feature_s, proc = _timed([*dvc, "features"], copy, env)
        if proc.returncode != 0:
            return out | {"failed": f"dvc repro features exited {proc.returncode}: " + " ".join(proc.stderr.split())[-400:]}
        images = len(splits.all_images())

        # the seed notebook's approach: the whole backbone forward on every batch of every epoch of every run
        cfg = resolve_arm(params, "frozen", grid.arm, copy / "experiments")[0]
        subset = splits.subset(grid.train_set)
        train = load_images(subset, copy / "data" / "prepared", transform, copy / ".cache" / "images")
        model, _ = load_backbone(copy / "models" / "pretrained", NUM_CLASSES)
        model.to(device)
        optimizer = torch.optim.Adam(model.heads.parameters(), lr=cfg.train.effective_lr)
        batch, precision = cfg.train.batch_size, cfg.train.precision

        def seed_epoch() -> None:
            for i in range(0, len(train), batch):
                x = transform.to_input(train.pixels[i:i + batch].to(device, non_blocking=True))
                y = train.labels[i:i + batch].to(device, non_blocking=True)
                with autocast(device, precision):
                    loss = F.cross_entropy(model(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        log("[bench]   frozen: the seed's approach, one epoch after a warm-up epoch")
        times = measure(Job("frozen", "seed", precision, seed_epoch, len(train), 0), 0.0)
        epochs = schedule_for(cfg, len(train)).epochs
        seed_epoch_s = statistics.median(times)
    return out | {
        "backbone": params.backbone_name, "precision": params.train.precision, "device": str(device),
        "grid_s": grid_s, "per_run_s": grid_s / runs, "runs_in_process_s": in_runs,
        "stage_overhead_s": grid_s - in_runs, "feature_pass_s": feature_s, "feature_images": images,
        "grid_vs_feature_pass": grid_s / feature_s, "epochs_per_run": epochs,
        "seed_epoch_s": seed_epoch_s, "seed_epochs_timed": len(times), "seed_train_images": len(train),
        "seed_approach_s_extrapolated": seed_epoch_s * epochs * runs,
        "speedup_vs_seed": seed_epoch_s * epochs * runs / (feature_s + grid_s),
        "note": ("both dvc repro timings include DVC, a new Python process and hashing the stage's dependencies (the "
                 "MLflow store exists already, as after a study's first stage); the feature pass reads decoded "
                 "pixels (decoding is timed in the data section); the seed approach's "
                 f"{runs} x {epochs} epochs are extrapolated from {len(times)} timed epoch(s), training only (the "
                 "seed also ran the test set through the whole model every epoch)"),
    }
