"""Pretrained backbones: fetch and verify weights, load them frozen, and cache their features.

The frozen path never changes the backbone and uses no augmentation, so each image's feature vector
(the class token after the final LayerNorm) is computed once per (weights, transform, data) and every
frozen run, all recipes and seeds, trains its linear head on those cached vectors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import BackboneSpec
from .fsutil import staged_dir
from .data import ImageTransform, load_split, pretrained_transform, read_summary
from .model import VisionTransformer, autocast, load_torchvision_weights, parse_model_name

WEIGHTS_FILE = "backbone.safetensors"
INFO_FILE = "backbone.json"
FEATURES_FILE = "features.safetensors"
FEATURES_INFO = "features.json"


class BackboneError(RuntimeError):
    """Pretrained weights are missing, corrupt or unloadable; the message says how to supply them."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def transform_for(spec: BackboneSpec) -> ImageTransform:
    return pretrained_transform(spec.resize, spec.crop, spec.interpolation)


def _torchvision_state_dict(spec: BackboneSpec) -> tuple[dict[str, torch.Tensor], Path]:
    """Download (once; torch hub caches it) and sha256-check torchvision's weights."""
    import torchvision.models as tvm

    arch = {"B/16": "ViT_B_16", "B/32": "ViT_B_32", "L/16": "ViT_L_16", "L/32": "ViT_L_32", "H/14": "ViT_H_14"}
    if spec.model not in arch:
        raise BackboneError(f"torchvision has no pretrained ViT {spec.model}; choose one of {sorted(arch)}")
    enum = getattr(tvm, f"{arch[spec.model]}_Weights")
    try:
        weights = enum[spec.weights]
    except KeyError:
        raise BackboneError(f"{enum.__name__} has no {spec.weights!r}; valid: {[w.name for w in enum]}") from None
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = hub_dir / Path(weights.url).name
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch is a RuntimeError
        raise BackboneError(
            f"cannot get torchvision weights {enum.__name__}.{spec.weights} ({exc}).\n"
            f"Offline? Copy {Path(weights.url).name} (from {weights.url}) into {hub_dir}, or run the study with "
            f"the local ViT-S/14 backbone: `dvc exp run -S study.name=cpu-small`."
        ) from None
    return state, cached


def fetch(spec: BackboneSpec, name: str, out_dir: Path, root: Path = Path(".")) -> dict[str, Any]:
    """Fetch and verify a backbone's weights, convert them to our model, and write them with their identity.

    Writes ``out_dir/backbone.safetensors`` (our ViT's state dict, no head) and ``out_dir/backbone.json``.
    """
    if spec.source == "torchvision":
        state, source_file = _torchvision_state_dict(spec)
        source_sha = sha256_file(source_file) if source_file.is_file() else "unknown"
        origin = f"torchvision {spec.model} {spec.weights}"
    else:
        path = (root / spec.path).resolve() if not Path(spec.path).is_absolute() else Path(spec.path)
        if not path.is_file():
            raise BackboneError(
                f"pretrained checkpoint {path} not found. Supply one: put the file there, or set "
                f"backbones.{name}.path in params.yaml to a torchvision-format ViT state dict "
                f"(.safetensors or .pth)."
            )
        source_sha = sha256_file(path)
        if spec.sha256 and source_sha != spec.sha256:
            raise BackboneError(
                f"checksum mismatch for {path}: sha256 {source_sha}, expected {spec.sha256} "
                f"(backbones.{name}.sha256). The file is corrupt or another checkpoint; replace it."
            )
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
        origin = str(spec.path)

    model = VisionTransformer(parse_model_name(spec.model, image_size=spec.crop))
    try:
        load_torchvision_weights(model, state)
    except ValueError as exc:
        raise BackboneError(f"{origin} does not fit a ViT-{spec.model}: {exc}") from None
    backbone_state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("heads.")}

    info = {
        "name": name,
        "label": spec.label,
        "model": spec.model,
        "source": spec.source,
        "origin": origin,
        "source_sha256": source_sha,
        "pretraining": spec.pretraining,
        "transform": {"resize": spec.resize, "crop": spec.crop, "interpolation": spec.interpolation},
    }
    with staged_dir(out_dir) as tmp:
        save_file(backbone_state, tmp / WEIGHTS_FILE, metadata={"name": name, "source_sha256": source_sha})
        info["sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def read_info(pretrained_dir: Path) -> dict[str, Any]:
    path = Path(pretrained_dir) / INFO_FILE
    if not path.is_file():
        raise BackboneError(f"{path} not found: run `dvc repro pretrained` (or `vit-repro pretrained`) first")
    return json.loads(path.read_text())


def load_backbone(pretrained_dir: Path, num_classes: int) -> tuple[VisionTransformer, dict[str, Any]]:
    """Our ViT with the fetched backbone weights, frozen and in eval mode, with a zero-initialised head."""
    info = read_info(pretrained_dir)
    weights = Path(pretrained_dir) / WEIGHTS_FILE
    if sha256_file(weights) != info["sha256"]:
        raise BackboneError(f"{weights} does not match the sha256 in {INFO_FILE}: re-run `dvc repro pretrained`")
    model = VisionTransformer(parse_model_name(info["model"], image_size=info["transform"]["crop"], num_classes=num_classes))
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    if unexpected or any(not k.startswith("heads.") for k in missing):
        raise BackboneError(f"{weights} does not fit ViT-{info['model']}: missing {missing}, unexpected {unexpected}")
    model.reset_head(num_classes, zero_init=True)
    freeze_backbone(model)
    return model, info


def freeze_backbone(model: VisionTransformer) -> None:
    """Freeze everything but the head; the backbone stays in eval mode (no dropout) even during training."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("heads.")
    model.eval()


@torch.inference_mode()
def extract_features(
    model: VisionTransformer,
    images: torch.Tensor,
    transform: ImageTransform,
    device: torch.device,
    batch_size: int = 64,
    precision: str = "fp32",
) -> torch.Tensor:
    """Class-token features (N, D) of uint8 images (N, 3, H, W), in float32 whatever the compute precision."""
    model.eval().to(device)
    out = []
    for start in range(0, len(images), batch_size):
        batch = transform.normalize(images[start : start + batch_size].to(device, non_blocking=True))
        with autocast(device, precision):
            out.append(model.forward_features(batch).float().cpu())
    return torch.cat(out)


def compute_features(
    pretrained_dir: Path,
    prepared_dir: Path,
    out_dir: Path,
    device: torch.device,
    cache_dir: Path | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Features of every train and test image, written with the key that identifies them.

    ``precision``: ``fp32``, or ``bf16`` autocast (about twice as fast on CPUs with bf16 matmul support;
    the features differ in the third significant digit, so the key changes).
    """
    summary = read_summary(prepared_dir)
    model, info = load_backbone(pretrained_dir, num_classes=len(summary["classes"]))
    transform = pretrained_transform(**info["transform"])
    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, list[str]] = {}
    for split in ("train", "test"):
        data = load_split(prepared_dir, split, transform, cache_dir)
        tensors[f"{split}_features"] = extract_features(model, data.images, transform, device, precision=precision)
        tensors[f"{split}_labels"] = data.labels
        files[split] = list(data.files)
    meta = {
        "backbone": info,
        "transform": transform.key(),
        "dataset": summary["dataset"],
        "data_digest": summary["digest"],
        "classes": summary["classes"],
        "dim": int(tensors["train_features"].shape[1]),
        "files": files,
        "precision": precision,
    }
    identity = f"{info['sha256']}|{meta['transform']}|{summary['digest']}" + ("|bf16" if precision == "bf16" else "")
    meta["key"] = hashlib.sha256(identity.encode()).hexdigest()[:16]
    with staged_dir(out_dir) as tmp:
        save_file(tensors, tmp / FEATURES_FILE, metadata={"key": meta["key"]})
        (tmp / FEATURES_INFO).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def read_features_info(features_dir: Path) -> dict[str, Any]:
    """What the cached features are (backbone, transform, data digest, key), without loading the tensors."""
    features_dir = Path(features_dir)
    if not all((features_dir / name).is_file() for name in (FEATURES_FILE, FEATURES_INFO)):
        raise BackboneError(f"no cached features in {features_dir}: run `dvc repro features` first")
    return json.loads((features_dir / FEATURES_INFO).read_text())


def load_features(features_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = read_features_info(features_dir)
    return load_file(Path(features_dir) / FEATURES_FILE), meta
