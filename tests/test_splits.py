"""The study's image sets (src/vit_repro/splits.py) from the committed manifests.

One test set for every run: the union of both archives' test splits, deduplicated by content (211
images), and checked disjoint by sha256 from every training set. Validation folds are carved per class
from each training set, seeded. A configuration whose test set overlaps a training set is refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from vit_repro.core import dataset as ds
from vit_repro.core.splits import SPLITS_FILE, SplitError, Subset, make_splits, read_splits, write_splits

TEN = "pizza_steak_sushi"
TWENTY = "pizza_steak_sushi_20_percent"
TRAIN_SETS = {"225": TEN, "450": TWENTY}


def manifest(dataset: str, root: Path) -> dict[str, str]:
    return ds.read_manifest(ds.manifest_path(dataset, root), dataset)


def shas(dataset: str, split: str, root: Path) -> set[str]:
    return {sha for rel, sha in manifest(dataset, root).items() if rel.startswith(f"{split}/")}


def test_one_test_set_of_211_images_disjoint_from_every_training_set(splits, repo_root: Path) -> None:
    test_ids = set(splits.test.ids)
    assert len(splits.test) == len(test_ids) == 211  # 75 + 150 test images, 14 of them in both archives
    assert test_ids == shas(TEN, "test", repo_root) | shas(TWENTY, "test", repo_root)
    assert splits.test.counts() == {"pizza": 66, "steak": 72, "sushi": 73}
    for name, dataset in TRAIN_SETS.items():
        train = splits.subset(name)
        assert len(train) == int(name) and set(train.ids) == shas(dataset, "train", repo_root)
        assert not test_ids & set(train.ids), f"training set {name} shares images with the test set"
        assert train.counts() == ds.DATASETS[dataset].counts["train"]
    assert splits.subset("test") is splits.test
    assert splits.classes == ds.CLASSES
    # every image is where its label says, and the study holds each distinct image once
    for image in splits.all_images():
        assert image.file.split("/")[1] == ds.CLASSES[image.label]
    assert len(splits.all_images()) == 691  # 211 test + 450 + the 30 of the 225 not in the 450


def test_test_set_union_is_deduplicated_by_content(splits, repo_root: Path) -> None:
    ten, twenty = shas(TEN, "test", repo_root), shas(TWENTY, "test", repo_root)
    both = ten & twenty
    assert len(both) == 14
    by_sha = {i.sha256: i for i in splits.test.images}
    assert all(by_sha[sha].dataset == TEN for sha in both), "the first archive's copy is kept"
    assert {by_sha[sha].dataset for sha in twenty - ten} == {TWENTY}
    # sorted by sha256, so the order (and the digest) does not depend on the archives' order
    assert list(splits.test.ids) == sorted(splits.test.ids)
    swapped = make_splits(TRAIN_SETS, [TWENTY, TEN], 0.2, 0, repo_root)
    assert swapped.test.ids == splits.test.ids and swapped.test.digest == splits.test.digest
    assert {by_sha[sha].label for sha in both} == {i.label for i in swapped.test.images if i.sha256 in both}


def test_validation_folds_are_per_class_and_seeded(splits, repo_root: Path) -> None:
    for name, dataset in TRAIN_SETS.items():
        train, fold, fit = splits.subset(name), splits.subset(f"{name}:val"), splits.subset(f"{name}:fit")
        per_class = ds.DATASETS[dataset].counts["train"]
        assert fold.counts() == {c: round(0.2 * n) for c, n in per_class.items()}  # 225: 16 + 15 + 14
        assert set(fold.ids) | set(fit.ids) == set(train.ids) and not set(fold.ids) & set(fit.ids)
        assert len(fit) + len(fold) == len(train)
        assert list(fold.ids) == sorted(fold.ids) and list(fit.ids) == sorted(fit.ids)
        assert not set(fold.ids) & set(splits.test.ids)
    again = make_splits(TRAIN_SETS, [TEN, TWENTY], 0.2, 0, repo_root)
    other = make_splits(TRAIN_SETS, [TEN, TWENTY], 0.2, 1, repo_root)
    assert again.validation == splits.validation
    for name in TRAIN_SETS:
        assert other.validation[name].counts() == splits.validation[name].counts()
        assert other.validation[name].ids != splits.validation[name].ids, "another seed, another fold"
    # the training and test sets do not depend on the fold's seed
    assert other.test == splits.test and other.train_sets == splits.train_sets
    # a fold depends on its own training set only: adding a training set does not move it
    alone = make_splits({"225": TEN}, [TEN, TWENTY], 0.2, 0, repo_root)
    assert alone.validation["225"] == splits.validation["225"]


def test_unknown_subset_names(splits) -> None:
    with pytest.raises(SplitError, match=r"unknown image set '300'; known: \['test', '225', '225:fit', '225:val', '450'"):
        splits.subset("300")
    for bad in ("225:test", "test:val", ""):
        with pytest.raises(SplitError, match="unknown image set"):
            splits.subset(bad)


def _root_with_manifests(repo_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(repo_root / "data" / "manifests", root / "data" / "manifests")
    return root


def _rewrite(path: Path, change: dict[str, str]) -> None:
    """Give the manifest lines at ``change``'s paths new sha256s (the counts stay as published)."""
    lines = []
    for line in path.read_text().splitlines():
        sha, rel = line.split()
        lines.append(f"{change.get(rel, sha)}  {rel}")
    path.write_text("\n".join(lines) + "\n")


def test_an_overlapping_configuration_is_refused(repo_root: Path, tmp_path: Path) -> None:
    """No shipped configuration overlaps; make the 20% archive's train split hold one of the 10% test images."""
    root = _root_with_manifests(repo_root, tmp_path)
    leak = sorted(shas(TEN, "test", repo_root) - shas(TWENTY, "test", repo_root))[0]
    victim = next(rel for rel in sorted(manifest(TWENTY, repo_root)) if rel.startswith("train/"))
    _rewrite(ds.manifest_path(TWENTY, root), {victim: leak})
    with pytest.raises(SplitError) as err:
        make_splits(TRAIN_SETS, [TEN, TWENTY], 0.2, 0, root)
    message = str(err.value)
    assert f"training set '450' and the test set share 1 image(s) (e.g. sha256 {leak[:16]}" in message
    assert "choose data.test_from whose test splits are disjoint from it" in message
    assert isinstance(err.value, ds.DataError)
    # the same archives are fine when the leaked image is not in the test set
    assert len(make_splits(TRAIN_SETS, [TWENTY], 0.2, 0, root).test) == 150
    # a training set within one archive never overlaps its own test split (the manifest is checked)
    assert len(make_splits({"225": TEN}, [TEN], 0.2, 0, root).test) == 75


def test_the_same_image_with_two_classes_is_refused(repo_root: Path, tmp_path: Path) -> None:
    root = _root_with_manifests(repo_root, tmp_path)
    ten, twenty = manifest(TEN, repo_root), manifest(TWENTY, repo_root)
    shared = sorted(set(v for k, v in ten.items() if k.startswith("test/")) & set(twenty.values()))
    pizza = next(rel for rel in sorted(twenty) if rel.startswith("test/pizza/") and twenty[rel] in shared)
    steak = next(rel for rel in sorted(twenty) if rel.startswith("test/steak/"))
    _rewrite(ds.manifest_path(TWENTY, root), {pizza: twenty[steak], steak: twenty[pizza]})  # swap their classes
    with pytest.raises(SplitError, match=r"are the same image with different classes; the manifests disagree"):
        make_splits(TRAIN_SETS, [TEN, TWENTY], 0.2, 0, root)


def test_a_training_set_is_named_by_its_size(repo_root: Path) -> None:
    with pytest.raises(SplitError, match=r"the set named '300' holds 225 images .* name it by its size"):
        make_splits({"300": TEN}, [TWENTY], 0.2, 0, repo_root)
    named = make_splits({"small": TEN}, [TWENTY], 0.2, 0, repo_root)  # a name that is not a number is not checked
    assert len(named.subset("small")) == 225


def test_write_read_round_trip(splits, tmp_path: Path) -> None:
    path = write_splits(splits, tmp_path / "splits")
    assert path == tmp_path / "splits" / SPLITS_FILE
    assert read_splits(tmp_path / "splits") == splits
    doc = json.loads(path.read_text())
    assert doc["test"]["digest"] == splits.test.digest and doc["test"]["counts"] == splits.test.counts()
    assert doc["validation"]["225"]["digest"] == splits.subset("225:val").digest
    assert [p.name for p in path.parent.iterdir()] == [SPLITS_FILE]  # written atomically, nothing left beside it
    write_splits(splits, tmp_path / "splits")
    assert read_splits(tmp_path / "splits") == splits

    with pytest.raises(SplitError, match=r"splits\.json: missing; run `dvc repro splits`"):
        read_splits(tmp_path / "nowhere")
    path.write_text("{")
    with pytest.raises(SplitError, match=r"splits\.json: unreadable \(JSONDecodeError: .*\); run `dvc repro splits`"):
        read_splits(tmp_path / "splits")
    path.write_text(json.dumps(doc | {"format": "vit-repro-splits/0"}))
    with pytest.raises(SplitError, match=r"format 'vit-repro-splits/0', expected 'vit-repro-splits/1'"):
        read_splits(tmp_path / "splits")


def test_subset_digest_is_its_images_and_labels(splits) -> None:
    test = splits.test
    assert Subset("other name", test.images).digest == test.digest  # the name is not part of the identity
    assert Subset("test", test.images[:-1]).digest != test.digest
    relabelled = (dataclasses.replace(test.images[0], label=(test.images[0].label + 1) % 3),) + test.images[1:]
    assert Subset("test", relabelled).digest != test.digest
