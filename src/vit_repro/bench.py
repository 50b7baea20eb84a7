"""``vit-repro bench``: what the study costs on this machine, measured against the machine's ceilings.

One process runs the sections in order, prints one table and writes the results, with the hardware
and versions that produced them, to JSON (and the same table as Markdown next to it):

1. ``ceilings``: float32 and bfloat16 matmul throughput (large square matmuls, median of repeats).
2. ``train``: a training step (forward, loss, backward, Adam) of our ViT, torchvision's and, when
   installed, timm's, float32 and bf16 autocast; achieved GFLOP/s and fraction of the ceiling.
3. ``inference``: forward passes (feature extraction) of the same models.
4. ``frozen``: every frozen-backbone run of the 2x2x2 grid x seeds through the cached-feature path,
   against one feature-extraction pass and against the seed notebook's approach (the whole model
   forward every epoch of every run: a few epochs measured, the rest extrapolated).
5. ``data``: one epoch of the decoded-tensor loader against decoding the JPEGs every epoch.
6. ``dvc``: ``dvc repro`` with nothing to do.

FLOPs are counted from the model configuration (``model.forward_macs``: 17.56 GMACs per 224 px
image for ViT-B/16); a training step counts 3x the forward pass, a MAC is 2 FLOPs. Models are
randomly initialised: weights do not change the cost. Timings are wall-clock, synchronised on GPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .model import ViTConfig, VisionTransformer, autocast, bf16_supported, forward_macs, parse_model_name

SECTIONS = ("ceilings", "train", "inference", "frozen", "data", "dvc")
MODELS = ("vit_repro", "torchvision", "timm")
PRECISIONS = ("fp32", "bf16")
GRID = ("baseline", "warmup", "decay", "clip", "warmup-decay", "warmup-clip", "decay-clip", "paper")
TRAIN_STEP_FLOPS_PER_FORWARD = 3  # forward + backward (two matmuls per forward matmul)

# The targets on the 2-core CPU (ratios measured in one run of this benchmark).
TARGETS = {
    "train_fp32_vs_torchvision": 1.15,
    "train_bf16_vs_torchvision": 1.15,
    "train_bf16_fraction_of_ceiling": 0.85,
    "frozen_grid_vs_one_feature_pass": 1.5,  # at most
    "frozen_speedup_vs_seed_approach": 20.0,
    "cached_loader_fraction_of_scratch_epoch": 0.05,  # below
    "dvc_repro_noop_seconds": 10.0,  # below
}


@dataclass
class BenchConfig:
    """What to measure, and how long; the defaults are the issue's settings."""

    device: torch.device
    sections: tuple[str, ...] = SECTIONS
    model: str = "B/16"
    batch_size: int = 32
    image_size: int = 224
    warmup: int = 1  # untimed repeats before timing
    repeats: int = 3  # timed repeats; medians are reported
    matmul_size: int = 4096
    models: tuple[str, ...] = MODELS
    seeds: tuple[int, ...] = (0, 1, 2)
    seed_epochs: int = 2  # epochs of the seed's approach that are timed
    params: Path = Path("params.yaml")
    experiments: Path = Path("experiments")
    prepared: Path | None = None  # default data/prepared/<data.dataset>
    repo: Path = Path(".")
    attention: str = "auto"  # our model's attention kernel (model.ATTENTION_KERNELS)
    compile: bool = False  # torch.compile our model in the train and inference sections


# --------------------------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved_medians(
    jobs: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds of each job, run round-robin (so drifting load hits every job alike); all timed repeats."""
    for _ in range(warmup):
        for fn in jobs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            times[name].append(_seconds(fn, device))
    return times


# ------------------------------------------------------------------------------------------- ceilings

def matmul_ceilings(device: torch.device, size: int, warmup: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of ``size x size`` matmuls in float32 (TF32 off) and bfloat16: the compute ceilings."""
    dtypes = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if bf16_supported(device) else {})
    out = {}
    with _tf32(False):
        for name, dtype in dtypes.items():
            a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
            times = interleaved_medians({name: lambda: a @ b}, device, max(warmup, 1), repeats)[name]
            out[name] = 2 * size**3 / statistics.median(times) / 1e9
    return out


@contextlib.contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# --------------------------------------------------------------------------------------------- models

def build_model(kind: str, cfg: ViTConfig, attention: str = "auto") -> nn.Module | None:
    """The same architecture from three implementations; ``None`` when ``kind``'s library is missing.

    ``attention``: our model's attention kernel (the others always use fused SDPA).
    """
    if kind == "vit_repro":
        return VisionTransformer(cfg, attention=attention)
    common = dict(patch_size=cfg.patch_size, num_heads=cfg.num_heads, num_classes=cfg.num_classes)
    if kind == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

        return TorchvisionViT(image_size=cfg.image_size, num_layers=cfg.num_layers, hidden_dim=cfg.hidden_dim,
                              mlp_dim=cfg.mlp_dim, dropout=cfg.dropout, **common)
    if kind == "timm":
        try:
            from timm.models.vision_transformer import VisionTransformer as TimmViT
        except ImportError:
            return None
        return TimmViT(img_size=cfg.image_size, embed_dim=cfg.hidden_dim, depth=cfg.num_layers,
                       mlp_ratio=cfg.mlp_dim / cfg.hidden_dim, drop_rate=cfg.dropout, **common)
    raise ValueError(f"unknown model kind {kind!r}; choose from {', '.join(MODELS)}")


def _maybe_compile(model: nn.Module, kind: str, bc: BenchConfig) -> nn.Module:
    """``torch.compile`` our model when asked (the first, warm-up, call pays the compilation)."""
    return torch.compile(model) if bc.compile and kind == "vit_repro" else model


def _throughput_row(section: str, model: str, precision: str, times: list[float], images: int,
                    flops_per_image: float, ceilings: dict[str, float], **extra: Any) -> dict[str, Any]:
    seconds = statistics.median(times)
    gflops = flops_per_image * images / seconds / 1e9
    ceiling = ceilings.get("bf16" if precision.startswith("bf16") else "fp32")
    return {
        "section": section, "model": model, "precision": precision, "batch": images,
        "seconds": seconds, "seconds_all": times, "img_per_s": images / seconds, "gflops": gflops,
        "fraction_of_ceiling": gflops / ceiling if ceiling else None, **extra,
    }


def _built_models(bc: BenchConfig, vit: ViTConfig) -> Iterator[tuple[str, nn.Module]]:
    """Each selected implementation that is installed, initialised from the same seed, on the device."""
    for kind in bc.models:
        torch.manual_seed(0)
        module = build_model(kind, vit, bc.attention)
        if module is not None:
            yield kind, module.to(bc.device)


def _precisions(device: torch.device) -> tuple[str, ...]:
    return PRECISIONS if bf16_supported(device) else ("fp32",)


def train_steps(bc: BenchConfig, vit: ViTConfig, ceilings: dict[str, float]) -> list[dict[str, Any]]:
    """Images/s of a full training step (Adam, cross-entropy) per model and precision, on random images."""
    device = bc.device
    x = torch.randn(bc.batch_size, 3, bc.image_size, bc.image_size, device=device)
    y = torch.randint(0, vit.num_classes, (bc.batch_size,), device=device)
    jobs, names = {}, {}
    for kind, module in _built_models(bc, vit):
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-4, foreach=True)  # as train.build_optimizer
        model = _maybe_compile(module.train(), kind, bc)
        for precision in _precisions(device):

            def step(model=model, optimizer=optimizer, precision=precision) -> None:
                with autocast(device, precision):
                    loss = F.cross_entropy(model(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            jobs[f"{kind}/{precision}"], names[f"{kind}/{precision}"] = step, (kind, precision)
    times = interleaved_medians(jobs, device, bc.warmup, bc.repeats)
    flops = TRAIN_STEP_FLOPS_PER_FORWARD * 2 * forward_macs(vit)
    return [_throughput_row("train", *names[k], t, bc.batch_size, flops, ceilings) for k, t in times.items()]


def inference(bc: BenchConfig, vit: ViTConfig, ceilings: dict[str, float]) -> list[dict[str, Any]]:
    """Images/s of forward passes in eval mode (feature extraction); ours also with bf16 weights."""
    device = bc.device
    x = torch.randn(bc.batch_size, 3, bc.image_size, bc.image_size, device=device)
    jobs, names = {}, {}
    for kind, module in _built_models(bc, vit):
        model = _maybe_compile(module.eval(), kind, bc)
        for precision in _precisions(device):

            def forward(model=model, precision=precision) -> None:
                with torch.inference_mode(), autocast(device, precision):
                    model(x)

            jobs[f"{kind}/{precision}"], names[f"{kind}/{precision}"] = forward, (kind, precision)
        if kind == "vit_repro" and bf16_supported(device):
            half = _maybe_compile(build_model(kind, vit, bc.attention).to(device, torch.bfloat16).eval(), kind, bc)
            xb = x.to(torch.bfloat16)

            def forward_bf16_weights() -> None:
                with torch.inference_mode():
                    half(xb)

            jobs["vit_repro/bf16-weights"] = forward_bf16_weights
            names["vit_repro/bf16-weights"] = (kind, "bf16-weights")
    times = interleaved_medians(jobs, device, bc.warmup, bc.repeats)
    return [_throughput_row("inference", *names[k], t, bc.batch_size, 2 * forward_macs(vit), ceilings)
            for k, t in times.items()]


# --------------------------------------------------------------------------------------------- frozen

def _bench_params(bc: BenchConfig, backbone_file: Path):
    """params.yaml with a study whose frozen backbone is ``backbone_file`` and whose recipes are the grid."""
    from .config import BackboneSpec, StudyPreset, load_params

    params = load_params(bc.params)
    spec = BackboneSpec(
        label=f"ViT-{bc.model}, random weights (benchmark: cost only)", model=bc.model, source="file",
        path=str(backbone_file), pretraining="none", resize=bc.image_size, crop=bc.image_size,
    )
    return params.model_copy(update={
        "backbones": params.backbones | {"bench": spec},
        "studies": params.studies | {"bench": StudyPreset(scratch_model=bc.model, frozen_backbone="bench")},
        "study": params.study.model_copy(update={"name": "bench", "recipes": list(GRID), "seeds": list(bc.seeds)}),
    }), spec


def frozen_study(bc: BenchConfig, vit: ViTConfig, prepared: Path, work: Path) -> dict[str, Any]:
    """The frozen runs through cached features vs one feature pass vs the seed's per-epoch full forward.

    Every run is a real ``train.run`` (MLflow logging to a temporary store, run.json, metrics), in
    this process; under DVC each run is also a new process (``process_start_s`` measures that cost).
    """
    from . import train
    from .backbone import compute_features, fetch, load_backbone, transform_for
    from .config import resolve_run
    from .data import load_split, read_summary
    from .model import to_torchvision_state_dict
    from safetensors.torch import save_file

    device = bc.device
    torch.manual_seed(0)
    weights = work / "backbone.safetensors"
    state = to_torchvision_state_dict(VisionTransformer(vit).state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, weights)
    params, spec = _bench_params(bc, weights)
    fetch(spec, "bench", work / "pretrained")
    cache = work / "cache"
    transform = transform_for(spec)
    for split in ("train", "test"):  # decode once, untimed: the data section times decoding
        load_split(prepared, split, transform, cache)

    feature_s = _seconds(lambda: compute_features(work / "pretrained", prepared, work / "features", device, cache), device)
    images = sum(read_summary(prepared)["counts"][s]["total"] for s in ("train", "test"))

    configs = [resolve_run(params, "frozen", recipe, seed, bc.experiments) for recipe in GRID for seed in bc.seeds]
    configs = [c.model_copy(update={"train": c.train.model_copy(update={"checkpoint": False, "device": str(device)})})
               for c in configs]
    with _environ(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}"):
        start = time.perf_counter()
        for cfg in configs:
            train.run(cfg, prepared, work / "runs" / cfg.recipe / f"seed{cfg.seed}", features_dir=work / "features",
                      progress=False)
        grid_s = time.perf_counter() - start
    epochs = sum(c.train.epochs for c in configs)

    # the seed's approach: the frozen backbone's forward pass on every batch of every epoch
    model, _ = load_backbone(work / "pretrained", num_classes=vit.num_classes)
    model.to(device)
    train_split, test_split = (load_split(prepared, s, transform, cache) for s in ("train", "test"))
    head_optimizer = torch.optim.Adam(model.heads.parameters(), lr=1e-3)
    seed_precision = configs[0].train.precision

    def seed_epoch() -> None:
        for start_ in range(0, len(train_split.labels), configs[0].train.batch_size):
            stop = start_ + configs[0].train.batch_size
            xb = transform.normalize(train_split.images[start_:stop].to(device))
            with autocast(device, seed_precision):
                loss = F.cross_entropy(model(xb).float(), train_split.labels[start_:stop].to(device))
            head_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            head_optimizer.step()
        with torch.inference_mode(), autocast(device, seed_precision):
            for start_ in range(0, len(test_split.labels), 64):
                model(transform.normalize(test_split.images[start_:start_ + 64].to(device)))

    seed_epoch_s = statistics.median(_seconds(seed_epoch, device) for _ in range(bc.seed_epochs))
    seed_total_s = seed_epoch_s * epochs
    return {
        "backbone": bc.model, "precision": seed_precision, "runs": len(configs), "epochs_total": epochs,
        "images": images, "feature_pass_s": feature_s, "grid_s": grid_s, "grid_per_run_s": grid_s / len(configs),
        "grid_vs_feature_pass": grid_s / feature_s,
        "seed_epoch_s": seed_epoch_s, "seed_epochs_timed": bc.seed_epochs,
        "seed_approach_s_extrapolated": seed_total_s,
        "cached_total_s": feature_s + grid_s, "speedup_vs_seed": seed_total_s / (feature_s + grid_s),
        "process_start_s": process_start_seconds(),
    }


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def process_start_seconds() -> float:
    """Wall time of a fresh Python process importing the training code (paid once per DVC stage)."""
    cmd = [sys.executable, "-c", "import vit_repro.train, mlflow"]
    return statistics.median(_timed_subprocess(cmd, Path(".")) for _ in range(2))


def _timed_subprocess(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- data

def data_epochs(bc: BenchConfig, prepared: Path, work: Path, batch_size: int) -> dict[str, Any]:
    """Seconds to deliver one training epoch of normalised batches: decoded-tensor cache vs JPEG decoding.

    A run reads the cache once (``cache_read_s``) and then iterates the in-memory tensors every epoch
    (``cached_epoch_s``); the seed notebook decoded and resized every JPEG every epoch (``decode_epoch_s``).
    """
    from .data import ImageTransform, load_image, load_split, make_loader

    transform = ImageTransform(resize=(bc.image_size, bc.image_size))
    cache = work / "data-cache"
    split = load_split(prepared, "train", transform, cache)  # decodes and writes the cache
    files = [prepared / f for f in split.files]
    pin = bc.device.type == "cuda"

    def cached_epoch() -> None:
        for images, labels in make_loader(split.images, split.labels, batch_size, shuffle=True, seed=0, pin_memory=pin):
            transform.normalize(images.to(bc.device, non_blocking=True)), labels.to(bc.device, non_blocking=True)

    def decode_epoch() -> None:
        for start in range(0, len(files), batch_size):
            batch = torch.stack([load_image(f, transform) for f in files[start:start + batch_size]])
            transform.normalize(batch.to(bc.device, non_blocking=True))

    jobs = {"cache_read": lambda: load_split(prepared, "train", transform, cache), "cached": cached_epoch,
            "decode": decode_epoch}
    times = interleaved_medians(jobs, bc.device, 1, bc.repeats)
    return {"images": len(files), "cache_read_s": statistics.median(times["cache_read"]),
            "cached_epoch_s": statistics.median(times["cached"]), "decode_epoch_s": statistics.median(times["decode"])}


# ------------------------------------------------------------------------------------------------ dvc

def dvc_noop(repo: Path, repeats: int) -> dict[str, Any]:
    """``dvc repro`` wall time when ``dvc status`` says every stage is up to date; else why it was skipped."""
    dvc = shutil.which("dvc")
    if dvc is None:
        return {"skipped": "dvc is not on PATH"}
    # the pipeline's stages only (what `dvc repro` runs), not other .dvc files that were never pulled
    status = subprocess.run([dvc, "status", "dvc.yaml", "--json"], cwd=repo, capture_output=True, text=True)
    if status.returncode != 0:
        return {"skipped": f"`dvc status` failed in {repo}: {status.stderr.strip()[-300:]}"}
    changed = json.loads(status.stdout or "{}")
    if changed:
        return {"skipped": f"{len(changed)} stage(s) not up to date in {repo} (run `dvc repro` first): "
                           + ", ".join(sorted(changed)[:5])}
    times = [_timed_subprocess([dvc, "repro"], repo) for _ in range(repeats)]
    return {"seconds": statistics.median(times), "seconds_all": times, "stages": _count_stages(repo)}


def _count_stages(repo: Path) -> int | None:
    lock = repo / "dvc.lock"
    if not lock.is_file():
        return None
    import yaml

    return len(yaml.safe_load(lock.read_text()).get("stages", {}))


# ----------------------------------------------------------------------------------------------- main

def environment(device: torch.device) -> dict[str, Any]:
    """Date, hardware and software versions of this benchmark run."""
    from .tracking import git_state, repo_root, versions
    from .train import device_name

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        **versions(),
    }
    for module in ("timm", "dvc"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    env["git_commit"], env["git_dirty"] = git_state(repo_root())
    return env


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, falling back to ``platform.processor()``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_benchmark(bc: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the selected sections; returns everything measured, with the targets evaluated."""
    from .config import load_params

    unknown = set(bc.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    vit = parse_model_name(bc.model, image_size=bc.image_size)
    prepared = bc.prepared or Path("data/prepared") / load_params(bc.params).data.dataset
    if {"frozen", "data"} & set(bc.sections) and not (prepared / "summary.json").is_file():
        raise FileNotFoundError(f"no prepared dataset in {prepared}: run `dvc repro prepare` first (or pass --prepared)")
    result: dict[str, Any] = {
        "environment": environment(bc.device),
        "settings": {"model": bc.model, "batch": bc.batch_size, "image_size": bc.image_size, "warmup": bc.warmup,
                     "repeats": bc.repeats, "forward_gmacs_per_image": forward_macs(vit) / 1e9,
                     "attention": bc.attention, "compile": bc.compile},
    }
    ceilings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vit-bench-") as tmp:
        work = Path(tmp)
        for section in (s for s in SECTIONS if s in bc.sections):
            log(f"[bench] {section} ...")
            started = time.perf_counter()
            if section == "ceilings":
                ceilings = result["ceilings_gflops"] = matmul_ceilings(bc.device, bc.matmul_size, bc.warmup, bc.repeats)
            elif section == "train":
                result["train"] = train_steps(bc, vit, ceilings)
            elif section == "inference":
                result["inference"] = inference(bc, vit, ceilings)
            elif section == "frozen":
                result["frozen"] = frozen_study(bc, vit, prepared, work)
            elif section == "data":
                result["data"] = data_epochs(bc, prepared, work, bc.batch_size)
            elif section == "dvc":
                result["dvc_noop"] = dvc_noop(bc.repo, bc.repeats)
            log(f"[bench] {section} done in {time.perf_counter() - started:.0f}s")
    result["targets"] = evaluate_targets(result)
    return result


def _rate(rows: list[dict], model: str, precision: str) -> float | None:
    return next((r["img_per_s"] for r in rows if r["model"] == model and r["precision"] == precision), None)


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target the measured sections allow to check: value, threshold, met."""
    out = []

    def add(name: str, value: float | None, threshold: float, at_least: bool, detail: str) -> None:
        if value is not None:
            met = value >= threshold if at_least else value <= threshold
            out.append({"target": name, "value": value, "threshold": threshold,
                        "direction": ">=" if at_least else "<=", "met": bool(met), "detail": detail})

    rows = result.get("train", [])
    for precision in PRECISIONS:
        ours, tv = _rate(rows, "vit_repro", precision), _rate(rows, "torchvision", precision)
        if ours and tv:
            add(f"train_{precision}_vs_torchvision", ours / tv, TARGETS[f"train_{precision}_vs_torchvision"], True,
                f"{ours:.3f} vs {tv:.3f} img/s")
    bf16 = next((r for r in rows if r["model"] == "vit_repro" and r["precision"] == "bf16"), None)
    if bf16 and bf16["fraction_of_ceiling"] is not None:
        add("train_bf16_fraction_of_ceiling", bf16["fraction_of_ceiling"], TARGETS["train_bf16_fraction_of_ceiling"],
            True, f"{bf16['gflops']:.0f} GFLOP/s")
    frozen = result.get("frozen")
    if frozen:
        add("frozen_grid_vs_one_feature_pass", frozen["grid_vs_feature_pass"], TARGETS["frozen_grid_vs_one_feature_pass"],
            False, f"{frozen['grid_s']:.1f}s for {frozen['runs']} runs vs {frozen['feature_pass_s']:.1f}s")
        add("frozen_speedup_vs_seed_approach", frozen["speedup_vs_seed"], TARGETS["frozen_speedup_vs_seed_approach"],
            True, f"{frozen['cached_total_s']:.0f}s vs {frozen['seed_approach_s_extrapolated']:.0f}s (extrapolated)")
    data, ours32 = result.get("data"), _rate(rows, "vit_repro", "fp32")
    if data and ours32:
        epoch_s = data["images"] / ours32
        data_s = data["cache_read_s"] + data["cached_epoch_s"]  # as if the cache were read every epoch
        add("cached_loader_fraction_of_scratch_epoch", data_s / epoch_s, TARGETS["cached_loader_fraction_of_scratch_epoch"],
            False, f"{data_s:.3f}s of a {epoch_s:.0f}s {result['settings']['model']} fp32 epoch")
    noop = result.get("dvc_noop", {})
    if "seconds" in noop:
        add("dvc_repro_noop_seconds", noop["seconds"], TARGETS["dvc_repro_noop_seconds"], False,
            f"{noop['stages']} stages")
    return out


def format_tables(result: dict[str, Any], markdown: bool = False) -> str:
    """The results as aligned text tables (or Markdown)."""
    env = result["environment"]
    lines = [
        f"vit-repro bench, {env['date']}: {env['device_name']} ({env['cpu']}, {env['cpu_cores']} cores, "
        f"{env['torch_threads']} torch threads, {env['memory_gib']} GiB)",
        f"torch {env['torch']}, torchvision {env['torchvision']}, timm {env['timm']}, mlflow {env['mlflow']}, "
        f"dvc {env['dvc']}, python {env['python']}; git {env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}",
        f"{result['settings']['model']}, batch {result['settings']['batch']}, {result['settings']['image_size']} px, "
        f"{result['settings']['forward_gmacs_per_image']:.2f} GMACs/image forward; medians of "
        f"{result['settings']['repeats']} timed repeats after {result['settings']['warmup']} warm-up; vit_repro attention "
        f"{result['settings']['attention']}{', torch.compile' if result['settings']['compile'] else ''}",
        "",
    ]
    tables: list[tuple[list[str], list[list[str]]]] = []
    if "ceilings_gflops" in result:
        tables.append((["matmul ceiling", "GFLOP/s"], [[k, f"{v:.0f}"] for k, v in result["ceilings_gflops"].items()]))
    for section in ("train", "inference"):
        if result.get(section):
            rows = [[r["model"], r["precision"], f"{r['img_per_s']:.3f}", f"{r['seconds']:.2f}", f"{r['gflops']:.0f}",
                     "" if r["fraction_of_ceiling"] is None else f"{r['fraction_of_ceiling']:.0%}"] for r in result[section]]
            tables.append(([section, "precision", "img/s", "s/batch", "GFLOP/s", "of ceiling"], rows))
    if "frozen" in result:
        f = result["frozen"]
        tables.append((["frozen study", "seconds"], [
            [f"one feature pass ({f['images']} images, {f['backbone']}, {f['precision']})", f"{f['feature_pass_s']:.1f}"],
            [f"all {f['runs']} frozen runs, cached features ({f['epochs_total']} epochs)", f"{f['grid_s']:.1f}"],
            ["grid / feature pass", f"{f['grid_vs_feature_pass']:.2f}x"],
            [f"seed approach: one epoch (median of {f['seed_epochs_timed']})", f"{f['seed_epoch_s']:.1f}"],
            [f"seed approach: {f['epochs_total']} epochs (extrapolated)", f"{f['seed_approach_s_extrapolated']:.0f}"],
            ["speed-up of feature pass + grid over the seed approach", f"{f['speedup_vs_seed']:.0f}x"],
            ["new Python process importing the training code (per DVC stage)", f"{f['process_start_s']:.1f}"],
        ]))
    if "data" in result:
        d = result["data"]
        tables.append(([f"data: one epoch of {d['images']} training images", "seconds"], [
            ["decoded-tensor cache: read once per run", f"{d['cache_read_s']:.3f}"],
            ["decoded-tensor cache: one epoch of batches", f"{d['cached_epoch_s']:.3f}"],
            ["decoding the JPEGs every epoch (the seed's way)", f"{d['decode_epoch_s']:.3f}"]]))
    if "dvc_noop" in result:
        n = result["dvc_noop"]
        row = [f"{n['stages']} stages up to date", f"{n['seconds']:.1f}"] if "seconds" in n else [f"skipped: {n['skipped']}", "-"]
        tables.append((["dvc repro, nothing to do", "seconds"], [row]))
    if result.get("targets"):
        tables.append((["target", "value", "needed", "met", "detail"], [
            [t["target"], f"{t['value']:.3g}", f"{t['direction']} {t['threshold']:g}", "yes" if t["met"] else "NO",
             t["detail"]] for t in result["targets"]]))
    if markdown:  # hard line breaks between the heading lines
        lines = [line + "  " if line else line for line in lines]
    for header, rows in tables:
        lines += _table(header, rows, markdown) + [""]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
