"""The pizza/steak/sushi archives: fetch, verify image by image, and extract (the ``prepare`` stage).

``prepare`` fetches a dataset's archive from the DVC remote ``course-data`` (the course's public
folder, or an offline mirror set with ``dvc remote modify --local course-data url ...``), checks it,
and writes ``<out_dir>/{train,test}/<class>/<id>.jpg`` plus ``summary.json``. The dataset's identity
is its images, not the archive: every image must match the committed manifest
(``data/manifests/<dataset>.sha256``), so two zip containers of the same images prepare to
byte-identical output. Nothing is written until every check has passed: a damaged or tampered
archive leaves the previous prepared folder, and every tracked file, exactly as they were.

Archive rules: entries must be ``<split>/<class>/<id>.jpg`` regular files (directory entries are
ignored). Absolute paths, ``..``, backslashes, links and other special entries, non-JPEG files, files
not in the manifest and unknown folders are rejected. Operating-system metadata that zip tools on
macOS/Windows add (``__MACOSX/``, ``._*`` AppleDouble files, ``.DS_Store``, ``Thumbs.db``) is skipped,
after the same path and link checks: it carries no image data and is never extracted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import UserError
from .fsutil import read_json, replace_dir

log = logging.getLogger(__name__)

CLASSES = ("pizza", "steak", "sushi")
SPLITS = ("train", "test")
MANIFEST_DIR = Path("data/manifests")
SUMMARY_FILE = "summary.json"
REMOTE = "course-data"  # the DVC remote (.dvc/config) whose URL holds the archives
DOWNLOAD_TIMEOUT_S = 60
DOWNLOAD_ATTEMPTS = 3
MAX_IMAGE_BYTES = 16 * 2**20  # far above any Food-101 image; guards against zip bombs
OS_JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
OS_JUNK_DIRS = frozenset({"__MACOSX"})
_IMAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.jpg")


@dataclass(frozen=True)
class DatasetSpec:
    """A published dataset: its archive's file name and its per-class image counts."""

    name: str
    archive: str
    counts: dict[str, dict[str, int]]

    def total(self, split: str | None = None) -> int:
        splits = SPLITS if split is None else (split,)
        return sum(sum(self.counts[s].values()) for s in splits)


DATASETS: dict[str, DatasetSpec] = {
    "pizza_steak_sushi": DatasetSpec(
        name="pizza_steak_sushi",
        archive="pizza_steak_sushi.zip",
        counts={"train": {"pizza": 78, "steak": 75, "sushi": 72}, "test": {"pizza": 25, "steak": 19, "sushi": 31}},
    ),
    "pizza_steak_sushi_20_percent": DatasetSpec(
        name="pizza_steak_sushi_20_percent",
        archive="pizza_steak_sushi_20_percent.zip",
        counts={"train": {"pizza": 154, "steak": 146, "sushi": 150}, "test": {"pizza": 46, "steak": 58, "sushi": 46}},
    ),
}


class DataError(UserError):
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
    checkout = Path(__file__).resolve().parents[3]  # src/vit_repro/core/dataset.py
    return checkout if (checkout / MANIFEST_DIR).is_dir() else cwd


def manifest_path(dataset: str, root: Path | None = None) -> Path:
    """``<root>/data/manifests/<dataset>.sha256``; ``root`` defaults to the cwd, else this source checkout."""
    dataset_spec(dataset)
    return (root if root is not None else _default_root()) / MANIFEST_DIR / f"{dataset}.sha256"


# --- manifest ---------------------------------------------------------------------------------------


def _refetch_hint(spec: DatasetSpec) -> str:
    return (
        f"check that the DVC remote '{REMOTE}' serves the published {spec.archive} (offline machines: "
        f"`dvc remote modify --local {REMOTE} url ../shared/datasets`), then rerun `dvc repro`"
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


def remote_url(root: Path, public: bool = False) -> str:
    """The URL (or local folder) of the DVC remote ``course-data``.

    ``public``: the committed value in ``.dvc/config`` only, as every user has it (a ``--local`` offline
    mirror is a path on one machine, so it never goes into a run's record).
    """
    from dvc.config import Config, ConfigError as DvcConfigError

    try:
        config = Config(str(Path(root) / ".dvc"))
        remotes = config.load_one("repo")["remote"] if public else config["remote"]
        return str(remotes[REMOTE]["url"]).rstrip("/")
    except (KeyError, DvcConfigError) as exc:
        raise DataError(f"{root}/.dvc/config: no DVC remote {REMOTE!r} ({exc}); restore .dvc/config from git") from None


def _download(url: str, dest: Path, spec: DatasetSpec) -> None:
    """``url`` -> ``dest`` through a temporary file; bounded time per attempt, a few attempts."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for attempt in range(DOWNLOAD_ATTEMPTS):
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                shutil.copyfileobj(resp, out, 1 << 20)
            os.replace(tmp, dest)
            return
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            last = exc
            time.sleep(2**attempt)
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise DataError(f"cannot download {url} ({last}) after {DOWNLOAD_ATTEMPTS} attempts; {_refetch_hint(spec)}")


def fetch_archive(dataset: str, root: Path, downloads: Path) -> Path:
    """The dataset's archive: read in place from a local remote, or downloaded once into ``downloads``."""
    spec = dataset_spec(dataset)
    base = remote_url(root)
    if urllib.parse.urlparse(base).scheme in ("http", "https"):
        dest = Path(downloads) / spec.archive
        if not dest.is_file():
            _download(f"{base}/{spec.archive}", dest, spec)
        return dest
    path = Path(base.removeprefix("file://")) / spec.archive
    if not path.is_file():
        raise DataError(f"{path}: archive not found at the DVC remote {REMOTE!r}; {_refetch_hint(spec)}")
    return path


def prepare(dataset: str, out_dir: Path, archive: Path | None = None, root: Path | None = None,
            downloads: Path | None = None, manifest: Path | None = None) -> dict:
    """Fetch (unless ``archive`` is given), verify against the manifest, and write the prepared dataset.

    Everything is extracted into a temporary sibling of ``out_dir``, which replaces ``out_dir`` only once
    every check has passed. On any error a ``DataError`` names the file and the fix, and an existing
    ``out_dir`` is left exactly as it was; a downloaded archive that failed is deleted, so the next run
    fetches it again. Returns the summary, also written to ``out_dir/summary.json``.
    """
    out_dir = Path(out_dir)
    if out_dir.resolve() in (Path.cwd(), *Path.cwd().parents):  # it is replaced below
        raise DataError(f"{out_dir}: refusing to use the working folder or one above it as out_dir; pass a subfolder")
    spec = dataset_spec(dataset)
    root = Path(root) if root is not None else _default_root()
    entries = read_manifest(Path(manifest) if manifest is not None else manifest_path(dataset, root), dataset)
    downloads = Path(downloads) if downloads is not None else root / ".cache" / "downloads"
    archive = Path(archive) if archive is not None else fetch_archive(dataset, root, downloads)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the prepared dataset is not
    try:
        try:
            zf = zipfile.ZipFile(archive)
        except FileNotFoundError:
            raise DataError(f"{archive}: archive not found; {_refetch_hint(spec)}") from None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataError(f"{archive}: not a readable zip archive ({exc}): damaged or truncated; "
                            f"{_refetch_hint(spec)}") from None
        with zf:
            images = _scan_archive(zf, archive, spec, entries)
            _extract(zf, archive, images, entries, spec, tmp)
        summary = _summary(spec, entries)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if archive.parent == downloads:  # a bad download is fetched anew next time
            archive.unlink(missing_ok=True)
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


def read_summary(prepared_dir: Path) -> dict:
    """The ``summary.json`` that ``prepare`` wrote: dataset, classes, counts, digest, images."""
    path = Path(prepared_dir) / SUMMARY_FILE
    fix = "run `dvc repro prepare` to (re)create the prepared dataset"
    summary = read_json(path, fix, DataError)
    missing = {"dataset", "classes", "counts", "digest", "images"} - set(summary if isinstance(summary, dict) else ())
    if missing:
        raise DataError(f"{path}: missing keys {sorted(missing)}; {fix}")
    return summary


