"""Frozen features: a pretrained backbone loaded frozen, and the class-token feature of every image, computed once.

The frozen arms never change the backbone and use no augmentation, so each image's feature vector (the
class token after the final LayerNorm) is computed once for every image of the study (``features``
stage), and every frozen run, all recipes and seeds, trains its head on rows of that table. The weights
come from the ``pretrained`` stage (``vit_repro.backbone``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import source_digest
from .config import BackboneSpec
from .devices import autocast
from .errors import UserError
from .fsutil import staged_dir
from .images import ImageTransform, load_images, pretrained_transform
from .model import VisionTransformer, parse_model_name
from .splits import Splits, Subset

WEIGHTS_FILE = "backbone.safetensors"
INFO_FILE = "backbone.json"
FEATURES_FILE = "features.safetensors"
FEATURES_INFO = "features.json"
FEATURE_CODE = ("features.py", "images.py", "model.py", "devices.py")  # the features stage's code deps


class BackboneError(UserError):
    """Pretrained weights or features are missing, corrupt or unloadable; the message says how to supply them."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def transform_for(spec: BackboneSpec) -> ImageTransform:
    return pretrained_transform(spec.resize, spec.crop, spec.interpolation)


def read_info(pretrained_dir: Path) -> dict[str, Any]:
    path = Path(pretrained_dir) / INFO_FILE
    if not path.is_file():
        raise BackboneError(f"{path} not found: run `dvc repro pretrained` (or `vit-repro pretrained`) first")
    return json.loads(path.read_text())


def load_backbone(pretrained_dir: Path, num_classes: int) -> tuple[VisionTransformer, dict[str, Any]]:
    """Our ViT with the fetched weights, frozen and in eval mode, with a zero-initialised head."""
    info = read_info(pretrained_dir)
    weights = Path(pretrained_dir) / WEIGHTS_FILE
    if not weights.is_file() or sha256_file(weights) != info["sha256"]:
        raise BackboneError(f"{weights} is missing or does not match the sha256 in {INFO_FILE}: run `dvc repro pretrained`")
    model = VisionTransformer(parse_model_name(info["model"], image_size=info["transform"]["crop"], num_classes=num_classes))
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    if unexpected or any(not k.startswith("heads.") for k in missing):
        raise BackboneError(f"{weights} does not fit ViT-{info['model']}: missing {missing}, unexpected {unexpected}")
    model.reset_head(num_classes, zero_init=True)
    for param_name, param in model.named_parameters():
        param.requires_grad = param_name.startswith("heads.")
    return model.eval(), info


FEATURE_GRID = 2.0**-16  # fp32 features are stored on this grid (about 1.5e-5; the features are of order 1)


@torch.inference_mode()
def extract_features(model: VisionTransformer, pixels: torch.Tensor, transform: ImageTransform, device: torch.device,
                     batch_size: int = 64, precision: str = "fp32") -> torch.Tensor:
    """Class-token features (N, D) of uint8 images (N, 3, H, W), returned in float32.

    ``fp32``: computed in float64 and rounded to multiples of ``FEATURE_GRID``, so that they are the same
    bits on any CPU: float32 sums in a kernel-dependent order and differs in its last bits from one CPU kind
    to another (and so would every hash of the features), float64's differences are far below the grid.
    ``bf16``: bfloat16 autocast, as it comes (fast; the bits then depend on the hardware).
    """
    exact = precision == "fp32"
    model.eval().to(device, torch.float64 if exact else None)
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = transform.to_input(pixels[start : start + batch_size].to(device, non_blocking=True))
        with autocast(device, precision):
            vectors = model.forward_features(batch.double() if exact else batch).cpu()
        out.append((torch.round(vectors / FEATURE_GRID) * FEATURE_GRID if exact else vectors).float())
    return torch.cat(out)


@dataclass(frozen=True, eq=False)
class Features:
    """The feature vector of every image of the study, by image sha256."""

    vectors: torch.Tensor  # float32 [N, D]
    ids: tuple[str, ...]
    info: dict[str, Any]

    def select(self, subset: Subset) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of ``subset``'s images, in its order."""
        row = {k: i for i, k in enumerate(self.ids)}
        missing = [i.sha256 for i in subset.images if i.sha256 not in row]
        if missing:
            raise BackboneError(f"{len(missing)} image(s) of {subset.name!r} have no features (e.g. {missing[0][:16]}…): "
                                "the features are older than the splits; run `dvc repro features`")
        index = torch.tensor([row[i.sha256] for i in subset.images], dtype=torch.long)
        return self.vectors[index], torch.tensor([i.label for i in subset.images], dtype=torch.long)


def compute_features(pretrained_dir: Path, splits: Splits, prepared_root: Path, out_dir: Path, device: torch.device,
                     cache_dir: Path | None = None, precision: str = "fp32") -> dict[str, Any]:
    """Features of every image of the study, written with the key that identifies them.

    ``precision``: ``fp32``, or ``bf16`` autocast (about twice as fast on CPUs with bf16 matmuls; the
    features differ in the third significant digit, so the key changes).
    """
    model, info = load_backbone(pretrained_dir, num_classes=len(splits.classes))
    transform = pretrained_transform(**info["transform"])
    everything = Subset("study", splits.all_images())
    images = load_images(everything, prepared_root, transform, cache_dir)
    vectors = extract_features(model, images.pixels, transform, device, precision=precision)
    meta = {"backbone": info, "transform": transform.key(), "images": everything.digest, "classes": list(splits.classes),
            "dim": int(vectors.shape[1]), "precision": precision, "code": source_digest(FEATURE_CODE)}
    identity = f"{info['sha256']}|{meta['transform']}|{everything.digest}|{precision}|{meta['code']}"
    meta["key"] = hashlib.sha256(identity.encode()).hexdigest()[:16]
    with staged_dir(out_dir) as tmp:
        save_file({"features": vectors.contiguous()}, tmp / FEATURES_FILE,
                  metadata={"key": meta["key"], "ids": json.dumps(list(images.ids))})
        (tmp / FEATURES_INFO).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def read_features_info(features_dir: Path) -> dict[str, Any]:
    """What the features are (backbone, transform, images, key), without loading the tensors."""
    features_dir = Path(features_dir)
    if not all((features_dir / name).is_file() for name in (FEATURES_FILE, FEATURES_INFO)):
        raise BackboneError(f"no features in {features_dir}: run `dvc repro features` first")
    return json.loads((features_dir / FEATURES_INFO).read_text())


def load_features(features_dir: Path) -> Features:
    from safetensors import safe_open

    info = read_features_info(features_dir)
    with safe_open(str(Path(features_dir) / FEATURES_FILE), framework="pt") as f:
        ids = tuple(json.loads(f.metadata()["ids"]))
        vectors = f.get_tensor("features")
    return Features(vectors, ids, info)
