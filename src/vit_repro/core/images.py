"""Images in memory: decode once (cached), turn uint8 pixels into model inputs, augment, batch.

``load_images`` decodes and resizes a ``Subset`` once per (subset digest, transform) and caches the
uint8 tensors as safetensors; ``ImageTransform.to_input`` turns them into the model's float input;
``Augment`` applies per-image random crops and flips (torchvision.transforms.v2) with its own seeded
generator; ``make_loader`` yields seeded, reproducible batches from memory.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .config import AugmentConfig
from .dataset import DataError
from .splits import Subset

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class ImageTransform:
    """Resize (and centre-crop) with PIL, antialiased, as torchvision does for PIL images; normalise later.

    ``resize``: an int resizes the shorter side (keeping the aspect ratio; needs ``crop``), an
    ``(h, w)`` pair squashes to exactly that size. ``mean``/``std`` None means pixels in [0, 1].
    """

    resize: int | tuple[int, int]
    crop: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.resize, (list, tuple)):
            object.__setattr__(self, "resize", tuple(int(v) for v in self.resize))
        sizes = self.resize if isinstance(self.resize, tuple) else (self.resize,)
        if len(sizes) not in (1, 2) or min(sizes) < 1:
            raise ValueError(f"resize must be a positive int or (h, w), got {self.resize!r}")
        if isinstance(self.resize, int) and self.crop is None:
            raise ValueError("an int resize keeps the aspect ratio, so image sizes differ: set crop")
        if self.crop is not None and not 1 <= self.crop <= min(sizes):
            raise ValueError(f"crop {self.crop} must be between 1 and the resized size {self.resize}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("set both mean and std, or neither")
        if self.mean is not None:
            object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
            object.__setattr__(self, "std", tuple(float(v) for v in self.std))
            if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
                raise ValueError("mean and std need 3 values each, std > 0")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the transformed images."""
        if self.crop is not None:
            return (self.crop, self.crop)
        assert isinstance(self.resize, tuple)
        return self.resize

    def key(self) -> str:
        """A stable short id, e.g. ``r224x224-bilinear`` or ``r256-c224-bilinear-imagenet``."""
        parts = [f"r{self.resize[0]}x{self.resize[1]}" if isinstance(self.resize, tuple) else f"r{self.resize}"]
        if self.crop is not None:
            parts.append(f"c{self.crop}")
        parts.append(self.interpolation)
        if self.mean is not None:
            if (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD):
                parts.append("imagenet")
            else:
                parts.append("n" + hashlib.sha256(repr((self.mean, self.std)).encode()).hexdigest()[:8])
        return "-".join(parts)

    def pixels_key(self) -> str:
        """The part of ``key`` that decides the cached uint8 pixels (normalisation is applied later)."""
        return ImageTransform(self.resize, self.crop, self.interpolation).key()

    def apply(self, image: Any) -> torch.Tensor:
        """A PIL image -> uint8 tensor [3, H, W]."""
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        mode = InterpolationMode(self.interpolation)
        image = image.convert("RGB")
        size = list(self.resize) if isinstance(self.resize, tuple) else [self.resize]
        image = F.resize(image, size, interpolation=mode, antialias=True)
        if self.crop is not None:
            image = F.center_crop(image, [self.crop, self.crop])
        return F.pil_to_tensor(image)

    def to_input(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> float32 in [0, 1], then (x - mean) / std if set."""
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f"to_input expects uint8 images, got {images_uint8.dtype}")
        x = images_uint8.to(torch.float32).div_(255)
        if self.mean is None:
            return x
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return x.sub_(mean).div_(std)



def pretrained_transform(resize: int, crop: int, interpolation: str) -> ImageTransform:
    """A pretrained backbone's eval transform: resize the shorter side, centre-crop, ImageNet mean/std."""
    return ImageTransform(resize=resize, crop=crop, interpolation=interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@dataclass(frozen=True, eq=False)
class Images:
    """A subset in memory: pixels uint8 [N, 3, H, W], labels int64 [N], image sha256s in the same order."""

    pixels: torch.Tensor
    labels: torch.Tensor
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)


_CACHE_FORMAT = "vit-repro-images/1"


def _cache_metadata(subset: Subset, transform: ImageTransform) -> dict[str, str]:
    import PIL
    import torchvision

    return {
        "format": _CACHE_FORMAT,
        "subset": subset.digest,
        "transform": transform.pixels_key(),
        "pillow": PIL.__version__,
        "torchvision": torchvision.__version__,
    }


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy()).hexdigest()


def _read_cache(
    path: Path, expected: dict[str, str], n: int, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached tensors if the file is intact and matches ``expected``; None (with a warning) otherwise."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
        problem = next((k for k, v in expected.items() if meta.get(k) != v), None)
        if problem is not None:
            reason = f"its {problem} differs"
        elif images.dtype != torch.uint8 or tuple(images.shape) != (n, 3, *size):
            reason = f"images have shape {tuple(images.shape)} {images.dtype}"
        elif labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
            reason = f"labels have shape {tuple(labels.shape)} {labels.dtype}"
        elif _tensor_sha256(images) != meta.get("images_sha256"):
            reason = "image bytes do not match their checksum"
        else:
            return images, labels
    except Exception as exc:  # safetensors raises its own error types for damaged files
        reason = f"unreadable ({exc})"
    log.warning("rebuilding decoded-image cache %s: %s", path, reason)
    return None


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        metadata = {**metadata, "images_sha256": _tensor_sha256(images)}
        save_file({"images": images, "labels": labels}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_image(path: Path, transform: ImageTransform) -> torch.Tensor:
    """One image file -> uint8 [3, H, W], exactly as ``load_images`` decodes the dataset."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return transform.apply(im)
    except FileNotFoundError:
        raise DataError(f"{path}: image not found; check the path") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot be decoded as an image ({exc}); pass a JPEG or PNG photo") from None


def _decode_all(paths: list[Path], transform: ImageTransform) -> torch.Tensor:
    from PIL import Image

    images = torch.empty((len(paths), 3, *transform.size), dtype=torch.uint8)

    def decode(i: int) -> None:
        with Image.open(paths[i]) as im:
            images[i] = transform.apply(im)

    # PIL releases the GIL while decoding and resizing; every image has its own slot, so order is fixed
    workers = min(4, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(decode, range(len(paths))))
    return images


def load_images(subset: Subset, prepared_root: Path, transform: ImageTransform, cache_dir: Path | None = None) -> Images:
    """Decode and resize ``subset`` once; with ``cache_dir``, reuse the cached tensors.

    ``prepared_root`` holds the prepared datasets (``<root>/<dataset>/<split>/<class>/<id>.jpg``). The cache
    file is keyed by the subset's digest and the transform and records a checksum; one that does not match is
    rebuilt (with a warning), never trusted silently.
    """
    paths = [Path(prepared_root) / i.dataset / i.file for i in subset.images]
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise DataError(f"{missing}: image not found; run `dvc repro prepare` (or `dvc checkout`) to restore "
                        "the prepared datasets")
    labels = torch.tensor([i.label for i in subset.images], dtype=torch.int64)
    if cache_dir is None:
        return Images(_decode_all(paths, transform), labels, subset.ids)
    path = Path(cache_dir) / f"{subset.digest.removeprefix('sha256:')[:16]}-{transform.pixels_key()}.safetensors"
    metadata = _cache_metadata(subset, transform)
    cached = _read_cache(path, metadata, len(paths), transform.size)
    if cached is not None and torch.equal(cached[1], labels):
        return Images(cached[0], labels, subset.ids)
    pixels = _decode_all(paths, transform)
    _write_cache(path, pixels, labels, metadata)
    return Images(pixels, labels, subset.ids)


# --- augmentation ----------------------------------------------------------------------------------


class Augment:
    """Random crop, flip and TrivialAugment per image (torchvision.transforms.v2) on uint8 batches.

    Its random draws come from its own generator (saved and restored with a checkpoint), never from the
    global stream that dropout uses, so turning augmentation on does not change the dropout masks.
    """

    def __init__(self, cfg: AugmentConfig, size: tuple[int, int], seed: int) -> None:
        from torchvision.transforms import v2

        ops: list[Any] = []
        if cfg.crop_scale is not None:
            ops.append(v2.RandomResizedCrop(size, scale=cfg.crop_scale, antialias=True))
        if cfg.flip:
            ops.append(v2.RandomHorizontalFlip())
        if cfg.trivial_augment:
            ops.append(v2.TrivialAugmentWide())
        self.transform = v2.Compose(ops) if ops else v2.Identity()
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([self.transform(image) for image in batch])


# --- loaders -----------------------------------------------------------------------------------------


class _Batches(Dataset):
    """Index tensors by a whole batch of indices at once (one gather per batch, no per-item collate)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return tuple(t[idx] for t in self.tensors)


def make_loader(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int, pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """Batches ``(images, labels)`` from memory; the shuffle order depends on ``seed`` alone.

    Each pass draws the next permutation from the loader's own generator, so epoch k's order is the
    same for every run with this seed, whatever the tensors hold (images or feature vectors), and the
    global torch RNG is never touched. The last batch may be smaller (``drop_last``: it is dropped, so each
    epoch skips a different few images).
    ``pin_memory``: batches come in page-locked memory, so ``.to("cuda", non_blocking=True)`` is asynchronous.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    data = _Batches(images, labels)
    order = RandomSampler(data, generator=generator) if shuffle else SequentialSampler(data)
    return DataLoader(
        data,
        sampler=BatchSampler(order, batch_size, drop_last=drop_last),
        batch_size=None,
        num_workers=0,
        generator=generator,
        pin_memory=pin_memory,
    )
