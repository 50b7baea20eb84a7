"""Feature extraction of the frozen path (src/vit_repro/backbone.py) in float32 and bfloat16."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vit_repro import backbone
from vit_repro.config import BackboneSpec
from vit_repro.model import VisionTransformer, parse_model_name, to_torchvision_state_dict

CPU = torch.device("cpu")


def test_bf16_features_are_recorded_keyed_apart_and_close_to_fp32(tmp_path: Path, prepared_dir: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    state = to_torchvision_state_dict(VisionTransformer(parse_model_name("Ti/16", image_size=32)).state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, weights)
    spec = BackboneSpec(label="Ti/16 random", model="Ti/16", source="file", path=str(weights), pretraining="none",
                        resize=32, crop=32)
    backbone.fetch(spec, "tiny", tmp_path / "pretrained")
    metas, tensors = {}, {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"features-{precision}"
        metas[precision] = backbone.compute_features(tmp_path / "pretrained", prepared_dir, out, CPU, tmp_path / "cache",
                                                     precision=precision)
        assert backbone.read_features_info(out)["precision"] == precision
        tensors[precision] = load_file(out / backbone.FEATURES_FILE)
    assert metas["fp32"]["key"] != metas["bf16"]["key"]  # different numbers, different identity
    for split in ("train", "test"):
        a, b = tensors["fp32"][f"{split}_features"], tensors["bf16"][f"{split}_features"]
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        assert not torch.equal(a, b)  # bf16 really ran
        assert (a - b).abs().max() < 0.05 * a.abs().max()  # ... and stays within bf16 rounding
        assert torch.equal(tensors["fp32"][f"{split}_labels"], tensors["bf16"][f"{split}_labels"])
