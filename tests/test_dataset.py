"""The archives and the ``prepare`` stage (src/vit_repro/dataset.py), on the real shared zips.

Bad archives are made from the shared zips in temporary folders. Every failure must be a ``DataError``
that names the file and the fix, and must leave an existing prepared folder exactly as it was (same
folder, same bytes) and no temporary folder behind. A downloaded archive that failed is deleted, so the
next run fetches it again; an archive in a local remote folder is never touched.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import re
import shutil
import stat
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from vit_repro.core import dataset as ds
from vit_repro.core.dataset import DATASETS, DataError
from vit_repro.core.errors import UserError

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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": wanted by one case
            for name, payload in add:
                zout.writestr(name, payload)
    return dst


def read_entry(archive: Path, name: str) -> bytes:
    with zipfile.ZipFile(archive) as z:
        return z.read(name)


def manifest_entries(dataset: str) -> dict[str, str]:
    return ds.read_manifest(ds.manifest_path(dataset, Path(__file__).resolve().parents[1]), dataset)


def first_image(dataset: str, prefix: str) -> str:
    return next(p for p in sorted(manifest_entries(dataset)) if p.startswith(prefix))


def tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below ``folder`` (and '<dir>' for every folder)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Snapshot:
    """An existing prepared folder, to check that a failed ``prepare`` left it exactly as it was."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.inode = folder.stat().st_ino
        self.files = tree(folder)

    def assert_unchanged(self, case: str = "") -> None:
        assert self.folder.is_dir(), f"{case}: {self.folder} was removed"
        assert self.folder.stat().st_ino == self.inode, f"{case}: {self.folder} was replaced"
        assert tree(self.folder) == self.files, f"{case}: {self.folder} changed"
        leftovers = [p.name for p in self.folder.parent.iterdir() if p.name.startswith(f".{self.folder.name}.")]
        assert leftovers == [], f"{case}: temporary folders left behind: {leftovers}"


@pytest.fixture
def ten_zip(shared_datasets: Path) -> Path:
    return shared_datasets / DATASETS[TEN].archive


@pytest.fixture
def previous(prepared_dir: Path, tmp_path: Path) -> Snapshot:
    """A good prepared pizza_steak_sushi from an earlier run, at tmp_path/prepared/pizza_steak_sushi."""
    out = tmp_path / "prepared" / TEN
    shutil.copytree(prepared_dir, out)
    return Snapshot(out)


# --- manifests and prepare on the real archives -------------------------------------------------------


def test_committed_manifests_match_the_shared_lists(repo_root: Path, shared_datasets: Path) -> None:
    for name in DATASETS:
        assert ds.manifest_path(name, repo_root).read_bytes() == (shared_datasets / f"{name}.sha256").read_bytes()


def test_manifest_digests_are_pinned() -> None:
    """The manifests are the datasets' identity: a changed manifest must be a deliberate, reviewed change."""
    digests = {name: ds.manifest_digest(manifest_entries(name)) for name in DATASETS}
    assert digests == {
        TEN: "sha256:ba69955c0e98a181690a62b4f1239b0b51724200685e05ea9ef19d4b4e863673",
        TWENTY: "sha256:8942287ed5d87e392869de51710924ac50375059f9493c5b599dff8bed248284",
    }
    assert [(DATASETS[n].total("train"), DATASETS[n].total("test")) for n in (TEN, TWENTY)] == [(225, 75), (450, 150)]


@pytest.mark.parametrize("dataset", [TEN, TWENTY])
def test_prepare_counts_digest_and_files(
    dataset: str, prepared_dataset: Callable[[str], Path], repo_root: Path
) -> None:
    out = prepared_dataset(dataset)
    spec = DATASETS[dataset]
    manifest = ds.manifest_path(dataset, repo_root)
    summary = ds.read_summary(out)
    assert summary["dataset"] == dataset
    assert summary["classes"] == list(ds.CLASSES)
    for split in ("train", "test"):
        assert summary["counts"][split] == {**spec.counts[split], "total": spec.total(split)}
    assert summary["images"] == spec.total()
    # the manifests are committed in canonical form, so the digest is the manifest file's sha256
    assert summary["digest"] == "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert (out / "summary.json").read_text() == json.dumps(summary, indent=2, sort_keys=True) + "\n"
    files = {k: v for k, v in tree(out).items() if v != "<dir>" and k != "summary.json"}
    assert files == manifest_entries(dataset)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755, "the prepared folder must not stay private (mkdtemp's 0700)"


def test_prepared_output_is_identical_whichever_container(
    ten_zip: Path, prepared_dir: Path, repo_root: Path, tmp_path: Path
) -> None:
    """A deflated, reordered zip without folder entries but with macOS/Windows metadata prepares to the same bytes."""
    other = rezip(
        ten_zip, tmp_path / "course-style.zip", compression=zipfile.ZIP_DEFLATED, shuffle_seed=3, dirs=False,
        add=[("__MACOSX/train/pizza/._1008844.jpg", b"\0\5\26\7"), ("train/.DS_Store", b"Bud1"),
             ("test/._x.jpg", b""), ("test/sushi/Thumbs.db", b"\0"), ("__MACOSX/", b"")],
    )
    assert hashlib.sha256(other.read_bytes()).digest() != hashlib.sha256(ten_zip.read_bytes()).digest()
    out = tmp_path / "prepared" / TEN
    summary = ds.prepare(TEN, out, archive=other, root=repo_root)
    assert summary == ds.read_summary(prepared_dir)
    assert tree(out) == tree(prepared_dir)  # no __MACOSX/, .DS_Store, ._* or Thumbs.db among them


def test_prepare_replaces_a_stale_output_whole(ten_zip: Path, repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / TEN
    (out / "train" / "burger").mkdir(parents=True)
    (out / "train" / "burger" / "old.jpg").write_bytes(b"stale")
    (tmp_path / f".{TEN}.partial-123").mkdir()  # left by a killed run
    ds.prepare(TEN, out, archive=ten_zip, root=repo_root)
    assert not (out / "train" / "burger").exists()
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "test", "train"]
    assert [p.name for p in tmp_path.iterdir()] == [TEN]


# --- bad archives: a clear error naming the file, and the previous output untouched ------------------


def _bad_archives(src: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (bad archive, regex the error must match)."""
    steak = first_image(TEN, "train/steak/")
    pizza = first_image(TEN, "train/pizza/")
    image = read_entry(src, steak)
    tampered = image[:5000] + bytes([image[5000] ^ 0xFF]) + image[5001:]

    def link(name: str) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name)
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        return info

    truncated = tmp / "truncated.zip"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    bad_crc = tmp / "bad-crc.zip"
    raw = bytearray(src.read_bytes())
    at = raw.find(image) + 5000  # stored, so the image bytes are in the zip as they are
    raw[at] ^= 0xFF
    bad_crc.write_bytes(bytes(raw))
    z = lambda name, **kw: rezip(src, tmp / f"{name}.zip", **kw)  # noqa: E731
    other_split = pizza.replace("train/", "test/")
    huge = zipfile.ZipInfo("train/pizza/999.jpg")
    huge.compress_type = zipfile.ZIP_DEFLATED
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
        "zip slip through metadata": (z("slip3", add=[("__MACOSX/../../evil.jpg", image)]), r"unsafe path"),
        "absolute path": (z("absolute", add=[("/tmp/evil.jpg", image)]), r"entry '/tmp/evil\.jpg': unsafe path"),
        "windows drive": (z("drive", add=[("C:/evil.jpg", image)]), r"entry 'C:/evil\.jpg': unsafe path"),
        "backslash": (z("backslash", add=[("train\\pizza\\1.jpg", image)]), r"unsafe path"),
        "symlink": (z("symlink", add=[(link("train/pizza/link.jpg"), b"/etc/passwd")]),
                    r"entry 'train/pizza/link\.jpg': is a symbolic link"),
        "symlink as metadata": (z("symlink2", add=[(link("__MACOSX/._link"), b"/etc/passwd")]),
                                r"entry '__MACOSX/\._link': is a symbolic link"),
        "non-image file": (
            z("text", add=[("train/pizza/notes.txt", b"hi")]),
            r"entry 'train/pizza/notes\.txt': not an image file",
        ),
        "unknown class": (
            z("burger", add=[("train/burger/1.jpg", image)]),
            r"entry 'train/burger/1\.jpg': is in an unknown class folder",
        ),
        "unknown folder": (z("folder", add=[("validation/", b"")]), r"entry 'validation/': unexpected folder"),
        "extra image": (z("extra", add=[("train/pizza/999.jpg", image)]), r"train/pizza/999\.jpg is not in the manifest"),
        "duplicate entry": (z("dup", add=[(steak, image)]), rf"entry '{re.escape(steak)}': appears twice"),
        "oversized entry": (z("huge", add=[(huge, bytes(ds.MAX_IMAGE_BYTES + 1))]), r"999\.jpg': \d+ bytes is too large"),
        "in both splits": (
            z("both", add=[(other_split, read_entry(src, pizza))]),
            rf"(?=.*{other_split})(?=.*{pizza}).*the same image is in both train and test",
        ),
    }


def test_bad_archives_fail_clearly_and_keep_the_previous_output(
    ten_zip: Path, previous: Snapshot, repo_root: Path, tmp_path: Path
) -> None:
    cases = _bad_archives(ten_zip, tmp_path)
    for case, (archive, pattern) in cases.items():
        with pytest.raises(DataError) as err:
            ds.prepare(TEN, previous.folder, archive=archive, root=repo_root)
        message = str(err.value)
        assert re.search(pattern, message), f"{case}: {message}"
        assert str(archive) in message, f"{case}: the message does not name the archive: {message}"
        assert "dvc remote modify --local course-data" in message, f"{case}: the message gives no fix: {message}"
        assert archive.is_file(), f"{case}: an archive the user passed was deleted"
        previous.assert_unchanged(case)
    assert isinstance(err.value, UserError)  # the CLI prints it as one line and exits 2


def test_missing_archive(previous: Snapshot, repo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.zip: archive not found; check that the DVC remote 'course-data'"):
        ds.prepare(TEN, previous.folder, archive=tmp_path / "nope.zip", root=repo_root)
    previous.assert_unchanged()


def test_undecodable_jpeg_is_rejected_even_if_listed(
    ten_zip: Path, previous: Snapshot, repo_root: Path, tmp_path: Path
) -> None:
    name = first_image(TEN, "test/sushi/")
    broken = read_entry(ten_zip, name)[:3000]
    archive = rezip(ten_zip, tmp_path / "broken.zip", replace={name: broken})
    entries = manifest_entries(TEN) | {name: hashlib.sha256(broken).hexdigest()}
    manifest = tmp_path / "m.sha256"
    manifest.write_text("".join(f"{entries[p]}  {p}\n" for p in sorted(entries)))
    with pytest.raises(DataError, match=rf"{re.escape(name)} cannot be decoded as a JPEG"):
        ds.prepare(TEN, previous.folder, archive=archive, root=repo_root, manifest=manifest)
    previous.assert_unchanged()


def test_bad_manifests(ten_zip: Path, previous: Snapshot, repo_root: Path, tmp_path: Path) -> None:
    out = previous.folder
    lines = ds.manifest_path(TEN, repo_root).read_text().splitlines(keepends=True)
    bad = tmp_path / "short.sha256"
    bad.write_text("".join(lines[1:]))
    with pytest.raises(DataError, match=r"short\.sha256: class counts .* differ from pizza_steak_sushi's published"):
        ds.prepare(TEN, out, archive=ten_zip, manifest=bad)
    sha, path = lines[0].split()
    dup = tmp_path / "dup.sha256"
    dup.write_text("".join(lines) + f"{sha}  {path.replace('test/', 'train/')}\n")
    with pytest.raises(DataError, match=r"dup\.sha256: .*in both train and test"):
        ds.prepare(TEN, out, archive=ten_zip, manifest=dup)
    garbled = tmp_path / "garbled.sha256"
    garbled.write_text("".join(lines[:5]) + "not a line\n" + "".join(lines[5:]))
    with pytest.raises(DataError, match=r"garbled\.sha256:6: not a '<sha256>  <path>' line; restore it from git"):
        ds.prepare(TEN, out, archive=ten_zip, manifest=garbled)
    with pytest.raises(DataError, match=r"missing\.sha256: manifest not found; restore it from git"):
        ds.prepare(TEN, out, archive=ten_zip, manifest=tmp_path / "missing.sha256")
    with pytest.raises(DataError, match="unknown dataset 'food'"):
        ds.prepare("food", out, archive=ten_zip)
    previous.assert_unchanged()
    with pytest.raises(DataError, match="refusing to use the working folder"):
        ds.prepare(TEN, Path.cwd(), archive=ten_zip, root=repo_root)


def test_read_summary_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"summary\.json: missing; run `dvc repro prepare`"):
        ds.read_summary(tmp_path)
    (tmp_path / "summary.json").write_text("{")
    with pytest.raises(DataError, match=r"summary\.json: unreadable \(JSONDecodeError: .*\); run `dvc repro prepare`"):
        ds.read_summary(tmp_path)
    (tmp_path / "summary.json").write_text('{"dataset": "x"}')
    with pytest.raises(DataError, match=r"missing keys \['classes', 'counts', 'digest', 'images'\]"):
        ds.read_summary(tmp_path)


def test_manifest_path_prefers_the_working_directory(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert ds.manifest_path(TEN) == repo_root / "data" / "manifests" / f"{TEN}.sha256"
    (tmp_path / "data" / "manifests").mkdir(parents=True)
    assert ds.manifest_path(TWENTY) == tmp_path / "data" / "manifests" / f"{TWENTY}.sha256"


# --- fetching from the DVC remote `course-data` ------------------------------------------------------


def test_fetch_from_a_local_remote_folder(
    make_dvc_repo, shared_datasets: Path, prepared_dir: Path, tmp_path: Path
) -> None:
    """An offline clone: `dvc remote modify --local course-data url <folder>`; the archive is read in place."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copyfile(shared_datasets / DATASETS[TEN].archive, mirror / DATASETS[TEN].archive)
    repo = make_dvc_repo([".dvc/config", "data/manifests"], remote_url=mirror)
    public = ds.remote_url(repo.path, public=True)
    assert public.startswith("https://") and "mirror" not in public  # the committed remote, for the run record
    assert Path(ds.remote_url(repo.path)) == mirror

    downloads = tmp_path / "downloads"
    assert ds.fetch_archive(TEN, repo.path, downloads) == mirror / DATASETS[TEN].archive
    out = repo.path / "data" / "prepared" / TEN
    ds.prepare(TEN, out, root=repo.path, downloads=downloads)
    assert tree(out) == tree(prepared_dir)
    assert not downloads.exists(), "a local remote is read in place, never copied"

    # a tampered archive at the remote: refused, the remote's file untouched, the prepared folder kept
    steak = first_image(TEN, "train/steak/")
    image = read_entry(mirror / DATASETS[TEN].archive, steak)
    rezip(shared_datasets / DATASETS[TEN].archive, mirror / DATASETS[TEN].archive,
          replace={steak: image[:-1] + b"\0"})
    tampered = (mirror / DATASETS[TEN].archive).read_bytes()
    before = Snapshot(out)
    with pytest.raises(DataError, match=rf"{re.escape(str(mirror))}.*{re.escape(steak)} has sha256"):
        ds.prepare(TEN, out, root=repo.path, downloads=downloads)
    before.assert_unchanged()
    assert (mirror / DATASETS[TEN].archive).read_bytes() == tampered

    # no archive at the remote; no remote at all
    with pytest.raises(DataError, match=rf"{TWENTY}\.zip: archive not found at the DVC remote 'course-data'"):
        ds.prepare(TWENTY, repo.path / "data" / "prepared" / TWENTY, root=repo.path, downloads=downloads)
    (repo.path / ".dvc" / "config.local").unlink()
    (repo.path / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    with pytest.raises(DataError, match=r"\.dvc/config: no DVC remote 'course-data'.*restore \.dvc/config from git"):
        ds.remote_url(repo.path)


class _Archives(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_remote(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """(URL, served folder, paths requested): a real HTTP server on 127.0.0.1, stopped after the test."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Archives,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/data", folder, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_once_and_a_bad_download_is_fetched_again(
    make_dvc_repo, http_remote, shared_datasets: Path, prepared_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, served, requests = http_remote
    for proxy in ("http_proxy", "HTTP_PROXY"):  # the server is local: never through a proxy
        monkeypatch.delenv(proxy, raising=False)
    (served / "data").mkdir()
    archive = DATASETS[TEN].archive
    steak = first_image(TEN, "train/steak/")
    image = read_entry(shared_datasets / archive, steak)
    rezip(shared_datasets / archive, served / "data" / archive, replace={steak: image[:-1] + b"\0"})
    repo = make_dvc_repo([".dvc/config", "data/manifests"], remote_url=url)
    downloads = repo.path / ".cache" / "downloads"
    out = repo.path / "data" / "prepared" / TEN
    shutil.copytree(prepared_dir, out)
    before = Snapshot(out)

    # the remote serves a tampered archive: refused, the download deleted, the prepared folder kept
    with pytest.raises(DataError, match=rf"{re.escape(str(downloads / archive))}: .*{re.escape(steak)} has sha256"):
        ds.prepare(TEN, out, root=repo.path)  # downloads default to <root>/.cache/downloads
    assert requests == [f"/data/{archive}"]
    assert not (downloads / archive).exists(), "a bad download must be deleted so that the next run fetches it anew"
    assert [p.name for p in downloads.iterdir()] == [], "no partial download left behind"
    before.assert_unchanged()

    # the remote is fixed: fetched again and prepared; a second run reuses the download
    shutil.copyfile(shared_datasets / archive, served / "data" / archive)
    ds.prepare(TEN, out, root=repo.path)
    assert tree(out) == tree(prepared_dir)
    assert (downloads / archive).read_bytes() == (shared_datasets / archive).read_bytes()
    ds.prepare(TEN, out, root=repo.path)
    assert requests == [f"/data/{archive}"] * 2

    # a remote without the file: a few attempts, then a clear error (no waiting between attempts here)
    monkeypatch.setattr(ds.time, "sleep", lambda s: None)
    with pytest.raises(DataError, match=rf"cannot download {re.escape(url)}/{TWENTY}\.zip .* after 3 attempts"):
        ds.prepare(TWENTY, repo.path / "data" / "prepared" / TWENTY, root=repo.path)
    assert requests[2:] == [f"/data/{TWENTY}.zip"] * ds.DOWNLOAD_ATTEMPTS
    assert sorted(p.name for p in downloads.iterdir()) == [archive]


# --- end to end: `dvc repro prepare` in a fresh git+DVC repo -------------------------------------------


@pytest.mark.slow
def test_dvc_repro_prepare_offline_keeps_the_last_good_output(
    make_dvc_repo, shared_datasets: Path, tmp_path: Path
) -> None:
    """Like CI: a clone beside `shared/datasets`, the remote pointed at it with the documented relative URL."""
    import yaml

    mirror = tmp_path / "shared" / "datasets"
    mirror.mkdir(parents=True)
    archive = DATASETS[TEN].archive
    shutil.copyfile(shared_datasets / archive, mirror / archive)
    repo = make_dvc_repo([".dvc/config", ".dvcignore", "data/.gitignore", "data/manifests", "dvc.yaml", "params.yaml",
                          "src/vit_repro"], remote_url="../shared/datasets", commit=False)
    stages = yaml.safe_load((repo.path / "dvc.yaml").read_text())["stages"]
    (repo.path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": stages["prepare"]}}, sort_keys=False))
    params = yaml.safe_load((repo.path / "params.yaml").read_text())
    params["data"]["datasets"] = [TEN]
    (repo.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repo.commit("pipeline")
    out = repo.path / "data" / "prepared" / TEN

    first = repo.dvc("repro", f"prepare@{TEN}")
    assert f"Running stage 'prepare@{TEN}'" in first.stdout
    assert ds.read_summary(out)["digest"] == ds.manifest_digest(manifest_entries(TEN))
    lock = (repo.path / "dvc.lock").read_text()
    second = repo.dvc("repro", f"prepare@{TEN}")
    assert "Running stage" not in second.stdout and (repo.path / "dvc.lock").read_text() == lock

    # the remote's archive is damaged: the stage fails naming the image, and the last good output stays
    before = Snapshot(out)
    steak = first_image(TEN, "train/steak/")
    rezip(shared_datasets / archive, mirror / archive, replace={steak: read_entry(mirror / archive, steak)[:-1] + b"\0"})
    failed = repo.dvc("repro", "--force", f"prepare@{TEN}", check=False)
    assert failed.returncode != 0
    assert re.search(rf"{re.escape(steak)} has sha256 .* manifest expects", failed.stdout + failed.stderr)
    before.assert_unchanged()
    assert (repo.path / "dvc.lock").read_text() == lock
    assert os.listdir(mirror) == [archive]
