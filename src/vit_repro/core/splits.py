"""The study's image sets: training sets, validation folds carved from them, and one fixed test set.

Every image is identified by its sha256 (from the committed manifests). The test set is the union of
the chosen archives' test splits (deduplicated), and it must share no image with any training set:
that is checked here, by content, not assumed. A validation fold is carved per class from each
training set (seeded); it exists for tuning, so that nothing is ever chosen on the test set.

``build_splits`` writes ``splits.json`` (the ``splits`` stage); ``read_splits`` gives ``Splits``,
whose ``subset(name)`` is ``"test"``, a training set (``"225"``), or its ``"225:fit"`` / ``"225:val"`` parts.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .dataset import CLASSES, DataError, dataset_spec, manifest_path, read_manifest
from .fsutil import read_json

SPLITS_FILE = "splits.json"
FORMAT = "vit-repro-splits/1"


class SplitError(DataError):
    """The requested sets overlap or do not exist; the message names the images and the fix."""


@dataclass(frozen=True)
class Image:
    dataset: str  # the prepared dataset folder that holds the file
    file: str  # <split>/<class>/<id>.jpg inside it
    sha256: str
    label: int


@dataclass(frozen=True)
class Subset:
    """A named, ordered set of images (sorted by sha256, so the order is independent of the archives)."""

    name: str
    images: tuple[Image, ...]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(i.sha256 for i in self.images)

    @property
    def digest(self) -> str:
        """``sha256:`` of the sorted image hashes with their labels: the subset's identity."""
        text = "".join(f"{i.sha256} {i.label}\n" for i in self.images)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in CLASSES}
        for image in self.images:
            out[CLASSES[image.label]] += 1
        return out


@dataclass(frozen=True)
class Splits:
    classes: tuple[str, ...]
    test: Subset
    train_sets: dict[str, Subset]
    validation: dict[str, Subset]  # train set -> its validation fold

    def subset(self, name: str) -> Subset:
        """``test``, a training set, or ``<train set>:fit`` (the set without its fold) / ``<train set>:val``."""
        base, _, part = name.partition(":")
        if name == "test":
            return self.test
        if base not in self.train_sets or part not in ("", "fit", "val"):
            known = ["test", *(f"{t}{p}" for t in self.train_sets for p in ("", ":fit", ":val"))]
            raise SplitError(f"unknown image set {name!r}; known: {known}")
        if part == "val":
            return self.validation[base]
        if part == "fit":
            held = set(self.validation[base].ids)
            return Subset(name, tuple(i for i in self.train_sets[base].images if i.sha256 not in held))
        return self.train_sets[base]

    def all_images(self) -> tuple[Image, ...]:
        """Every distinct image of the study, sorted by sha256."""
        seen = {i.sha256: i for s in (self.test, *self.train_sets.values()) for i in s.images}
        return tuple(seen[k] for k in sorted(seen))


def _images(dataset: str, split: str, root: Path) -> list[Image]:
    entries = read_manifest(manifest_path(dataset, root), dataset)
    return [Image(dataset, rel, sha, CLASSES.index(rel.split("/")[1]))
            for rel, sha in entries.items() if rel.split("/")[0] == split]


def _unique(name: str, images: list[Image]) -> Subset:
    """Images deduplicated by content (the first archive's copy kept), sorted by sha256."""
    by_sha: dict[str, Image] = {}
    for image in images:
        other = by_sha.setdefault(image.sha256, image)
        if other.label != image.label:
            raise SplitError(f"{image.dataset}/{image.file} and {other.dataset}/{other.file} are the same image "
                             "with different classes; the manifests disagree: restore data/manifests from git")
    return Subset(name, tuple(by_sha[k] for k in sorted(by_sha)))


def _fold(train: Subset, fraction: float, seed: int) -> Subset:
    """A per-class validation fold: ``round(fraction x n_class)`` images, drawn by a seeded shuffle."""
    chosen: list[Image] = []
    for label in range(len(CLASSES)):
        members = [i for i in train.images if i.label == label]
        random.Random(f"{seed}:{train.name}:{CLASSES[label]}").shuffle(members)
        chosen += members[: round(fraction * len(members))]
    return Subset(f"{train.name}:val", tuple(sorted(chosen, key=lambda i: i.sha256)))


def make_splits(train_sets: dict[str, str], test_from: list[str], validation_fraction: float, seed: int,
                root: Path) -> Splits:
    """The study's sets from the committed manifests; raises if the test set overlaps a training set."""
    test = _unique("test", [i for d in test_from for i in _images(d, "test", root)])
    trains = {name: _unique(name, _images(d, "train", root)) for name, d in train_sets.items()}
    test_ids = set(test.ids)
    for name, subset in trains.items():
        expected = dataset_spec(train_sets[name]).total("train")
        if name.isdigit() and int(name) != len(subset):
            raise SplitError(f"data.train_sets: the set named {name!r} holds {len(subset)} images "
                             f"({train_sets[name]} train, {expected} expected); name it by its size")
        shared = sorted(test_ids & set(subset.ids))
        if shared:
            raise SplitError(f"training set {name!r} and the test set share {len(shared)} image(s) (e.g. sha256 "
                             f"{shared[0][:16]}…); choose data.test_from whose test splits are disjoint from it")
    folds = {name: _fold(subset, validation_fraction, seed) for name, subset in trains.items()}
    return Splits(CLASSES, test, trains, folds)


def write_splits(splits: Splits, out_dir: Path) -> Path:
    """``out_dir/splits.json``: every set's images (dataset, file, sha256, label), digests and counts."""
    def entry(s: Subset) -> dict:
        return {"digest": s.digest, "counts": s.counts(),
                "images": [[i.dataset, i.file, i.sha256, i.label] for i in s.images]}

    doc = {
        "format": FORMAT,
        "classes": list(splits.classes),
        "test": entry(splits.test),
        "train_sets": {k: entry(v) for k, v in splits.train_sets.items()},
        "validation": {k: entry(v) for k, v in splits.validation.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SPLITS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_splits(splits_dir: Path) -> Splits:
    path = Path(splits_dir) / SPLITS_FILE
    fix = "run `dvc repro splits` to rebuild it"
    doc = read_json(path, fix, SplitError)
    found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
    if found != FORMAT:
        raise SplitError(f"{path}: format {found!r}, expected {FORMAT!r}; {fix}")

    def subset(name: str, entry: dict) -> Subset:
        return Subset(name, tuple(Image(*row) for row in entry["images"]))

    return Splits(
        classes=tuple(doc["classes"]),
        test=subset("test", doc["test"]),
        train_sets={k: subset(k, v) for k, v in doc["train_sets"].items()},
        validation={k: subset(f"{k}:val", v) for k, v in doc["validation"].items()},
    )
