"""torchvision's ``VisionTransformer`` state dicts in our ViT's names, and strict loading of torchvision weights."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from .model import ViTConfig, VisionTransformer

_TV_LAYER = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
_OUR_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TOP_TV_TO_OURS = {
    "class_token": "cls_token",
    "conv_proj.weight": "patch_embed.proj.weight",
    "conv_proj.bias": "patch_embed.proj.bias",
    "encoder.pos_embedding": "pos_embed",
    "encoder.ln.weight": "norm.weight",
    "encoder.ln.bias": "norm.bias",
}
_LAYER_TV_TO_OURS = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj.weight": "attn.proj.weight",
    "self_attention.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.3.weight": "mlp.fc2.weight",
    "mlp.3.bias": "mlp.fc2.bias",
}
_HEAD_KEYS = tuple(f"heads.{m}.{p}" for m in ("pre_logits", "head") for p in ("weight", "bias"))
_TOP_OURS_TO_TV = {v: k for k, v in _TOP_TV_TO_OURS.items()}
_LAYER_OURS_TO_TV = {v: k for k, v in _LAYER_TV_TO_OURS.items()}


def _is_head_key(key: str) -> bool:
    return key.startswith("heads.")


def _rename(key: str, top: Mapping[str, str], layer: Mapping[str, str], pattern: re.Pattern, to: str) -> str | None:
    """``key`` in the other naming: a top-level name, a head name (the same on both sides) or a layer's name."""
    if key in top:
        return top[key]
    if key in _HEAD_KEYS:
        return key
    m = pattern.match(key)
    return to.format(m[1], layer[m[2]]) if m and m[2] in layer else None


def _tv_key_to_ours(key: str) -> str | None:
    return _rename(key, _TOP_TV_TO_OURS, _LAYER_TV_TO_OURS, _TV_LAYER, "blocks.{}.{}")


def _our_key_to_tv(key: str) -> str | None:
    """The torchvision name of one of our keys, for error messages in the checkpoint's own terms."""
    return _rename(key, _TOP_OURS_TO_TV, _LAYER_OURS_TO_TV, _OUR_LAYER, "encoder.layers.encoder_layer_{}.{}")


def _expected_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of ``VisionTransformer(cfg)``, without building it."""
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _bullets(items: list[str], limit: int = 20) -> str:
    shown = [f"    {item}" for item in items[:limit]]
    if len(items) > limit:
        shown.append(f"    ... and {len(items) - limit} more")
    return "\n".join(shown)


def from_torchvision_state_dict(sd: Mapping[str, Tensor], cfg: ViTConfig | None = None) -> dict[str, Tensor]:
    """Rename a torchvision ``VisionTransformer`` state dict to this module's names.

    Head keys are optional (headless checkpoints). With ``cfg`` the backbone shapes are checked
    against it. Raises ``ValueError`` listing keys that are not torchvision ViT keys or mis-shaped.
    Tensors are not copied.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        new = _tv_key_to_ours(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(
            "not keys of a torchvision VisionTransformer (conv-stem and other variants are not supported):\n"
            + _bullets(sorted(unknown))
        )
    if cfg is not None:
        expected = _expected_shapes(cfg)
        bad = [
            f"{k}: checkpoint {tuple(v.shape)}, config expects {expected[k]}"
            for k, v in out.items()
            if not _is_head_key(k) and k in expected and tuple(v.shape) != expected[k]
        ]
        extra = sorted(k for k in out if not _is_head_key(k) and k not in expected)
        missing = sorted(k for k in expected if not _is_head_key(k) and k not in out)
        problems = []
        if bad:
            problems.append("mis-shaped keys:\n" + _bullets(bad))
        if extra:
            problems.append(f"keys beyond the config's {cfg.num_layers} layers:\n" + _bullets(extra))
        if missing:
            problems.append("missing backbone keys:\n" + _bullets(missing))
        if problems:
            raise ValueError("torchvision state dict does not match the config:\n" + "\n".join(problems))
    return out


def load_torchvision_weights(model: VisionTransformer, sd: Mapping[str, Tensor]) -> list[str]:
    """Load a torchvision ``VisionTransformer`` state dict into ``model``, strictly.

    Every backbone key must be present with exactly the model's shape, and nothing else may be in
    the checkpoint. Head keys are loaded only when the model has them with the same shape; otherwise
    (headless checkpoint, other number of classes, a pre-logits layer the model lacks) the model's
    head is left as initialised. Returns the model's head keys that were not loaded.

    Raises:
        ValueError: listing unexpected, missing and mis-shaped keys.
    """
    own = model.state_dict()
    converted: dict[str, Tensor] = {}
    unexpected = []
    for key, value in sd.items():
        new = _tv_key_to_ours(key)
        if new is None:
            unexpected.append(key)
        else:
            converted[new] = value

    mis_shaped, to_load = [], {}
    for key, value in converted.items():
        if key not in own:
            if not _is_head_key(key):
                n = model.cfg.num_layers
                unexpected.append(f"{_our_key_to_tv(key)} (the model has {n} layer{'s' * (n != 1)})")
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            if _is_head_key(key):
                continue
            hint = ""
            if key == "pos_embed":
                hint = (f" (checkpoint has {value.shape[1]} tokens, the model {own[key].shape[1]}: "
                        "different image or patch size)")
            mis_shaped.append(
                f"{_our_key_to_tv(key)}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}{hint}"
            )
            continue
        to_load[key] = value
    missing = [_our_key_to_tv(k) for k in own if not _is_head_key(k) and k not in to_load and k not in converted]

    if unexpected or missing or mis_shaped:
        parts = []
        if unexpected:
            parts.append("unexpected keys:\n" + _bullets(sorted(unexpected)))
        if missing:
            parts.append("missing keys:\n" + _bullets(missing))
        if mis_shaped:
            parts.append("mis-shaped keys:\n" + _bullets(mis_shaped))
        raise ValueError(
            f"checkpoint does not fit this ViT (layers={model.cfg.num_layers}, hidden={model.cfg.hidden_dim}, "
            f"mlp={model.cfg.mlp_dim}, patch={model.cfg.patch_size}, image={model.cfg.image_size}):\n"
            + "\n".join(parts)
        )
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(_is_head_key(k) for k in result.missing_keys), result.missing_keys
    return list(result.missing_keys)
