"""The pizza/steak/sushi data: verify and prepare an archive, decode images once, load batches.

``prepare`` turns a fetched archive into ``<out_dir>/{train,test}/<class>/<id>.jpg`` plus
``summary.json``. The dataset's identity is its images, not the archive: every image must match the
committed manifest (``data/manifests/<dataset>.sha256``, one ``<sha256>  <split>/<class>/<id>.jpg``
line per image), so two different zip containers of the same images prepare to byte-identical output.

Archive rules: entries must be ``<split>/<class>/<id>.jpg`` regular files (directory entries are
ignored). Absolute paths, ``..``, backslashes, links and other special entries, non-JPEG files, files
not in the manifest and unknown folders are rejected. Operating-system metadata that zip tools on
macOS/Windows add (``__MACOSX/``, ``._*`` AppleDouble files, ``.DS_Store``, ``Thumbs.db``) is skipped,
after the same path and link checks: it carries no image data and is never extracted.

``load_split`` decodes and resizes a split once per (dataset digest, split, transform) and caches the
uint8 tensors as safetensors; ``make_loader`` yields seeded, reproducible batches from memory.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .fsutil import replace_dir

log = logging.getLogger(__name__)

CLASSES = ("pizza", "steak", "sushi")
SPLITS = ("train", "test")
MANIFEST_DIR = Path("data/manifests")
SUMMARY_FILE = "summary.json"
REMOTE = "course-data"  # the DVC remote both import files read from (see data.dvc)
MAX_IMAGE_BYTES = 16 * 2**20  # far above any Food-101 image; guards against zip bombs
OS_JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
OS_JUNK_DIRS = frozenset({"__MACOSX"})
_IMAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.jpg")


@dataclass(frozen=True)
class DatasetSpec:
    """A published dataset: its archive's file name, the DVC file that fetches it, and its counts."""

    name: str
    archive: str
    counts: dict[str, dict[str, int]]
    dvc_file: str = ""

    def total(self, split: str | None = None) -> int:
        splits = SPLITS if split is None else (split,)
        return sum(sum(self.counts[s].values()) for s in splits)


DATASETS: dict[str, DatasetSpec] = {
    "pizza_steak_sushi": DatasetSpec(
        name="pizza_steak_sushi",
        archive="pizza_steak_sushi.zip",
        counts={"train": {"pizza": 78, "steak": 75, "sushi": 72}, "test": {"pizza": 25, "steak": 19, "sushi": 31}},
        dvc_file="data.dvc",
    ),
    "pizza_steak_sushi_20_percent": DatasetSpec(
        name="pizza_steak_sushi_20_percent",
        archive="pizza_steak_sushi_20_percent.zip",
        counts={"train": {"pizza": 154, "steak": 146, "sushi": 150}, "test": {"pizza": 46, "steak": 58, "sushi": 46}},
        dvc_file="data/pizza_steak_sushi_20_percent.zip.dvc",
    ),
}


class DataError(Exception):
    """The data is missing, damaged or not the published dataset; the message names the file and the fix."""


def dataset_spec(dataset: str) -> DatasetSpec:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DataError(f"unknown dataset {dataset!r}; known datasets: {sorted(DATASETS)}") from None


def _default_root() -> Path:
    """The working directory if it holds the manifests (DVC runs stages at the repo root), else this checkout."""
    cwd = Path.cwd()
    if (cwd / MANIFEST_DIR).is_dir():
        return cwd
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / MANIFEST_DIR).is_dir() else cwd


def manifest_path(dataset: str, root: Path | None = None) -> Path:
    """``<root>/data/manifests/<dataset>.sha256``; ``root`` defaults to the cwd, else this source checkout."""
    dataset_spec(dataset)
    return (root if root is not None else _default_root()) / MANIFEST_DIR / f"{dataset}.sha256"


# --- manifest ---------------------------------------------------------------------------------------


def _refetch_hint(spec: DatasetSpec) -> str:
    return (
        f"re-fetch it with `dvc update {spec.dvc_file}` (or `dvc repro`), and check that the DVC remote "
        f"'{REMOTE}' points at the published {spec.archive} (offline machines: "
        f"`dvc remote modify --local {REMOTE} url ../shared/datasets`)"
    )


def _layout_problem(path: str) -> str | None:
    """Why ``path`` is not ``<split>/<class>/<id>.jpg``, or None if it is."""
    parts = path.split("/")
    if len(parts) != 3:
        return "is not at <split>/<class>/<id>.jpg"
    split, cls, name = parts
    if split not in SPLITS:
        return f"is in an unknown split folder {split!r} (expected one of {list(SPLITS)})"
    if cls not in CLASSES:
        return f"is in an unknown class folder {split}/{cls}/ (expected one of {list(CLASSES)})"
    if not _IMAGE_NAME.fullmatch(name):
        return "does not have an image file name (<id>.jpg)"
    return None


def manifest_digest(entries: dict[str, str]) -> str:
    """``sha256:`` of the canonical manifest text: ``<sha256>  <path>\\n`` lines sorted by path."""
    text = "".join(f"{entries[p]}  {p}\n" for p in sorted(entries))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def read_manifest(path: Path, dataset: str) -> dict[str, str]:
    """Parse and check a manifest: ``{relative path: sha256}`` matching the dataset's class counts."""
    spec = dataset_spec(dataset)
    fix = f"restore it from git (`git checkout -- {path}`); it is the dataset's identity"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found; {fix}") from None
    entries: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](\S.*)", line.strip())
        if not m:
            raise DataError(f"{path}:{lineno}: not a '<sha256>  <path>' line; {fix}")
        sha, rel = m.groups()
        if (problem := _layout_problem(rel)) is not None:
            raise DataError(f"{path}:{lineno}: {rel} {problem}; {fix}")
        if rel in entries:
            raise DataError(f"{path}:{lineno}: {rel} is listed twice; {fix}")
        entries[rel] = sha
    _check_disjoint_splits(entries, where=str(path), fix=fix)
    counts = _count(entries)
    if counts != spec.counts:
        raise DataError(f"{path}: class counts {counts} differ from {dataset}'s published counts {spec.counts}; {fix}")
    return entries


def _count(paths: dict[str, Any] | set[str]) -> dict[str, dict[str, int]]:
    counts = {s: {c: 0 for c in CLASSES} for s in SPLITS}
    for rel in paths:
        split, cls, _ = rel.split("/")
        counts[split][cls] += 1
    return counts


def _check_disjoint_splits(entries: dict[str, str], where: str, fix: str) -> None:
    """No image (by file name or by content) may be in both train and test."""
    seen: dict[tuple[str, str], str] = {}  # ("name"|"sha", value) -> first path
    for rel in sorted(entries):
        split = rel.split("/")[0]
        for key in (("name", rel.rsplit("/", 1)[1]), ("sha", entries[rel])):
            other = seen.setdefault(key, rel)
            if other.split("/")[0] != split:
                same = "file name" if key[0] == "name" else "image (same sha256)"
                raise DataError(f"{where}: {rel} and {other}: the same {same} is in both train and test; {fix}")


# --- prepare --------------------------------------------------------------------------------------


def _entry_kind(info: zipfile.ZipInfo) -> str:
    """'dir', 'file' or 'special' (link, device, fifo...) from the entry's name and unix mode bits."""
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        return "special"
    if info.filename.endswith("/"):
        return "dir"
    return "special" if kind == stat.S_IFDIR else "file"


def _unsafe_path(name: str) -> bool:
    p = PurePosixPath(name)
    return (
        not name
        or "\\" in name
        or "\0" in name
        or p.is_absolute()
        or ".." in p.parts
        or (bool(p.parts) and ":" in p.parts[0])  # a Windows drive, e.g. C:
    )


def _is_os_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return parts[0] in OS_JUNK_DIRS or parts[-1] in OS_JUNK_NAMES or parts[-1].startswith("._")


def _scan_archive(
    zf: zipfile.ZipFile, archive: Path, spec: DatasetSpec, manifest: dict[str, str]
) -> dict[str, zipfile.ZipInfo]:
    """Check every entry from the zip's directory alone, before anything is extracted."""
    hint = _refetch_hint(spec)

    def fail(what: str) -> DataError:
        return DataError(f"{archive}: {what}; {hint}")

    not_dataset = f"the archive is not the published {spec.name}"
    images: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        name = info.filename
        entry = f"entry {name!r}"
        if _unsafe_path(name):
            raise fail(f"{entry}: unsafe path (absolute, '..' or a drive: it would land outside the target); {not_dataset}")
        kind = _entry_kind(info)
        if kind == "special":
            raise fail(f"{entry}: is a symbolic link or special file, not a regular image file; {not_dataset}")
        if _is_os_junk(name):
            log.info("skipping operating-system metadata %s in %s", name, archive)
            continue
        if kind == "dir":
            folder = name.rstrip("/").split("/")
            if len(folder) > 2 or folder[0] not in SPLITS or (len(folder) == 2 and folder[1] not in CLASSES):
                raise fail(f"{entry}: unexpected folder (expected train|test/<{'|'.join(CLASSES)}>/); {not_dataset}")
            continue
        if not name.lower().endswith(".jpg"):
            raise fail(f"{entry}: not an image file (only <split>/<class>/<id>.jpg files are allowed); {not_dataset}")
        if (problem := _layout_problem(name)) is not None:
            raise fail(f"{entry}: {problem}; {not_dataset}")
        if name in images:
            raise fail(f"{entry}: appears twice in the archive")
        if info.file_size > MAX_IMAGE_BYTES:
            raise fail(f"{entry}: {info.file_size} bytes is too large for an image")
        images[name] = info

    present = {tuple(rel.split("/")[:2]) for rel in images}
    for split in SPLITS:
        for cls in CLASSES:
            if (split, cls) not in present:
                raise fail(f"class folder {split}/{cls}/ is missing ({spec.counts[split][cls]} images expected)")
    by_name: dict[str, str] = {}
    for rel in sorted(images):
        other = by_name.setdefault(rel.rsplit("/", 1)[1], rel)
        if other.split("/")[0] != rel.split("/")[0]:
            raise fail(f"{rel} and {other}: the same image is in both train and test")
    extra = sorted(set(images) - set(manifest))
    if extra:
        raise fail(f"{extra[0]} is not in the manifest ({len(extra)} unexpected image(s))")
    missing = sorted(set(manifest) - set(images))
    if missing:
        raise fail(f"{missing[0]} is missing ({len(missing)} image(s) of the manifest are not in the archive)")
    return images


def _check_jpeg(path: Path) -> str | None:
    """Why the file is not a decodable RGB-convertible JPEG, or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "JPEG":
                return f"is a {im.format} file, not a JPEG"
            im.verify()
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # decode every block at 1/8 scale: catches truncated data cheaply
            im.load()
    except Exception as exc:  # PIL raises several types for bad data
        return f"cannot be decoded as a JPEG ({exc})"
    return None


def _extract(
    zf: zipfile.ZipFile,
    archive: Path,
    images: dict[str, zipfile.ZipInfo],
    manifest: dict[str, str],
    spec: DatasetSpec,
    target: Path,
) -> None:
    """Write each image under ``target``, checking its sha256 against the manifest and that it decodes."""
    hint = _refetch_hint(spec)

    def fail(what: str) -> DataError:
        return DataError(f"{archive}: {what}; {hint}")

    for rel in sorted(images):
        dest = target.joinpath(*rel.split("/"))
        if not dest.resolve().is_relative_to(target.resolve()):  # defence in depth; names are validated
            raise fail(f"entry {rel!r}: unsafe path")
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        try:
            with zf.open(images[rel]) as src, open(dest, "xb") as out:
                while block := src.read(1 << 20):
                    size += len(block)
                    if size > MAX_IMAGE_BYTES:
                        raise fail(f"entry {rel!r} is larger than its header says; the archive is damaged")
                    digest.update(block)
                    out.write(block)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            raise fail(f"entry {rel!r} cannot be read ({exc}); the archive is damaged or truncated") from None
        if digest.hexdigest() != manifest[rel]:
            raise fail(
                f"{rel} has sha256 {digest.hexdigest()} but the manifest expects {manifest[rel]}: "
                "the archive holds a different or tampered image"
            )
        if (problem := _check_jpeg(dest)) is not None:
            raise fail(f"{rel} {problem}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def prepare(archive: Path, dataset: str, out_dir: Path, manifest: Path | None = None) -> dict:
    """Verify ``archive`` against the manifest and write the prepared dataset to ``out_dir``.

    Everything is extracted into a temporary sibling of ``out_dir`` and moved into place only once every
    check has passed. On any error a ``DataError`` names the file and the fix, and ``out_dir`` does not
    exist afterwards (a stale one from an earlier run is removed, not left half-replaced).
    Returns the summary, also written to ``out_dir/summary.json``.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    if out_dir.resolve() in (Path.cwd(), *Path.cwd().parents):  # it is replaced or removed below
        raise DataError(f"{out_dir}: refusing to use the working folder or one above it as out_dir; pass a subfolder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        spec = dataset_spec(dataset)
        entries = read_manifest(Path(manifest) if manifest is not None else manifest_path(dataset), dataset)
        for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the prepared dataset is not
        try:
            zf = zipfile.ZipFile(archive)
        except FileNotFoundError:
            raise DataError(f"{archive}: archive not found; fetch it with `dvc repro` ({spec.dvc_file})") from None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            hint = _refetch_hint(spec)
            raise DataError(f"{archive}: not a readable zip archive ({exc}); it is damaged or truncated: {hint}") from None
        with zf:
            images = _scan_archive(zf, archive, spec, entries)
            _extract(zf, archive, images, entries, spec, tmp)
        summary = _summary(spec, entries)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove(out_dir)
        raise
    return summary


def _summary(spec: DatasetSpec, entries: dict[str, str]) -> dict:
    counts = {s: {**c, "total": sum(c.values())} for s, c in _count(entries).items()}
    return {
        "dataset": spec.name,
        "classes": list(CLASSES),
        "counts": counts,
        "digest": manifest_digest(entries),
        "images": len(entries),
    }


def data_source(dataset: str, root: Path) -> dict[str, str]:
    """Where the archive was fetched from: the DVC import and the URL its remote resolves to on this machine."""
    spec = dataset_spec(dataset)
    dvc_file = Path(root) / spec.dvc_file
    try:
        dep = yaml.safe_load(dvc_file.read_text())["deps"][0]["path"]
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return {"dvc_file": spec.dvc_file, "import": "unknown", "url": "unknown"}
    url = dep
    if dep.startswith("remote://"):
        from dvc.config import Config

        remote, _, rest = dep.removeprefix("remote://").partition("/")
        try:
            base = Config(str(Path(root) / ".dvc"))
            url = f"{str(base['remote'][remote]['url']).rstrip('/')}/{rest}"
        except Exception:  # no DVC config: report the import as recorded
            url = dep
    return {"dvc_file": spec.dvc_file, "import": dep, "url": url}


def read_summary(prepared_dir: Path) -> dict:
    """The ``summary.json`` that ``prepare`` wrote: dataset, classes, counts, digest, images."""
    path = Path(prepared_dir) / SUMMARY_FILE
    fix = "run `dvc repro prepare` to (re)create the prepared dataset"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); {fix}") from None
    missing = {"dataset", "classes", "counts", "digest", "images"} - set(summary if isinstance(summary, dict) else ())
    if missing:
        raise DataError(f"{path}: missing keys {sorted(missing)}; {fix}")
    return summary


# --- transforms and decoded-tensor cache -------------------------------------------------------------

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

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> float32 in [0, 1], then (x - mean) / std if set."""
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 images, got {images_uint8.dtype}")
        x = images_uint8.to(torch.float32).div_(255)
        if self.mean is None:
            return x
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return x.sub_(mean).div_(std)


SCRATCH_TRANSFORM = ImageTransform(resize=(224, 224))


def pretrained_transform(resize: int, crop: int, interpolation: str) -> ImageTransform:
    """A pretrained backbone's eval transform: resize the shorter side, centre-crop, ImageNet mean/std."""
    return ImageTransform(resize=resize, crop=crop, interpolation=interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@dataclass(frozen=True, eq=False)
class Split:
    """One split in memory: images uint8 [N, 3, H, W], labels int64 [N], files in the same order."""

    images: torch.Tensor
    labels: torch.Tensor
    files: tuple[str, ...]
    classes: tuple[str, ...] = field(default=CLASSES)

    def __len__(self) -> int:
        return len(self.files)


_CACHE_FORMAT = "vit-repro-split/1"


def _split_files(prepared_dir: Path, split: str, summary: dict) -> list[str]:
    fix = "run `dvc repro prepare` (or `dvc checkout`) to restore the prepared dataset"
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = []
    for cls in summary["classes"]:
        found = sorted(f"{split}/{cls}/{p.name}" for p in (prepared_dir / split / cls).glob("*.jpg"))
        expected = summary["counts"][split][cls]
        if len(found) != expected:
            raise DataError(f"{prepared_dir / split / cls}: {len(found)} images, summary.json says {expected}; {fix}")
        files += found
    return sorted(files)


def _cache_metadata(summary: dict, split: str, transform: ImageTransform, files: list[str]) -> dict[str, str]:
    import PIL
    import torchvision

    return {
        "format": _CACHE_FORMAT,
        "dataset": summary["dataset"],
        "digest": summary["digest"],
        "split": split,
        "transform": transform.pixels_key(),
        "files": json.dumps(files),
        "classes": json.dumps(list(summary["classes"])),
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
    """One image file -> uint8 [3, H, W], exactly as ``load_split`` decodes the dataset."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return transform.apply(im)
    except FileNotFoundError:
        raise DataError(f"{path}: image not found; check the path") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot be decoded as an image ({exc}); pass a JPEG or PNG photo") from None


def _decode_all(prepared_dir: Path, files: list[str], transform: ImageTransform) -> torch.Tensor:
    from PIL import Image

    images = torch.empty((len(files), 3, *transform.size), dtype=torch.uint8)

    def decode(i: int) -> None:
        with Image.open(prepared_dir / files[i]) as im:
            images[i] = transform.apply(im)

    # PIL releases the GIL while decoding and resizing; every image has its own slot, so order is fixed
    workers = min(4, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(decode, range(len(files))))
    return images


def load_split(prepared_dir: Path, split: str, transform: ImageTransform, cache_dir: Path | None = None) -> Split:
    """Decode and resize a split once (sorted file order); with ``cache_dir``, reuse the cached tensors.

    The cache file is keyed by (dataset, summary digest, split, transform pixels) and records its files
    and a checksum; one that does not match is rebuilt (with a warning), never trusted silently.
    """
    prepared_dir = Path(prepared_dir)
    summary = read_summary(prepared_dir)
    files = _split_files(prepared_dir, split, summary)
    classes = tuple(summary["classes"])
    labels = torch.tensor([classes.index(f.split("/")[1]) for f in files], dtype=torch.int64)
    if cache_dir is None:
        return Split(_decode_all(prepared_dir, files, transform), labels, tuple(files), classes)

    digest = summary["digest"].removeprefix("sha256:")[:16]
    path = Path(cache_dir) / f"{summary['dataset']}-{digest}-{split}-{transform.pixels_key()}.safetensors"
    metadata = _cache_metadata(summary, split, transform, files)
    cached = _read_cache(path, metadata, len(files), transform.size)
    if cached is not None and torch.equal(cached[1], labels):
        return Split(cached[0], labels, tuple(files), classes)
    images = _decode_all(prepared_dir, files, transform)
    _write_cache(path, images, labels, metadata)
    return Split(images, labels, tuple(files), classes)


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
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int, pin_memory: bool = False
) -> DataLoader:
    """Batches ``(images, labels)`` from memory; the shuffle order depends on ``seed`` alone.

    Each pass draws the next permutation from the loader's own generator, so epoch k's order is the
    same for every run with this seed, whatever the tensors hold (images or feature vectors), and the
    global torch RNG is never touched. The last batch may be smaller: every image is used.
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
        sampler=BatchSampler(order, batch_size, drop_last=False),
        batch_size=None,
        num_workers=0,
        generator=generator,
        pin_memory=pin_memory,
    )
