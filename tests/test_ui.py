"""The path users take to look at a study: `mlflow ui` on the repository's store, then a browser.

A tiny study (scratch Ti/16 at 32 px, recipe baseline, seeds 0 and 1, 1 epoch) is trained in-process
into a fresh SQLite store laid out as `dvc repro` leaves it (test_pipeline.py covers the DVC side);
`mlflow ui` serves that store on 127.0.0.1. The REST API must show the experiment, every run and its
metrics; headless Chromium must render the runs table (a non-blank screenshot, the runs in the page).

Chromium is Debian's ``chromium`` package; CI installs it (.ci/run). Elsewhere the browser test is
skipped when it is missing, in CI (``$CI`` set) it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from servers import MlflowServer
from test_config import write_params
from vit_repro import tracking, train
from vit_repro.config import load_params, resolve_run

pytestmark = pytest.mark.slow

STUDY = "cpu-small"
SEEDS = [0, 1]
WINDOW = (1400, 900)


@dataclass
class Study:
    root: Path  # the project root: mlflow.db, mlartifacts/ and runs/ as `dvc repro` leaves them
    ui: MlflowServer


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, repo_root: Path, prepared_dir: Path, mlflow_servers) -> Study:
    """Two seeds trained in-process into a fresh store, served by `mlflow ui` as the README says to run it.

    The store is created first; `mlflow ui --backend-store-uri sqlite:///<root>/mlflow.db` then starts
    while the seeds train (both only open the existing store), and is waited for afterwards.
    """
    root = tmp_path_factory.mktemp("ui-study")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    updates = {"study": {"name": STUDY, "seeds": SEEDS, "recipes": ["baseline"]}, "scratch": {"image_size": 32},
               "train": {"epochs": 1, "device": "cpu", "checkpoint": False}}
    params = load_params(write_params(root / "params.yaml", updates))
    with tracking.store_lock(uri):
        MlflowClient(uri).search_experiments()  # the schema, before two processes open the store
    ui = mlflow_servers("ui", "--backend-store-uri", uri, cwd=root, wait=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared; contending threads are much slower
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            mp.setenv("DVC_ROOT", str(root))
            mp.delenv("VIT_REPRO_DEVICE", raising=False)
            for seed in SEEDS:
                cfg = resolve_run(params, "scratch", "baseline", seed, repo_root / "experiments")
                train.run(cfg, prepared_dir, root / "runs" / "scratch" / "baseline" / f"seed{seed}",
                          cache_dir=root / "cache", progress=False)
    finally:
        torch.set_num_threads(threads)
    return Study(root, ui.wait_ready())


def stage_records(study: Study) -> dict[str, dict]:
    """{MLflow run id: run.json} of every training run's outputs."""
    records = [json.loads(p.read_text()) for p in (study.root / "runs").glob("*/*/seed*/run.json")]
    return {r["mlflow"]["run_id"]: r for r in records}


def all_runs(ui: MlflowServer, experiment_id: str) -> list[dict]:
    return ui.api("runs/search", body={"experiment_ids": [experiment_id], "max_results": 1000}).get("runs", [])


def test_ui_shows_the_experiment_every_run_and_their_metrics(study: Study) -> None:
    ui = study.ui
    experiments = ui.api("experiments/search", {"max_results": 100})["experiments"]
    experiment = next(e for e in experiments if e["name"] == f"vit-repro/{STUDY}")
    records = stage_records(study)
    assert len(records) == len(SEEDS)

    runs = all_runs(ui, experiment["experiment_id"])
    seeds = {r["info"]["run_id"]: r for r in runs if {"key": "vit.kind", "value": "seed"} in r["data"]["tags"]}
    assert set(seeds) == set(records)  # every stage's run, and nothing else
    for run_id, record in records.items():
        run = seeds[run_id]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        stage_metrics = json.loads((study.root / "runs" / "scratch" / "baseline" / f"seed{record['seed']}" /
                                    "metrics.json").read_text())
        assert metrics["final_test_acc"] == pytest.approx(stage_metrics["test_acc"])
        history = ui.api("metrics/get-history", {"run_id": run_id, "metric_key": "epoch_test_acc"})["metrics"]
        assert [m["step"] for m in history] == [1]

    (parent,) = [r for r in runs if r["info"]["run_id"] not in seeds]  # the variant's run, seeds nested under it
    assert parent["info"]["run_name"] == "scratch-baseline" and parent["info"]["status"] == "FINISHED"
    for run in seeds.values():
        assert {"key": "mlflow.parentRunId", "value": parent["info"]["run_id"]} in run["data"]["tags"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        message = "headless Chromium not installed (Debian: apt-get install chromium; CI installs it in .ci/run)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def test_runs_table_renders_in_headless_chromium(study: Study, tmp_path: Path) -> None:
    from PIL import Image

    ui = study.ui
    browser = chromium()
    experiment = ui.api("experiments/get-by-name", {"experiment_name": f"vit-repro/{STUDY}"})["experiment"]
    total = len(all_runs(ui, experiment["experiment_id"]))
    # the "Model training" view of the experiment: its runs table (MLflow 3 opens on the GenAI overview)
    url = f"{ui.url}/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning"
    screenshot = tmp_path / "runs-table.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
         "--virtual-time-budget=15000", f"--screenshot={screenshot}", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0 and screenshot.is_file(), proc.stderr[-3000:]

    with Image.open(screenshot) as image:
        assert image.size == WINDOW
        colours = image.convert("RGB").getcolors(maxcolors=WINDOW[0] * WINDOW[1])
    commonest = max(count for count, _ in colours)
    assert len(colours) > 100, f"only {len(colours)} colours: a blank or error page"
    assert commonest < 0.9 * WINDOW[0] * WINDOW[1], "one colour covers 90% of the page: nothing rendered"

    # the page after its scripts ran, as text: the runs table the screenshot shows, with every run counted
    text = " ".join(re.sub(r"<!--.*?-->|<[^>]+>", " ", proc.stdout).split())
    assert "scratch-baseline" in text, text[-2000:]
    assert f"{total} matching runs" in text, text[-2000:]
