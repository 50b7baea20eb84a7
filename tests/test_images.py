"""Images in memory (src/vit_repro/images.py): transforms, decoding and its cache, loaders, augmentation.

On the real prepared datasets; small subsets and 32-px images keep it quick.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vit_repro.core import images
from vit_repro.core.config import AugmentConfig
from vit_repro.core.dataset import DataError
from vit_repro.core.images import IMAGENET_MEAN, IMAGENET_STD, Augment, ImageTransform, load_image, load_images, make_loader
from vit_repro.core.splits import Subset

SMALL = ImageTransform(resize=(32, 32))


@pytest.fixture(scope="module")
def tiny(splits) -> Subset:
    """12 test images from both archives and all three classes."""
    return Subset("tiny", splits.test.images[::18])


@pytest.fixture(scope="module")
def tiny_pixels(tiny: Subset, prepared_root: Path) -> torch.Tensor:
    return load_images(tiny, prepared_root, SMALL).pixels


# --- transforms ----------------------------------------------------------------------------------------


def test_transform_keys_and_validation() -> None:
    vit_b16 = images.pretrained_transform(256, 224, "bilinear")
    assert (vit_b16.mean, vit_b16.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert vit_b16.size == (224, 224) and ImageTransform(resize=[32, 48]).size == (32, 48)
    assert ImageTransform(resize=[224, 224]) == ImageTransform(resize=(224, 224))
    # the key names everything that changes the pixels; the cached pixels do not depend on the normalisation
    keys = {t.key() for t in (SMALL, ImageTransform((32, 32), interpolation="bicubic"), ImageTransform((32, 48)),
                              ImageTransform(40, crop=32), vit_b16, images.pretrained_transform(256, 224, "bicubic"),
                              ImageTransform(256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3))}
    assert len(keys) == 7
    assert vit_b16.pixels_key() == ImageTransform(256, crop=224).key() != vit_b16.key()
    for kwargs in (
        {"resize": 256},  # aspect-preserving resize without a crop: sizes would differ
        {"resize": 224, "crop": 256},
        {"resize": (224, 224), "interpolation": "lanczos"},
        {"resize": (224, 224), "mean": (0.5, 0.5, 0.5)},
        {"resize": (224, 224), "mean": (0.5, 0.5), "std": (0.5, 0.5)},
        {"resize": (224, 224), "mean": (0.5,) * 3, "std": (0.5, 0.0, 0.5)},
        {"resize": (0, 224)},
    ):
        with pytest.raises(ValueError):
            ImageTransform(**kwargs)


def test_to_input() -> None:
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2).expand(3, 1, 2).contiguous()
    before = x.clone()
    assert SMALL.to_input(x).tolist() == [[[0.0, 1.0]]] * 3
    assert SMALL.to_input(x).dtype == torch.float32
    vit_b16 = images.pretrained_transform(256, 224, "bilinear")
    black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    out = vit_b16.to_input(x)
    torch.testing.assert_close(out[:, 0, 0], black)
    torch.testing.assert_close(out[:, 0, 1], white)
    batch = x.expand(4, 3, 1, 2)  # a batch: normalised per channel the same way
    torch.testing.assert_close(vit_b16.to_input(batch), out.expand(4, 3, 1, 2))
    assert torch.equal(x, before), "to_input must not change the stored pixels"
    with pytest.raises(TypeError, match="to_input expects uint8 images"):
        vit_b16.to_input(x.float())


def test_transforms_match_the_seed_and_torchvision_weights(prepared_dir: Path) -> None:
    """Scratch: the seed notebook's Resize((224, 224)) + ToTensor; pretrained: torchvision's ViT-B/16 transforms()."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.models import ViT_B_16_Weights

    files = sorted(prepared_dir.glob("test/*/*.jpg"))[::25]
    seed = T.Compose([T.Resize((224, 224)), T.ToTensor()])
    weights = ViT_B_16_Weights.IMAGENET1K_V1.transforms()
    scratch = ImageTransform(resize=(224, 224))
    vit_b16 = images.pretrained_transform(256, 224, "bilinear")
    for path in files:
        with Image.open(path) as im:
            assert torch.equal(scratch.to_input(load_image(path, scratch)), seed(im))
            torch.testing.assert_close(vit_b16.to_input(load_image(path, vit_b16)), weights(im), atol=1e-6, rtol=0)


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.jpg: image not found"):
        load_image(tmp_path / "missing.jpg", SMALL)
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.jpg: cannot be decoded as an image .* pass a JPEG or PNG"):
        load_image(tmp_path / "notes.jpg", SMALL)


# --- load_images and its cache ------------------------------------------------------------------------------


def test_load_images_order_and_labels(tiny: Subset, tiny_pixels: torch.Tensor, prepared_root: Path) -> None:
    loaded = load_images(tiny, prepared_root, SMALL)
    assert loaded.pixels.shape == (12, 3, 32, 32) and loaded.pixels.dtype == torch.uint8
    assert loaded.labels.dtype == torch.int64 and loaded.labels.tolist() == [i.label for i in tiny.images]
    assert set(loaded.labels.tolist()) == {0, 1, 2}
    assert {i.dataset for i in tiny.images} == {"pizza_steak_sushi", "pizza_steak_sushi_20_percent"}
    assert loaded.ids == tiny.ids and len(loaded) == 12
    for k, image in enumerate(tiny.images):  # row k is image k of the subset, decoded as load_image does
        assert torch.equal(loaded.pixels[k], load_image(prepared_root / image.dataset / image.file, SMALL))
    # another order of the same images: the rows follow
    backwards = load_images(Subset("backwards", tiny.images[::-1]), prepared_root, SMALL)
    assert torch.equal(backwards.pixels, tiny_pixels.flip(0))
    assert backwards.labels.tolist() == loaded.labels.flip(0).tolist()


def test_load_images_needs_every_file(tiny: Subset, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"image not found; run `dvc repro prepare` \(or `dvc checkout`\)"):
        load_images(tiny, tmp_path, SMALL)


def test_cache_hit_and_corrupt_cache_rebuilt(
    tiny: Subset, tiny_pixels: torch.Tensor, prepared_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fresh = load_images(tiny, prepared_root, SMALL, tmp_path)
    assert torch.equal(fresh.pixels, tiny_pixels)
    (cache,) = tmp_path.glob("*.safetensors")
    assert cache.name == f"{tiny.digest.removeprefix('sha256:')[:16]}-r32x32-bilinear.safetensors"

    decode = images._decode_all
    monkeypatch.setattr(images, "_decode_all", lambda *a: pytest.fail("decoded again despite a valid cache"))
    hit = load_images(tiny, prepared_root, SMALL, tmp_path)
    assert torch.equal(hit.pixels, fresh.pixels) and torch.equal(hit.labels, fresh.labels) and hit.ids == fresh.ids
    # the pixels are cached before normalisation: a transform that only normalises differently shares them
    normalised = ImageTransform((32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    assert torch.equal(load_images(tiny, prepared_root, normalised, tmp_path).pixels, fresh.pixels)
    monkeypatch.setattr(images, "_decode_all", decode)

    good = cache.read_bytes()
    flipped = bytearray(good)
    flipped[-10] ^= 1  # one pixel's bit: the file still parses, its checksum does not match
    for damage in (good[: len(good) // 2], bytes(flipped), b"not a safetensors file"):
        cache.write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vit_repro.core.images"):
            rebuilt = load_images(tiny, prepared_root, SMALL, tmp_path)
        assert f"rebuilding decoded-image cache {cache}" in caplog.text
        assert torch.equal(rebuilt.pixels, fresh.pixels)
    monkeypatch.setattr(images, "_decode_all", lambda *a: pytest.fail("the rebuilt cache was not used"))
    assert torch.equal(load_images(tiny, prepared_root, SMALL, tmp_path).pixels, fresh.pixels)
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]


def test_cache_of_another_version_is_rebuilt(
    tiny: Subset, prepared_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    load_images(tiny, prepared_root, SMALL, tmp_path)
    import PIL

    monkeypatch.setattr(PIL, "__version__", "0.0.1")  # another Pillow may resize differently
    with caplog.at_level(logging.WARNING, logger="vit_repro.core.images"):
        load_images(tiny, prepared_root, SMALL, tmp_path)
    assert "its pillow differs" in caplog.text


# --- loaders ---------------------------------------------------------------------------------------------


def _orders(loader: torch.utils.data.DataLoader, epochs: int = 2) -> list[list[int]]:
    return [torch.cat([labels for _, labels in loader]).tolist() for _ in range(epochs)]


def test_make_loader_is_deterministic_given_the_seed() -> None:
    n = 50
    ids = torch.arange(n)
    pixels = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    features = torch.randn(n, 8)
    rng = torch.get_rng_state()
    a = _orders(make_loader(pixels, ids, 16, shuffle=True, seed=0))
    assert torch.equal(torch.get_rng_state(), rng), "the loader must not consume the global RNG"
    assert a == _orders(make_loader(pixels, ids, 16, shuffle=True, seed=0))
    assert a == _orders(make_loader(features, ids, 16, shuffle=True, seed=0)), "images and features: same order"
    assert a != _orders(make_loader(pixels, ids, 16, shuffle=True, seed=1))
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1]) == list(range(n))
    assert _orders(make_loader(pixels, ids, 16, shuffle=False, seed=0), 1) == [list(range(n))]

    loader = make_loader(features, ids, 16, shuffle=True, seed=0)
    batches = list(loader)
    assert len(loader) == 4 and [len(y) for _, y in batches] == [16, 16, 16, 2]
    x, y = batches[0]
    assert torch.equal(x, features[y])


def test_make_loader_drop_last() -> None:
    n = 50
    ids = torch.arange(n)
    kept = _orders(make_loader(ids.float(), ids, 16, shuffle=True, seed=0), 3)
    dropping = make_loader(ids.float(), ids, 16, shuffle=True, seed=0, drop_last=True)
    assert len(dropping) == 3
    epochs = [[len(y) for _, y in dropping] for _ in range(3)]
    assert epochs == [[16, 16, 16]] * 3
    dropped = _orders(make_loader(ids.float(), ids, 16, shuffle=True, seed=0, drop_last=True), 3)
    # the same permutations, the last 2 images of each left out; a different 2 each epoch
    assert dropped == [order[:48] for order in kept]
    left_out = [set(range(n)) - set(order) for order in dropped]
    assert all(len(s) == 2 for s in left_out) and len({frozenset(s) for s in left_out}) == 3
    assert len(make_loader(ids.float(), ids, 25, shuffle=False, seed=0, drop_last=True)) == 2  # no remainder

    with pytest.raises(ValueError, match="50 images but 49 labels"):
        make_loader(ids.float(), ids[:49], 16, shuffle=True, seed=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_loader(ids.float(), ids, 0, shuffle=True, seed=0)


# --- augmentation --------------------------------------------------------------------------------------------

AUGMENT = AugmentConfig(crop_scale=(0.3, 1.0), flip=True, trivial_augment=True)


def _batches(augment: Augment, pixels: torch.Tensor, n: int = 3) -> list[torch.Tensor]:
    return [augment(pixels) for _ in range(n)]


def test_augment_is_seeded_and_leaves_the_global_stream_alone(tiny_pixels: torch.Tensor) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(5)  # what the global stream gives next, without augmentation in between
    torch.manual_seed(123)
    a = _batches(Augment(AUGMENT, (32, 32), seed=0), tiny_pixels)
    assert torch.equal(torch.rand(5), expected_next), "augmentation drew from the global RNG (dropout's stream)"

    b = _batches(Augment(AUGMENT, (32, 32), seed=0), tiny_pixels)
    c = _batches(Augment(AUGMENT, (32, 32), seed=1), tiny_pixels)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "same seed, same batches"
    assert not any(torch.equal(x, y) for x, y in zip(a, c)), "another seed, other batches"
    assert not torch.equal(a[0], a[1]), "each call draws anew"
    assert not torch.equal(a[0], tiny_pixels)
    for batch in a:
        assert batch.dtype == torch.uint8 and batch.shape == tiny_pixels.shape

    # the generator's state is all there is to it (a checkpoint saves it): restoring it repeats the draws
    augment = Augment(AUGMENT, (32, 32), seed=0)
    augment(tiny_pixels)
    state = augment.generator.get_state()
    first = augment(tiny_pixels)
    augment.generator.set_state(state)
    assert torch.equal(augment(tiny_pixels), first)


def test_augment_output_size_and_ops(tiny_pixels: torch.Tensor) -> None:
    crops = Augment(AugmentConfig(crop_scale=(0.5, 1.0)), (24, 24), seed=0)(tiny_pixels)
    assert crops.shape == (12, 3, 24, 24) and crops.dtype == torch.uint8
    flips = Augment(AugmentConfig(flip=True), (32, 32), seed=0)(tiny_pixels)
    flipped = [torch.equal(f, p.flip(-1)) for f, p in zip(flips, tiny_pixels)]
    assert all(f or torch.equal(o, p) for f, o, p in zip(flipped, flips, tiny_pixels)), "a flip changes nothing else"
    assert 0 < sum(flipped) < 12, "per image, not per batch"
