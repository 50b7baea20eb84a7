"""``vit-repro predict`` with a trained run's weights (issue 15): every bad image is reported, the good ones are
still classified, nothing is created outside a repository, ``--json`` is JSON only, argument errors exit 2.

The weights are those of seed 0 of ``trained_study`` (conftest: a real ``dvc repro`` of a tiny study whose
seed 0 logs its weights to the repository's MLflow store); the images are real photos from the shared
dataset archive, and one file that is not an image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import TrainedStudy

pytestmark = pytest.mark.slow

CLASSES = ["pizza", "steak", "sushi"]


def predict(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "vit-repro"
    return subprocess.run([str(exe), "predict", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def outside_env(study: TrainedStudy) -> dict[str, str]:
    env = dict(study.env)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def run_id(trained_study: TrainedStudy) -> str:
    record = json.loads((trained_study.path / "runs" / "vit" / "225" / "baseline" / "seed0" / "run.json").read_text())
    assert record["mlflow"]["weights_artifact"] == "weights/model.safetensors"
    return record["mlflow"]["run_id"]


@pytest.fixture(scope="module")
def images(shared_datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real test photos (a pizza, a sushi) and ``broken.jpg``, which is not an image."""
    folder = tmp_path_factory.mktemp("images")
    out = {}
    with zipfile.ZipFile(shared_datasets / "pizza_steak_sushi.zip") as zf:
        for cls in ("pizza", "sushi"):
            name = next(n for n in sorted(zf.namelist()) if n.startswith(f"test/{cls}/") and n.endswith(".jpg"))
            out[cls] = folder / f"{cls}.jpg"
            out[cls].write_bytes(zf.read(name))
    out["broken"] = folder / "broken.jpg"
    out["broken"].write_bytes(b"this is not a JPEG\n" * 10)
    return out


def test_one_bad_image_is_reported_and_the_good_ones_are_predicted(trained_study: TrainedStudy, run_id: str,
                                                                   images: dict[str, Path]) -> None:
    before = sorted(p.name for p in trained_study.path.iterdir())
    proc = predict("--run", run_id, str(images["pizza"]), str(images["broken"]), str(images["sushi"]),
                   cwd=trained_study.path, env=trained_study.env)
    assert proc.returncode == 1, proc.stderr[-3000:]  # non-zero: one image failed
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(images["pizza"]), str(images["sushi"])], proc.stdout
    for line in lines:
        label = line.split(": ", 1)[1].split(" ", 1)[0]
        assert label in CLASSES and all(f"{c} " in line for c in CLASSES), line
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(images["broken"]) in errors[0] and "cannot be decoded" in errors[0], proc.stderr
    assert sorted(p.name for p in trained_study.path.iterdir()) == before


def test_json_is_the_only_output_on_stdout(trained_study: TrainedStudy, run_id: str, images: dict[str, Path],
                                           tmp_path: Path) -> None:
    """``--weights`` from a folder outside any repository: JSON on stdout, messages on stderr, no store created."""
    import mlflow

    weights = Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="weights", dst_path=str(tmp_path / "download"),
        tracking_uri=f"sqlite:///{trained_study.path / 'mlflow.db'}"))
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    proc = predict("--weights", str(weights), "--json", str(images["pizza"]), str(images["broken"]),
                   str(images["sushi"]), cwd=empty, env=outside_env(trained_study))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    results = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert [r["path"] for r in results] == [str(images[k]) for k in ("pizza", "sushi", "broken")]
    for result in results[:2]:
        assert result["label"] in CLASSES and set(result["probabilities"]) == set(CLASSES)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert "cannot be decoded" in results[2]["error"] and "label" not in results[2]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [f"error: {results[2]['error']}"]
    assert list(empty.iterdir()) == []  # no mlflow.db, no mlruns/


def test_run_id_outside_a_repository_creates_no_store_and_exits_2(trained_study: TrainedStudy, run_id: str,
                                                                  images: dict[str, Path], tmp_path: Path) -> None:
    proc = predict("--run", run_id, str(images["pizza"]), cwd=tmp_path, env=outside_env(trained_study))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "not inside a vit-repro repository" in line, line
    assert "MLFLOW_TRACKING_URI" in line and "--weights" in line, line  # the fixes
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/


def test_run_together_with_weights_exits_2(images: dict[str, Path], tmp_path: Path) -> None:
    proc = predict("--run", "0123", "--weights", str(tmp_path), str(images["pizza"]), cwd=tmp_path,
                   env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert proc.returncode == 2, proc.stderr
    assert "not allowed with argument" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_run_id_with_an_unreachable_tracking_server_fails_at_once(trained_study: TrainedStudy, run_id: str,
                                                                 images: dict[str, Path], tmp_path: Path) -> None:
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    proc = predict("--run", run_id, str(images["pizza"]), cwd=tmp_path,
                   env={**outside_env(trained_study), "MLFLOW_TRACKING_URI": uri})
    elapsed = time.monotonic() - started
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert uri in line and "unreachable" in line and "MLFLOW_TRACKING_URI" in line, line
    assert elapsed < 60, f"took {elapsed:.0f}s"  # MLflow's own retries would take minutes
    assert list(tmp_path.iterdir()) == []
