"""The frozen path's backbone and features (backbone.py, core/features.py): fetch, load, compute, select.

A random Ti/16 at 32 px written as a torchvision-format file stands in for the pretrained backbone, and
a handful of real images stand in for the study (bf16 autocast on this CPU is emulated and slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from vit_repro import backbone
from vit_repro.core import features as frozen
from vit_repro.core.features import BackboneError
from vit_repro.core.config import BackboneSpec
from vit_repro.core.images import load_images, pretrained_transform
from vit_repro.core.splits import Splits, Subset

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_splits(splits) -> Splits:
    """A study of 12 images: 4 test images, and a training set of 8 with a validation fold of 3."""
    train = Subset("8", splits.subset("225").images[::28][:8])
    return Splits(splits.classes, Subset("test", splits.test.images[::50][:4]), {"8": train},
                  {"8": Subset("8:val", train.images[:3])})


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> tuple[BackboneSpec, Path]:
    """A random Ti/16 (32 px) saved in torchvision's layout, fetched as a ``file`` backbone."""
    folder = tmp_path_factory.mktemp("tiny-backbone")
    torch.manual_seed(0)
    state = TorchvisionViT(32, 16, 12, 3, 192, 768, num_classes=3).state_dict()  # a random Ti/16
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, weights)
    spec = BackboneSpec(label="Ti/16 random", model="Ti/16", source="file", path=str(weights), pretraining="none",
                        resize=32, crop=32, sha256=frozen.sha256_file(weights))
    backbone.fetch(spec, "tiny", folder / "pretrained")
    return spec, folder / "pretrained"


@pytest.fixture(scope="module")
def computed(tiny_backbone, tiny_splits, prepared_root: Path, tmp_path_factory) -> dict[str, Path]:
    """fp32 and bf16 features of the tiny study."""
    _, pretrained = tiny_backbone
    base = tmp_path_factory.mktemp("features")
    out = {}
    for precision in ("fp32", "bf16"):
        out[precision] = base / precision
        frozen.compute_features(pretrained, tiny_splits, prepared_root, out[precision], CPU, base / "cache",
                                  precision=precision)
    return out


def test_bf16_features_are_recorded_keyed_apart_and_close_to_fp32(computed) -> None:
    infos = {p: frozen.read_features_info(d) for p, d in computed.items()}
    features = {p: frozen.load_features(d) for p, d in computed.items()}
    for precision, info in infos.items():
        assert info["precision"] == precision and features[precision].info == info
    assert infos["fp32"]["key"] != infos["bf16"]["key"]  # different numbers, different identity
    assert {k: v for k, v in infos["fp32"].items() if k not in ("key", "precision")} == \
        {k: v for k, v in infos["bf16"].items() if k not in ("key", "precision")}
    a, b = features["fp32"].vectors, features["bf16"].vectors
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (12, 192)
    assert features["fp32"].ids == features["bf16"].ids
    assert not torch.equal(a, b)  # bf16 really ran
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # ... and stays within bf16 rounding


def test_compute_features_over_splits_writes_the_key_and_ids(
    computed, tiny_backbone, tiny_splits, prepared_root: Path, tmp_path: Path
) -> None:
    _, pretrained = tiny_backbone
    folder = computed["fp32"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([frozen.FEATURES_FILE, frozen.FEATURES_INFO])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "staging folders left behind"
    info = frozen.read_features_info(folder)
    everything = tiny_splits.all_images()
    assert len(everything) == 12
    assert info["images"] == Subset("study", everything).digest and info["classes"] == ["pizza", "steak", "sushi"]
    assert info["dim"] == 192 and info["transform"] == pretrained_transform(32, 32, "bilinear").key()
    assert info["backbone"] == frozen.read_info(pretrained)
    with safe_open(str(folder / frozen.FEATURES_FILE), framework="pt") as f:
        assert f.metadata()["key"] == info["key"]
        assert json.loads(f.metadata()["ids"]) == [i.sha256 for i in everything]  # by sha256, one row per image

    # row k is image k through the backbone, as extract_features computes it
    model, _ = frozen.load_backbone(pretrained, 3)
    transform = pretrained_transform(32, 32, "bilinear")
    pixels = load_images(Subset("study", everything), prepared_root, transform).pixels
    expected = frozen.extract_features(model, pixels, transform, CPU)
    torch.testing.assert_close(frozen.load_features(folder).vectors, expected, atol=1e-6, rtol=0)

    # the key is the features' identity: the same inputs give the same key; other images another
    again = frozen.compute_features(pretrained, tiny_splits, prepared_root, tmp_path / "again", CPU)
    assert again == info
    fewer = Splits(tiny_splits.classes, Subset("test", tiny_splits.test.images[:3]), tiny_splits.train_sets,
                   tiny_splits.validation)
    other = frozen.compute_features(pretrained, fewer, prepared_root, tmp_path / "fewer", CPU)
    assert other["key"] != info["key"] and other["images"] != info["images"]
    assert frozen.load_features(tmp_path / "fewer").ids == tuple(i.sha256 for i in fewer.all_images())


def test_fp32_features_are_the_same_bits_whatever_the_kernels(tiny_backbone, tiny_splits, prepared_root: Path) -> None:
    """Another CPU kind sums in another order; switching oneDNN off, a thread count and a batch size are the proxies
    this machine has. float32 arithmetic changes bits under them; the stored features (float64, on a grid) do not."""
    _, pretrained = tiny_backbone
    model, _ = frozen.load_backbone(pretrained, 3)
    transform = pretrained_transform(32, 32, "bilinear")
    pixels = load_images(Subset("study", tiny_splits.all_images()), prepared_root, transform).pixels
    threads = torch.get_num_threads()
    try:
        reference = frozen.extract_features(model, pixels, transform, CPU)
        with torch.backends.mkldnn.flags(enabled=False):
            assert torch.equal(frozen.extract_features(model, pixels, transform, CPU, batch_size=5), reference)
        torch.set_num_threads(1)
        assert torch.equal(frozen.extract_features(model, pixels, transform, CPU, batch_size=3), reference)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.round(reference / frozen.FEATURE_GRID) * frozen.FEATURE_GRID, reference)  # on the grid
    with torch.inference_mode():
        float32 = model.float().forward_features(transform.to_input(pixels))
        with torch.backends.mkldnn.flags(enabled=False):
            assert not torch.equal(model.forward_features(transform.to_input(pixels)), float32)  # the proxy bites
    assert (float32 - reference).abs().max() < 4 * frozen.FEATURE_GRID  # the grid costs nothing beyond float32's noise


def test_features_select(computed, tiny_splits, splits) -> None:
    features = frozen.load_features(computed["fp32"])
    row = {sha: k for k, sha in enumerate(features.ids)}
    for name in ("test", "8", "8:val", "8:fit"):
        subset = tiny_splits.subset(name)
        vectors, labels = features.select(subset)
        assert torch.equal(vectors, features.vectors[[row[i.sha256] for i in subset.images]])  # the subset's order
        assert labels.dtype == torch.int64 and labels.tolist() == [i.label for i in subset.images]
    reversed_test = Subset("test", tiny_splits.test.images[::-1])
    assert torch.equal(features.select(reversed_test)[0], features.select(tiny_splits.test)[0].flip(0))
    assert len(features.select(tiny_splits.subset("8:fit"))[1]) == 5
    with pytest.raises(BackboneError, match=r"207 image\(s\) of 'test' have no features .* run `dvc repro features`"):
        features.select(splits.test)


def test_fetch_and_load_refuse_wrong_or_damaged_weights(tiny_backbone, tmp_path: Path) -> None:
    spec, pretrained = tiny_backbone
    with pytest.raises(BackboneError, match=r"nope\.safetensors not found; put the file there"):
        backbone.fetch(spec.model_copy(update={"path": str(tmp_path / "nope.safetensors")}), "tiny", tmp_path / "x")
    with pytest.raises(BackboneError, match=r"sha256 .*, expected 0+ \(backbones\.tiny\.sha256\)"):
        backbone.fetch(spec.model_copy(update={"sha256": "0" * 64}), "tiny", tmp_path / "x")
    with pytest.raises(BackboneError, match=r"does not fit a ViT-S/16"):
        backbone.fetch(spec.model_copy(update={"model": "S/16"}), "tiny", tmp_path / "x")
    assert not (tmp_path / "x").exists()

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in (frozen.WEIGHTS_FILE, frozen.INFO_FILE):
        (damaged / name).write_bytes((pretrained / name).read_bytes())
    with open(damaged / frozen.WEIGHTS_FILE, "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\0\0\0\0")
    with pytest.raises(BackboneError, match=r"does not match the sha256 in backbone\.json: run `dvc repro pretrained`"):
        frozen.load_backbone(damaged, 3)
    with pytest.raises(BackboneError, match=r"backbone\.json not found: run `dvc repro pretrained`"):
        frozen.load_backbone(tmp_path, 3)
    with pytest.raises(BackboneError, match=r"no features in .*: run `dvc repro features` first"):
        frozen.read_features_info(tmp_path)
