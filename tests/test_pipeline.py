"""The whole study through the real `dvc repro`, at toy scale, in a temporary git+DVC repository.

One session-scoped study (tiny scratch ViT at 32 px, the shared ViT-S/14 for the frozen path, recipes
baseline and paper, 2 seeds, 2 epochs) logs to a real SQLite MLflow store at the temp repo's root;
the tests read back what DVC and MLflow recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DvcRepo, create_dvc_repo

pytestmark = pytest.mark.slow

PROJECT_FILES = (
    "params.yaml",
    "dvc.yaml",
    "data.dvc",
    "data/pizza_steak_sushi_20_percent.zip.dvc",
    "data/.gitignore",
    "data/manifests",
    "experiments",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "src/vit_repro",
)
RECIPES = ["baseline", "paper"]
SEEDS = [0, 1]
EPOCHS = 2


def tiny_params(repo_params: Path, shared_dir: Path) -> dict:
    params = yaml.safe_load(repo_params.read_text())
    params["study"] = {"name": "tiny", "seeds": SEEDS, "recipes": RECIPES}
    params["studies"]["tiny"] = {"scratch_model": "Ti/16", "frozen_backbone": "vit_s14_dinov2"}
    params["backbones"]["vit_s14_dinov2"]["path"] = str(shared_dir / "pretrained" / "vit_s14_dinov2_p14_224.safetensors")
    params["scratch"]["image_size"] = 32
    params["train"]["epochs"] = EPOCHS
    return params


@pytest.fixture(scope="session")
def study(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> DvcRepo:
    """A finished toy study: `dvc repro` run once in a fresh repo, offline setting on."""
    repo = create_dvc_repo(
        tmp_path_factory.mktemp("study") / "repo", PROJECT_FILES, remote_url=shared_dir / "datasets", commit=False
    )
    (repo.path / "params.yaml").write_text(yaml.safe_dump(tiny_params(repo.path / "params.yaml", shared_dir)))
    repo.commit("tiny study")
    proc = repo.dvc("repro")
    (repo.path / "repro.log").write_text(proc.stdout + proc.stderr)
    return repo


def mlflow_client(repo: DvcRepo):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{repo.path / 'mlflow.db'}")


def seed_runs(repo: DvcRepo) -> list:
    client = mlflow_client(repo)
    exp = client.get_experiment_by_name("vit-repro/tiny")
    return client.search_runs([exp.experiment_id], filter_string="tags.`vit.kind` = 'seed'", max_results=1000)


def test_repro_runs_every_stage_and_writes_the_report(study: DvcRepo) -> None:
    for backbone in ("scratch", "frozen"):
        for recipe in RECIPES:
            for seed in SEEDS:
                folder = study.path / "runs" / backbone / recipe / f"seed{seed}"
                assert sorted(p.name for p in folder.iterdir()) == ["history.csv", "metrics.json", "run.json", "steps.csv"]
                record = json.loads((folder / "run.json").read_text())
                assert record["status"] == "FINISHED" and record["study"] == "tiny"
                assert record["provenance"]["dvc_stage"] == f"train-{backbone}@{recipe}-{seed}"
    report = (study.path / "reports" / "report.md").read_text()
    assert "Incomplete study" not in report
    assert (study.path / "models" / "pretrained" / "backbone.json").is_file()
    lock = yaml.safe_load((study.path / "dvc.lock").read_text())
    assert {"prepare", "pretrained", "features", "report"} <= set(lock["stages"])


def test_every_run_is_in_mlflow_with_its_metrics(study: DvcRepo) -> None:
    runs = seed_runs(study)
    assert len(runs) == 2 * len(RECIPES) * len(SEEDS)
    for run in runs:
        assert run.info.status == "FINISHED"
        backbone, recipe, seed = run.data.tags["vit.backbone"], run.data.tags["vit.recipe"], run.data.tags["vit.seed"]
        metrics = json.loads((study.path / "runs" / backbone / recipe / f"seed{seed}" / "metrics.json").read_text())
        assert run.data.metrics["final_test_acc"] == pytest.approx(metrics["test_acc"])
        assert run.data.params["train.epochs"] == str(EPOCHS)
        assert run.data.tags["vit.dvc_stage"] == f"train-{backbone}@{recipe}-{seed}"
        history = mlflow_client(study).get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == list(range(EPOCHS * 8))  # 225 images, batch 32: 8 steps per epoch
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 2 * len(RECIPES)  # one parent per variant, seeds nested under it


def test_frozen_path_transfers_pretrained_features(study: DvcRepo) -> None:
    # chance is 1/3 and always answering the largest class (sushi) scores 31/75; a random backbone stays near that
    for seed in SEEDS:
        metrics = json.loads((study.path / "runs" / "frozen" / "baseline" / f"seed{seed}" / "metrics.json").read_text())
        assert metrics["test_acc"] > 0.6, metrics
    record = json.loads((study.path / "runs" / "frozen" / "baseline" / "seed0" / "run.json").read_text())
    assert record["pretrained"]["label"].startswith("ViT-S/14 DINOv2")
    assert record["pretrained"]["source_sha256"] == "cfcfb44adde2f2f255fc85bc7a42f552b273fa04061fe89c2285c370fc5a40b9"


def test_second_repro_trains_nothing_and_logs_no_run(study: DvcRepo) -> None:
    before = len(seed_runs(study))
    proc = study.dvc("repro")
    assert "Data and pipelines are up to date" in proc.stdout + proc.stderr
    assert len(seed_runs(study)) == before


def test_dvc_metrics_and_plots_read_the_runs(study: DvcRepo) -> None:
    shown = json.loads(study.dvc("metrics", "show", "--json").stdout)
    text = json.dumps(shown)
    for recipe in RECIPES:
        assert f"runs/scratch/{recipe}/seed0/metrics.json" in text
    plots = study.dvc("plots", "show", "--json").stdout
    assert "runs/frozen/paper/seed1/history.csv" in plots
    assert "reports/figures" in plots


def test_temp_experiment_logs_to_the_same_store(study: DvcRepo) -> None:
    """`dvc exp run --temp` runs in .dvc/tmp/exps/…; DVC_ROOT must lead the run back to the repo's store."""
    before = len(seed_runs(study))
    study.dvc("exp", "run", "--temp", "train-frozen@baseline-0", "-S", "train.epochs=1")
    runs = seed_runs(study)
    assert len(runs) == before + 1
    newest = max(runs, key=lambda r: r.info.start_time)
    assert newest.data.params["train.epochs"] == "1" and newest.info.status == "FINISHED"
    assert not list((study.path / ".dvc" / "tmp").rglob("mlflow.db"))


def test_predict_uses_a_runs_logged_weights(study: DvcRepo, tmp_path: Path) -> None:
    run = next(r for r in seed_runs(study) if r.data.tags["vit.variant"] == "frozen-paper" and r.data.tags["vit.seed"] == "0")
    image = next((study.path / "data" / "prepared" / "pizza_steak_sushi" / "test" / "sushi").glob("*.jpg"))
    plot = tmp_path / "prediction.png"
    proc = subprocess.run(
        [sys.executable, "-m", "vit_repro.cli", "predict", str(image), "--run", run.info.run_id, "--plot", str(plot)],
        cwd=study.path, env=study.env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]
    assert line.startswith(str(image)) and all(c in line for c in ("pizza", "steak", "sushi"))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
