"""The study in the MLflow UI, as a user sees it: `mlflow ui` on the repository's store, then a real browser.

The store is ``trained_study``'s (conftest: a real ``dvc repro`` of a tiny study: one variant, two seeds),
copied and served by ``mlflow ui`` on 127.0.0.1. The REST API must show the experiment's kind (model
training), the variant's parent run with its params, summary metrics and a duration spanning its seeds,
and the seeds nested below it. Headless Chromium opens the experiment with a fresh profile (no
``?workflowType=`` in the URL, nothing remembered from an earlier visit); the page it renders (``--dump-dom``)
must be the training runs table, not the GenAI "Overview" (traces, latency, "No data available"), and its
screenshot is saved for a human (the path is printed).

Chromium is Debian's ``chromium`` package (``apt-get install chromium``; CI installs it). Elsewhere the browser
tests are skipped when it is missing; in CI (``$CI`` set) they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TrainedStudy
from servers import MlflowServer

pytestmark = pytest.mark.slow

EXPERIMENT = "vit-repro/cpu"
VARIANT = "vit/225/baseline"
WINDOW = (1400, 900)
RUNS_TABLE = ("matching runs", "Run Name", "Duration")  # text only the training runs table has
GENAI_OVERVIEW = ("No data available", "Token Usage", "Latency")  # text of the GenAI overview


@pytest.fixture(scope="module")
def ui(trained_study: TrainedStudy, mlflow_servers, tmp_path_factory: pytest.TempPathFactory) -> MlflowServer:
    """`mlflow ui` on a copy of the study's store, as the README says to run it."""
    home = tmp_path_factory.mktemp("ui")
    shutil.copy2(trained_study.path / "mlflow.db", home / "mlflow.db")
    return mlflow_servers("ui", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", cwd=home)


@pytest.fixture(scope="module")
def experiment(ui: MlflowServer) -> dict:
    return ui.api("experiments/get-by-name", {"experiment_name": EXPERIMENT})["experiment"]


def runs(ui: MlflowServer, experiment_id: str, kind: str) -> list[dict]:
    return ui.api("runs/search", body={"experiment_ids": [experiment_id], "max_results": 1000,
                                       "filter": f"tags.`vit.role` = '{kind}'"}).get("runs", [])


def test_the_experiment_is_a_training_experiment_with_parents_that_summarise_their_seeds(
        ui: MlflowServer, experiment: dict) -> None:
    tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's "model training" kind

    (parent,) = runs(ui, experiment["experiment_id"], "variant")
    seeds = runs(ui, experiment["experiment_id"], "seed")
    parent_tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert parent["info"]["run_name"] == f"{VARIANT} · {parent_tags['vit.config_digest'][:8]}"
    assert parent["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["model"] == "vit:Ti/16" and params["train.epochs"] == "3" and params["image_size"] == "32"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert metrics["seeds_finished"] == 2 and 0 <= metrics["test_bacc_mean"] <= 1
    assert {"test_bacc_std", "test_acc_mean", "test_loss_mean"} <= set(metrics)

    assert len(seeds) == 2
    for seed in seeds:
        assert {"key": "mlflow.parentRunId", "value": parent["info"]["run_id"]} in seed["data"]["tags"]
        assert seed["info"]["status"] == "FINISHED"
        assert "epoch_test_balanced_acc" in {m["key"] for m in seed["data"]["metrics"]}
    # the parent's duration spans its seeds (not the few milliseconds of creating it)
    assert int(parent["info"]["start_time"]) <= min(int(s["info"]["start_time"]) for s in seeds)
    assert int(parent["info"]["end_time"]) >= max(int(s["info"]["end_time"]) for s in seeds)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        message = "headless Chromium not installed (Debian: apt-get install chromium; CI installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def browse(url: str, folder: Path, name: str) -> str:
    """Open ``url`` in headless Chromium with a fresh profile: save a screenshot, return the rendered page's text."""
    from PIL import Image

    screenshot = folder / f"{name}.png"
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={folder / f'profile-{name}'}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
         "--virtual-time-budget=15000", f"--screenshot={screenshot}", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0 and screenshot.is_file(), proc.stderr[-3000:]
    print(f"screenshot of {url}: {screenshot}")
    with Image.open(screenshot) as image:
        assert image.size == WINDOW
        colours = image.convert("RGB").getcolors(maxcolors=WINDOW[0] * WINDOW[1])
    assert len(colours) > 100, f"only {len(colours)} colours: a blank or error page ({screenshot})"
    return " ".join(re.sub(r"<style.*?</style>|<script.*?</script>|<!--.*?-->|<[^>]+>", " ", proc.stdout,
                           flags=re.S).split())


def assert_runs_table(text: str, parent_name: str) -> None:
    assert not any(s in text for s in GENAI_OVERVIEW), f"the GenAI overview, not the training runs: {text[:3000]}"
    assert all(s in text for s in RUNS_TABLE), text[:3000]
    assert parent_name in text, text[:3000]
    assert "3 matching runs" in text, text[:3000]  # the parent and its two seeds


@pytest.mark.xfail(strict=True, reason=(
    "MLflow 3.17's UI ignores mlflow.experimentKind: /#/experiments/<id> opens the view of the browser's "
    "remembered 'GenAI | Model training' switch (localStorage mlflow.workflowType, default GenAI), so a fresh "
    "browser lands on the GenAI overview whatever the experiment's tags say"))
def test_the_experiment_landing_page_is_the_training_runs_table(ui: MlflowServer, experiment: dict,
                                                                tmp_path: Path) -> None:
    (parent,) = runs(ui, experiment["experiment_id"], "variant")
    text = browse(f"{ui.url}/#/experiments/{experiment['experiment_id']}", tmp_path, "landing")
    assert_runs_table(text, parent["info"]["run_name"])


def test_the_experiment_runs_link_shows_the_training_runs_in_a_fresh_browser(ui: MlflowServer, experiment: dict,
                                                                             tmp_path: Path) -> None:
    """The experiment's runs page, ``/#/experiments/<id>/runs`` (no ``workflowType``), in a browser that has
    never visited MLflow: the runs table, with the variant's parent run and its duration."""
    (parent,) = runs(ui, experiment["experiment_id"], "variant")
    text = browse(f"{ui.url}/#/experiments/{experiment['experiment_id']}/runs", tmp_path, "runs")
    assert_runs_table(text, parent["info"]["run_name"])
    seconds = (int(parent["info"]["end_time"]) - int(parent["info"]["start_time"])) / 1000
    shown = f"{seconds:.1f}s" if seconds < 60 else f"{seconds / 60:.1f}min"
    assert shown in text, (shown, text[:3000])  # the parent's duration, in the table
