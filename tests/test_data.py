"""Tests of the data pipeline (src/vit_repro/data.py, data.dvc, the `prepare` stage) on the real archives.

Bad archives are made from the shared zips in temporary folders; every failure must name the problem and
the file, and leave no prepared output behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import stat
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
import yaml

from vit_repro import data
from vit_repro.data import DATASETS, DataError, ImageTransform

TEN = "pizza_steak_sushi"
TWENTY = "pizza_steak_sushi_20_percent"


# --- helpers ---------------------------------------------------------------------------------------


def rezip(
    src: Path,
    dst: Path,
    *,
    drop: Callable[[str], bool] = lambda name: False,
    replace: dict[str, bytes] | None = None,
    add: Iterable[tuple[str | zipfile.ZipInfo, bytes]] = (),
    compression: int = zipfile.ZIP_STORED,
    shuffle_seed: int | None = None,
    dirs: bool = True,
) -> Path:
    """Copy ``src`` to a new zip ``dst``, dropping, replacing or adding entries on the way."""
    replace = replace or {}
    level = 1 if compression else None
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression, compresslevel=level) as zout:
        infos = [i for i in zin.infolist() if not drop(i.filename) and (dirs or not i.is_dir())]
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(infos)
        for info in infos:
            zout.writestr(info.filename, replace.get(info.filename, b"" if info.is_dir() else zin.read(info)))
        for name, payload in add:
            zout.writestr(name, payload)
    return dst


def read_entry(archive: Path, name: str) -> bytes:
    with zipfile.ZipFile(archive) as z:
        return z.read(name)


def first_image(dataset: str, prefix: str) -> str:
    return next(p for p in manifest_entries(dataset) if p.startswith(prefix))


def manifest_entries(dataset: str) -> dict[str, str]:
    return data.read_manifest(data.manifest_path(dataset, Path(__file__).resolve().parents[1]), dataset)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], f"temporary folders left behind: {leftovers}"


@pytest.fixture
def ten_zip(shared_datasets: Path) -> Path:
    return shared_datasets / DATASETS[TEN].archive


@pytest.fixture
def manifest10(repo_root: Path) -> Path:
    return data.manifest_path(TEN, repo_root)


# --- manifests and prepare on the real archives -------------------------------------------------------


def test_committed_manifests_match_the_shared_lists(repo_root: Path, shared_datasets: Path) -> None:
    for name in DATASETS:
        assert data.manifest_path(name, repo_root).read_bytes() == (shared_datasets / f"{name}.sha256").read_bytes()


@pytest.mark.parametrize("dataset", [TEN, TWENTY])
def test_prepare_counts_digest_and_files(
    dataset: str, prepared_dataset: Callable[[str], Path], repo_root: Path
) -> None:
    out = prepared_dataset(dataset)
    spec = DATASETS[dataset]
    manifest = data.manifest_path(dataset, repo_root)
    summary = data.read_summary(out)
    assert summary["dataset"] == dataset
    assert summary["classes"] == ["pizza", "steak", "sushi"]
    for split in ("train", "test"):
        assert summary["counts"][split] == {**spec.counts[split], "total": spec.total(split)}
    assert summary["images"] == spec.total()
    # the manifests are committed in canonical form, so the digest is the manifest file's sha256
    assert summary["digest"] == "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert (out / "summary.json").read_text() == json.dumps(summary, indent=2, sort_keys=True) + "\n"
    files = {k: hashlib.sha256(v).hexdigest() for k, v in tree(out).items() if k != "summary.json"}
    assert files == manifest_entries(dataset)


def test_known_counts_and_digests() -> None:
    assert DATASETS[TEN].counts == {
        "train": {"pizza": 78, "steak": 75, "sushi": 72},
        "test": {"pizza": 25, "steak": 19, "sushi": 31},
    }
    assert (DATASETS[TEN].total("train"), DATASETS[TEN].total("test")) == (225, 75)
    assert (DATASETS[TWENTY].total("train"), DATASETS[TWENTY].total("test")) == (450, 150)
    digests = {name: data.manifest_digest(manifest_entries(name)) for name in DATASETS}
    assert digests == {
        TEN: "sha256:ba69955c0e98a181690a62b4f1239b0b51724200685e05ea9ef19d4b4e863673",
        TWENTY: "sha256:8942287ed5d87e392869de51710924ac50375059f9493c5b599dff8bed248284",
    }


def test_prepared_output_is_identical_whichever_container(
    ten_zip: Path, manifest10: Path, prepared_dataset: Callable[[str], Path], tmp_path: Path
) -> None:
    """A deflated, reordered zip without folder entries but with macOS metadata prepares to the same bytes."""
    other = rezip(
        ten_zip, tmp_path / "course-style.zip", compression=zipfile.ZIP_DEFLATED, shuffle_seed=3, dirs=False,
        add=[("__MACOSX/train/pizza/._1008844.jpg", b"\0\5\26\7"), ("train/.DS_Store", b"Bud1"), ("test/._x.jpg", b"")],
    )
    assert hashlib.sha256(other.read_bytes()).digest() != hashlib.sha256(ten_zip.read_bytes()).digest()
    out = tmp_path / "prepared" / TEN
    summary = data.prepare(other, TEN, out, manifest=manifest10)
    reference = prepared_dataset(TEN)
    assert summary == data.read_summary(reference)
    assert tree(out) == tree(reference)
    assert not (out / "__MACOSX").exists() and not (out / "train" / ".DS_Store").exists()


def test_prepare_replaces_a_stale_output_whole(ten_zip: Path, manifest10: Path, tmp_path: Path) -> None:
    out = tmp_path / TEN
    (out / "train" / "burger").mkdir(parents=True)
    (out / "train" / "burger" / "old.jpg").write_bytes(b"stale")
    data.prepare(ten_zip, TEN, out, manifest=manifest10)
    assert not (out / "train" / "burger").exists()
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "test", "train"]
    assert [p.name for p in tmp_path.iterdir()] == [TEN]


# --- bad archives: a clear error naming the file, and nothing left behind ---------------------------


def _bad_archives(src: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (bad archive, regex the error must match)."""
    steak = first_image(TEN, "train/steak/")
    pizza = first_image(TEN, "train/pizza/")
    image = read_entry(src, steak)
    tampered = image[:5000] + bytes([image[5000] ^ 0xFF]) + image[5001:]
    link = zipfile.ZipInfo("train/pizza/link.jpg")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    truncated = tmp / "truncated.zip"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    bad_crc = tmp / "bad-crc.zip"
    raw = bytearray(src.read_bytes())
    at = raw.find(image) + 5000  # stored, so the image bytes are in the zip as they are
    raw[at] ^= 0xFF
    bad_crc.write_bytes(bytes(raw))
    z = lambda name, **kw: rezip(src, tmp / f"{name}.zip", **kw)  # noqa: E731
    other_split = pizza.replace("train/", "test/")
    return {
        "tampered image": (z("tampered", replace={steak: tampered}), rf"{steak} has sha256 .* manifest expects"),
        "truncated zip": (truncated, r"truncated\.zip: not a readable zip archive .* damaged or truncated"),
        "bad crc": (bad_crc, rf"entry '{re.escape(steak)}' cannot be read .*damaged"),
        "missing class folder": (
            z("no-steak", drop=lambda n: n.startswith("train/steak/")),
            r"class folder train/steak/ is missing",
        ),
        "missing image": (z("missing", drop=lambda n: n == steak), rf"{re.escape(steak)} is missing"),
        "zip slip": (z("slip", add=[("../evil.jpg", image)]), r"entry '\.\./evil\.jpg': unsafe path"),
        "nested zip slip": (z("slip2", add=[("train/pizza/../../../evil.jpg", image)]), r"evil\.jpg': unsafe path"),
        "absolute path": (z("absolute", add=[("/tmp/evil.jpg", image)]), r"entry '/tmp/evil\.jpg': unsafe path"),
        "symlink": (z("symlink", add=[(link, b"/etc/passwd")]), r"entry 'train/pizza/link\.jpg': is a symbolic link"),
        "non-image file": (
            z("text", add=[("train/pizza/notes.txt", b"hi")]),
            r"entry 'train/pizza/notes\.txt': not an image file",
        ),
        "unknown class": (
            z("burger", add=[("train/burger/1.jpg", image)]),
            r"entry 'train/burger/1\.jpg': is in an unknown class folder",
        ),
        "extra image": (z("extra", add=[("train/pizza/999.jpg", image)]), r"train/pizza/999\.jpg is not in the manifest"),
        "in both splits": (
            z("both", add=[(other_split, read_entry(src, pizza))]),
            rf"(?=.*{other_split})(?=.*{pizza}).*the same image is in both train and test",
        ),
    }


def test_bad_archives_fail_clearly_and_leave_nothing(ten_zip: Path, manifest10: Path, tmp_path: Path) -> None:
    cases = _bad_archives(ten_zip, tmp_path)
    for case, (archive, pattern) in cases.items():
        out = tmp_path / "prepared" / TEN
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text("{}")  # a stale output from an earlier run must not survive
        with pytest.raises(DataError) as err:
            data.prepare(archive, TEN, out, manifest=manifest10)
        message = str(err.value)
        assert re.search(pattern, message), f"{case}: {message}"
        assert str(archive) in message, f"{case}: the message does not name the archive: {message}"
        assert "dvc" in message, f"{case}: the message gives no fix: {message}"
        assert_nothing_left(out)


def test_missing_archive(manifest10: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.zip: archive not found; fetch it with `dvc repro` \(data\.dvc\)"):
        data.prepare(tmp_path / "nope.zip", TEN, tmp_path / "out", manifest=manifest10)
    assert_nothing_left(tmp_path / "out")


def test_undecodable_jpeg_is_rejected_even_if_listed(ten_zip: Path, manifest10: Path, tmp_path: Path) -> None:
    name = first_image(TEN, "test/sushi/")
    broken = read_entry(ten_zip, name)[:3000]
    archive = rezip(ten_zip, tmp_path / "broken.zip", replace={name: broken})
    entries = manifest_entries(TEN) | {name: hashlib.sha256(broken).hexdigest()}
    manifest = tmp_path / "m.sha256"
    manifest.write_text("".join(f"{entries[p]}  {p}\n" for p in sorted(entries)))
    with pytest.raises(DataError, match=rf"{re.escape(name)} cannot be decoded as a JPEG"):
        data.prepare(archive, TEN, tmp_path / "out", manifest=manifest)
    assert_nothing_left(tmp_path / "out")


def test_bad_manifests(ten_zip: Path, manifest10: Path, tmp_path: Path) -> None:
    lines = manifest10.read_text().splitlines(keepends=True)
    bad = tmp_path / "short.sha256"
    bad.write_text("".join(lines[1:]))
    with pytest.raises(DataError, match=r"short\.sha256: class counts .* differ from pizza_steak_sushi's published"):
        data.prepare(ten_zip, TEN, tmp_path / "out", manifest=bad)
    sha, path = lines[0].split()
    dup = tmp_path / "dup.sha256"
    dup.write_text("".join(lines) + f"{sha}  {path.replace('test/', 'train/')}\n")
    with pytest.raises(DataError, match=r"dup\.sha256: .*in both train and test"):
        data.prepare(ten_zip, TEN, tmp_path / "out", manifest=dup)
    with pytest.raises(DataError, match=r"missing\.sha256: manifest not found; restore it from git"):
        data.prepare(ten_zip, TEN, tmp_path / "out", manifest=tmp_path / "missing.sha256")
    with pytest.raises(DataError, match="refusing to use the working folder"):
        data.prepare(ten_zip, TEN, Path.cwd(), manifest=manifest10)
    with pytest.raises(DataError, match="unknown dataset 'food'"):
        data.prepare(ten_zip, "food", tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_manifest_path_prefers_the_working_directory(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert data.manifest_path(TEN) == repo_root / "data" / "manifests" / f"{TEN}.sha256"
    (tmp_path / "data" / "manifests").mkdir(parents=True)
    assert data.manifest_path(TWENTY) == tmp_path / "data" / "manifests" / f"{TWENTY}.sha256"


# --- transforms, decoding and the tensor cache ------------------------------------------------------


def test_transform_keys_and_validation() -> None:
    assert data.SCRATCH_TRANSFORM.key() == "r224x224-bilinear"
    vit_b16 = data.pretrained_transform(256, 224, "bilinear")
    assert vit_b16.key() == "r256-c224-bilinear-imagenet"
    assert vit_b16.pixels_key() == "r256-c224-bilinear"
    assert (vit_b16.mean, vit_b16.std) == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert ImageTransform(resize=[224, 224]) == data.SCRATCH_TRANSFORM
    for kwargs in (
        {"resize": 256},  # aspect-preserving resize without a crop: sizes would differ
        {"resize": 224, "crop": 256},
        {"resize": (224, 224), "interpolation": "lanczos"},
        {"resize": (224, 224), "mean": (0.5, 0.5, 0.5)},
    ):
        with pytest.raises(ValueError):
            ImageTransform(**kwargs)
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2).expand(3, 1, 2)
    assert data.SCRATCH_TRANSFORM.normalize(x).tolist() == [[[0.0, 1.0]]] * 3
    black = -torch.tensor(data.IMAGENET_MEAN) / torch.tensor(data.IMAGENET_STD)
    assert torch.allclose(vit_b16.normalize(x)[:, 0, 0], black)
    with pytest.raises(TypeError):
        vit_b16.normalize(x.float())


def test_transforms_match_the_seed_and_torchvision_weights(prepared_dir: Path) -> None:
    """Scratch: the seed's Resize((224, 224)) + ToTensor; pretrained: torchvision's ViT-B/16 transforms()."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.models import ViT_B_16_Weights

    files = sorted(prepared_dir.glob("test/*/*.jpg"))[::15]
    seed = T.Compose([T.Resize((224, 224)), T.ToTensor()])
    weights = ViT_B_16_Weights.IMAGENET1K_V1.transforms()
    vit_b16 = data.pretrained_transform(256, 224, "bilinear")
    for path in files:
        with Image.open(path) as im:
            ours_scratch = data.SCRATCH_TRANSFORM.normalize(data.load_image(path, data.SCRATCH_TRANSFORM))
            assert torch.equal(ours_scratch, seed(im))
            assert torch.allclose(vit_b16.normalize(data.load_image(path, vit_b16)), weights(im), atol=1e-6)


def test_load_split_shapes_order_and_labels(prepared_dir: Path) -> None:
    split = data.load_split(prepared_dir, "test", data.pretrained_transform(256, 224, "bicubic"))
    assert split.images.shape == (75, 3, 224, 224) and split.images.dtype == torch.uint8
    assert split.labels.dtype == torch.int64 and split.labels.bincount().tolist() == [25, 19, 31]
    assert list(split.files) == sorted(split.files) and split.files[0].startswith("test/pizza/")
    assert split.classes == ("pizza", "steak", "sushi")
    assert all(split.classes[label] == f.split("/")[1] for f, label in zip(split.files, split.labels.tolist()))


def test_cache_hit_and_corrupt_cache_rebuilt(
    prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    t = data.SCRATCH_TRANSFORM
    fresh = data.load_split(prepared_dir, "test", t, tmp_path)
    (cache,) = tmp_path.glob("*.safetensors")
    assert cache.name.startswith(f"{TEN}-ba69955c0e98a181-test-r224x224-bilinear")

    decode = data._decode_all
    monkeypatch.setattr(data, "_decode_all", lambda *a: pytest.fail("decoded again despite a valid cache"))
    hit = data.load_split(prepared_dir, "test", t, tmp_path)
    assert torch.equal(hit.images, fresh.images) and torch.equal(hit.labels, fresh.labels) and hit.files == fresh.files
    monkeypatch.setattr(data, "_decode_all", decode)

    good = cache.read_bytes()
    flipped = bytearray(good)
    flipped[-10] ^= 1
    for damage in (good[: len(good) // 2], bytes(flipped), b"not a safetensors file"):
        cache.write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vit_repro.data"):
            rebuilt = data.load_split(prepared_dir, "test", t, tmp_path)
        assert "rebuilding decoded-image cache" in caplog.text
        assert torch.equal(rebuilt.images, fresh.images)
    monkeypatch.setattr(data, "_decode_all", lambda *a: pytest.fail("the rebuilt cache was not used"))
    assert torch.equal(data.load_split(prepared_dir, "test", t, tmp_path).images, fresh.images)
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]


def test_load_split_rejects_an_incomplete_prepared_dir(prepared_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(prepared_dir, tmp_path / TEN)
    next((copy / "test" / "steak").glob("*.jpg")).unlink()
    with pytest.raises(DataError, match=r"test/steak: 18 images, summary.json says 19; run `dvc repro prepare`"):
        data.load_split(copy, "test", data.SCRATCH_TRANSFORM)
    with pytest.raises(DataError, match=r"summary.json: not found; run `dvc repro prepare`"):
        data.read_summary(tmp_path)


# --- loaders ---------------------------------------------------------------------------------------


def _orders(loader: torch.utils.data.DataLoader, epochs: int = 2) -> list[list[int]]:
    return [torch.cat([labels for _, labels in loader]).tolist() for _ in range(epochs)]


def test_make_loader_is_deterministic_given_the_seed() -> None:
    n = 50
    ids = torch.arange(n)
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    features = torch.randn(n, 8)
    rng = torch.get_rng_state()
    a = _orders(data.make_loader(images, ids, 16, shuffle=True, seed=0))
    assert torch.equal(torch.get_rng_state(), rng), "the loader must not consume the global RNG"
    assert a == _orders(data.make_loader(images, ids, 16, shuffle=True, seed=0))
    assert a == _orders(data.make_loader(features, ids, 16, shuffle=True, seed=0)), "images and features: same order"
    assert a != _orders(data.make_loader(images, ids, 16, shuffle=True, seed=1))
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1]) == list(range(n))
    assert _orders(data.make_loader(images, ids, 16, shuffle=False, seed=0), 1) == [list(range(n))]

    loader = data.make_loader(features, ids, 16, shuffle=True, seed=0)
    batches = list(loader)
    assert len(loader) == 4 and [len(y) for _, y in batches] == [16, 16, 16, 2]
    x, y = batches[0]
    assert torch.equal(x, features[y])


# --- end to end: `dvc repro` in a fresh git+DVC repo -------------------------------------------------


@pytest.mark.slow
def test_dvc_repro_prepare_offline(repo_root: Path, shared_datasets: Path, make_dvc_repo, tmp_path: Path) -> None:
    """Like CI: a clone beside a `shared/datasets` folder, the remote pointed at it with the documented command."""
    mirror = tmp_path / "shared" / "datasets"
    mirror.mkdir(parents=True)
    for spec in DATASETS.values():
        shutil.copyfile(shared_datasets / spec.archive, mirror / spec.archive)
    files = [".dvc/config", ".dvcignore", "data.dvc", DATASETS[TWENTY].dvc_file, "data/.gitignore", "data/manifests",
             "params.yaml", "src/vit_repro/data.py"]
    repo = make_dvc_repo(files, remote_url="../shared/datasets", commit=False)
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    (repo.path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": stages["prepare"]}}, sort_keys=False))
    repo.commit("pipeline")
    assert "../../shared/datasets" in (repo.path / ".dvc" / "config.local").read_text()

    def check(dataset: str) -> None:
        summary = data.read_summary(repo.path / "data" / "prepared" / dataset)
        assert summary["images"] == DATASETS[dataset].total()
        assert summary["digest"] == data.manifest_digest(manifest_entries(dataset))

    first = repo.dvc("repro", "prepare")
    assert "Importing 'remote://course-data/pizza_steak_sushi.zip'" in first.stdout
    assert "Running stage 'prepare'" in first.stdout
    check(TEN)
    lock = (repo.path / "dvc.lock").read_text()
    second = repo.dvc("repro", "prepare")
    assert "Running stage" not in second.stdout and "Importing" not in second.stdout
    assert "Stage 'prepare' didn't change, skipping" in second.stdout
    assert (repo.path / "dvc.lock").read_text() == lock
    assert repo.git("status", "--porcelain", "data.dvc").stdout == "", "offline, data.dvc must stay as committed"

    params = repo.path / "params.yaml"
    params.write_text(re.sub(r"(?m)^(  dataset: )pizza_steak_sushi\b", rf"\g<1>{TWENTY}", params.read_text()))
    repo.dvc("repro", "prepare")
    check(TWENTY)
    assert repo.git("status", "--porcelain", DATASETS[TWENTY].dvc_file).stdout == ""

    steak = first_image(TWENTY, "train/steak/")
    image = read_entry(mirror / DATASETS[TWENTY].archive, steak)
    tampered = rezip(mirror / DATASETS[TWENTY].archive, tmp_path / "t.zip", replace={steak: image[:-1] + b"\0"})
    shutil.move(tampered, mirror / DATASETS[TWENTY].archive)
    failed = repo.dvc("repro", "prepare", check=False)
    assert failed.returncode != 0
    assert re.search(rf"{re.escape(steak)} has sha256 .* manifest expects", failed.stdout + failed.stderr)
    assert_nothing_left(repo.path / "data" / "prepared" / TWENTY)
