"""The ``data`` section (one epoch of the decoded-tensor loader against decoding the JPEGs every epoch) and the
``dvc`` section (``dvc repro`` with nothing to do)."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .options import Options
from .repo import _env, _run, _timed
from .timing import Job, interleaved


def data_section(opts: Options, device, log: Callable[[str], None]) -> dict[str, Any]:
    """Seconds to deliver one epoch of a training set: decoded-tensor cache (read once per run, then batches from
    memory) against decoding the JPEGs every epoch (the seed notebook's way)."""
    import torch

    from ..core.config import load_params
    from ..core.images import ImageTransform, load_image, load_images, make_loader
    from ..core.splits import read_splits

    params = load_params(opts.params)
    splits = read_splits(opts.repo / "data" / "splits")
    name = next(iter(params.data.train_sets))
    subset = splits.subset(name)
    prepared = opts.repo / "data" / "prepared"
    transform = ImageTransform(resize=(opts.image_size, opts.image_size))
    files = [prepared / i.dataset / i.file for i in subset.images]
    pin = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="vit-bench-data-") as tmp:
        cache = Path(tmp)
        images = load_images(subset, prepared, transform, cache)  # decodes and writes the cache, untimed

        def cached_epoch() -> None:
            for x, y in make_loader(images.pixels, images.labels, opts.batch_size, shuffle=True, seed=0, pin_memory=pin):
                transform.to_input(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)

        def decode_epoch() -> None:
            for start in range(0, len(files), opts.batch_size):
                batch = torch.stack([load_image(f, transform) for f in files[start:start + opts.batch_size]])
                transform.to_input(batch.to(device, non_blocking=True))

        jobs = [Job("data", "cache_read", "-", lambda: load_images(subset, prepared, transform, cache), len(files), 0),
                Job("data", "cached_epoch", "-", cached_epoch, len(files), 0),
                Job("data", "decode_epoch", "-", decode_epoch, len(files), 0)]
        times = interleaved(jobs, opts.repeats, opts.min_run_time)
    med = {job.model: statistics.median(t for r in times[job.name] for t in r) for job in jobs}
    return {"train_set": name, "images": len(files), "image_size": opts.image_size, "cache_read_s": med["cache_read"],
            "cached_epoch_s": med["cached_epoch"], "decode_epoch_s": med["decode_epoch"]}


# -------------------------------------------------------------------------------------------------- dvc

def dvc_noop(repo: Path, repeats: int) -> dict[str, Any]:
    """``dvc repro`` wall time when ``dvc status`` says every stage is up to date; else why it was skipped."""
    env = _env(Path(tempfile.gettempdir()))
    env.pop("MLFLOW_TRACKING_URI")
    dvc = [sys.executable, "-m", "dvc"]
    status = _run([*dvc, "status", "dvc.yaml", "--json"], repo, env)
    if status.returncode != 0:
        return {"skipped": f"`dvc status` failed in {repo}: {' '.join(status.stderr.split())[-300:]}"}
    changed = json.loads(status.stdout or "{}")
    if changed:
        return {"skipped": f"{len(changed)} stage(s) not up to date in {repo} (run `dvc repro` first): "
                           + ", ".join(sorted(changed)[:5])}
    times = [_timed([*dvc, "repro"], repo, env)[0] for _ in range(repeats)]
    return {"seconds": statistics.median(times), "seconds_all": times, "stages": _count_stages(repo)}


def _count_stages(repo: Path) -> int | None:
    import yaml

    lock = repo / "dvc.lock"
    return len((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.is_file() else None
