"""The report on synthetic run sets with known answers (tests/runs_fixture.py): verdicts, flags, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from runs_fixture import EXPERIMENTS, fixture_params, predictions, write_run
from vit_repro.core.config import resolve_study
from vit_repro.report import build_report
from vit_repro.report.analysis import analyse
from vit_repro.report.load import FAILED, FINISHED, MISSING, STALE, load_study

ACCURACY = {"vit/225/baseline": None, "vit/225/clip": 0.6, "head/225/baseline": 0.8, "head/225/clip": 0.97,
            "head/225/baseline-keep-last": 0.8, "head/225/clip-keep-last": 0.8, "head/450/baseline": 0.85,
            "probe/225/converged": 0.9, "probe/450/converged": 0.92}


@pytest.fixture
def study(tmp_path: Path):
    """A finished synthetic study: the scratch baseline collapsed to pizza, clipping helps the head a lot."""
    params = fixture_params(tmp_path)
    runs = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for cfg in resolve_study(params, EXPERIMENTS):
        p = ACCURACY[cfg.variant]
        write_run(runs, cfg, 0 if p is None else predictions(p, rng))
    return params, runs


def _report(params, runs: Path, out: Path) -> str:
    return build_report(runs, params, out, experiments=EXPERIMENTS).read_text()


def test_verdicts_follow_the_holm_corrected_tests(study, tmp_path):
    params, runs = study
    loaded = load_study(runs, params, EXPERIMENTS)
    family = analyse(loaded)
    testable = [t for t in family.tests if t.testable]
    assert [t.p_holm for t in testable] == pytest.approx(list(multipletests([t.p for t in testable], method="holm")[1]))
    clip = family.get("recipe:head/225/clip")
    assert clip.p_holm < 0.05 and family.verdict(clip).startswith("better by")
    assert family.get("chance:head/225/baseline").p_holm < 0.05
    text = _report(params, runs, tmp_path / "reports")
    assert "above chance by" in text
    assert "| head, 225 images: `clip` against `baseline` |" in text


def test_a_collapsed_arm_is_at_chance_and_gets_no_p_value(study, tmp_path):
    params, runs = study
    loaded = load_study(runs, params, EXPERIMENTS)
    for run in loaded.seeds("vit/225/baseline"):
        assert run.record.test.collapsed
        assert run.record.test.balanced_accuracy == pytest.approx(1 / 3)
        assert run.record.test.accuracy == pytest.approx(1 / 3)  # 10 of 30 are pizza
    chance = analyse(loaded).get("chance:vit/225/baseline")
    assert chance.p is None and chance.note == "no test: every seed scores 33.33 %"
    text = _report(params, runs, tmp_path / "reports")
    assert "| vit/225/baseline | 4 of 4 | 33.3 | [33.3, 33.3] | 33.3 | 1.167 |" in text  # balanced acc, CI, accuracy, loss
    assert "| vit | 225 | baseline | 4 | 33.3 |" in text and "4 of 4 (pizza)" in text
    # every comparison without a test prints no p-value (test tables have a p and a Holm p column)
    for line in text.splitlines():
        if "no test:" in line and line.count(" | ") >= 10:
            assert "| no test | no test |" in line


def test_incomplete_or_damaged_runs_are_named_with_the_file_and_field(study, tmp_path):
    params, runs = study
    shutil.rmtree(runs / "head/225/clip/seed4")
    record = runs / "head/225/clip/seed3/run.json"
    raw = json.loads(record.read_text())
    raw["test"]["balanced_accuracy"] = "high"
    record.write_text(json.dumps(raw))
    stale = runs / "head/225/clip/seed2/run.json"
    raw = json.loads(stale.read_text())
    raw["config"]["train"]["lr"] = 0.5
    stale.write_text(json.dumps(raw))
    loaded = load_study(runs, params, EXPERIMENTS)
    status = {r.config.run_name: r for r in loaded.runs}
    assert status["head/225/clip/seed4"].status == MISSING
    assert status["head/225/clip/seed3"].status == FAILED
    assert "run.json: field test.balanced_accuracy" in status["head/225/clip/seed3"].reason
    assert status["head/225/clip/seed2"].status == STALE and "train.lr" in status["head/225/clip/seed2"].reason
    assert status["head/225/clip/seed1"].status == FINISHED
    text = _report(params, runs, tmp_path / "reports")
    assert "**Incomplete study: 1 missing, 1 failed, 1 stale" in text
    assert "`runs/head/225/clip/seed3`: **failed**" in text
    assert "| head/225/clip | 2 of 5 |" in text  # statistics from the finished runs only


def test_the_same_runs_give_byte_identical_outputs_without_machine_paths(study, tmp_path):
    params, runs = study
    a, b = tmp_path / "a", tmp_path / "b"
    _report(params, runs, a)
    _report(params, runs, b)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert {"report.md", "metrics.json", "plots/curves.csv"} <= {f.as_posix() for f in files}
    assert len([f for f in files if f.suffix == ".png"]) == 7
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    text = (a / "report.md").read_text()
    assert str(tmp_path) not in text and "/tmp" not in text
    assert "mlflow ui --backend-store-uri 'sqlite:///mlflow.db'" in text
    metrics = json.loads((a / "metrics.json").read_text())
    assert metrics["variants"]["head/225/clip"]["n"] == 5
    assert metrics["runs_finished"] == metrics["runs_expected"]


def test_settings_claim_same_only_for_the_same_value_under_the_same_conditions(study, tmp_path):
    params, runs = study
    text = _report(params, runs, tmp_path / "reports")
    lr = next(line for line in text.splitlines() if line.startswith("| Base learning rate |"))
    assert "**differs**" in lr and "(square root)" in lr and "(linear)" in lr
    assert "| Batch size | 4096 (Table 3 caption) | 32 | **differs** |" in text
    wd = next(line for line in text.splitlines() if line.startswith("| Weight decay / L2 |"))
    assert "| 0 | same |" in wd or "**differs**" in wd  # the head's 0 is the paper's 0; the probe's C differs
    for line in text.splitlines():
        if line.startswith("| ") and " | same | " in line:
            assert "**differs**" not in line
