"""The report: statistics against hand-computed values, and a full render of a synthetic runs folder.

The runs folder is written by ``tests/runs_fixture.py`` in the exact schema of docs/run-outputs.md
(no training). The end-to-end test on a real small study lives elsewhere.
"""

from __future__ import annotations

import math
import re
import statistics

import pytest

from runs_fixture import TEST_COUNTS, fixture_params, write_run
from vit_repro import paper
from vit_repro.config import PAPER_WARMUP_STEPS
from vit_repro.report import (
    build_report,
    fmt_num,
    load_study,
    markdown_table,
    paired_test,
    summarize,
    verdict,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T_975_DF2 = 4.302653  # Student t quantile t(0.975, df=2), from tables
T_975_DF1 = 12.706205  # t(0.975, df=1) = tan(0.475 * pi)


# ----------------------------------------------------------------------------- statistics, by hand

def test_summary_mean_std_interval():
    s = summarize([0.5, 0.6, 0.7])
    # mean = 1.8 / 3 = 0.6; std (ddof=1) = sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    # half-width = t(0.975, 2) * 0.1 / sqrt(3) = 4.302653 * 0.057735 = 0.248414
    assert s.n == 3
    assert s.mean == pytest.approx(0.6)
    assert s.std == pytest.approx(0.1)
    assert s.ci_low == pytest.approx(0.6 - 0.248414, abs=1e-6)
    assert s.ci_high == pytest.approx(0.6 + 0.248414, abs=1e-6)


def test_summary_single_value_has_no_interval():
    s = summarize([0.8])
    assert (s.n, s.mean) == (1, 0.8)
    assert math.isnan(s.std) and math.isnan(s.ci_low) and math.isnan(s.ci_high)
    assert summarize([]).n == 0
    assert summarize([0.5, float("nan"), 0.7]).n == 2  # NaN (not recorded) is left out


def test_paired_within_noise():
    # differences 0.50-0.40, 0.55-0.50, 0.75-0.60 = [0.10, 0.05, 0.15]: mean 0.10, sd 0.05, se 0.05/sqrt(3) = 0.028868
    # t = 0.10 / 0.028868 = 2*sqrt(3) = 3.464102; with df = 2 the t CDF is closed-form:
    # p = P(|T| > t) = 1 - t / sqrt(2 + t^2) = 1 - 3.464102 / sqrt(14) = 1 - 0.925820 = 0.074180
    # interval = 0.10 ± 4.302653 * 0.028868 = 0.10 ± 0.124207 -> [-0.024207, 0.224207], contains 0
    d = paired_test({0: 0.50, 1: 0.55, 2: 0.75}, {0: 0.40, 1: 0.50, 2: 0.60})
    assert d.n == 3
    assert d.mean == pytest.approx(0.10)
    assert d.std == pytest.approx(0.05)
    assert d.t == pytest.approx(3.464102, abs=1e-6)
    assert d.p == pytest.approx(0.074180, abs=1e-6)
    assert (d.ci_low, d.ci_high) == (pytest.approx(-0.024207, abs=1e-6), pytest.approx(0.224207, abs=1e-6))
    assert verdict(d) == "within seed noise (p=0.074, n=3)"


def test_paired_significant_better_and_worse():
    # differences [0.10, 0.11, 0.12]: mean 0.11, sd 0.01, se 0.01/sqrt(3) = 0.0057735
    # t = 0.11 / 0.0057735 = 11*sqrt(3) = 19.052559; p = 1 - t / sqrt(2 + t^2) = 1 - 19.052559 / sqrt(365) = 0.002743
    # interval = 0.11 ± 4.302653 * 0.0057735 = 0.11 ± 0.024841 -> [0.085159, 0.134841]
    better = paired_test({0: 0.50, 1: 0.61, 2: 0.72}, {0: 0.40, 1: 0.50, 2: 0.60})
    assert better.t == pytest.approx(19.052559, abs=1e-5)
    assert better.p == pytest.approx(0.002743, abs=1e-6)
    assert (better.ci_low, better.ci_high) == (pytest.approx(0.085159, abs=1e-6), pytest.approx(0.134841, abs=1e-6))
    assert verdict(better) == "better by 11.0 points (95% CI +8.5 to +13.5, p=0.003, n=3)"
    worse = paired_test({0: 0.40, 1: 0.50, 2: 0.60}, {0: 0.50, 1: 0.61, 2: 0.72})
    assert worse.p == pytest.approx(0.002743, abs=1e-6)
    assert verdict(worse).startswith("worse by 11.0 points")
    # for a loss, lower is better
    assert verdict(worse, scale=1.0, unit="", higher_is_better=False).startswith("better by 0.1")


def test_paired_two_seeds_uses_one_degree_of_freedom():
    # differences [0.1, 0.3]: mean 0.2, sd sqrt(0.02) = 0.141421, se 0.141421/sqrt(2) = 0.1, t = 2
    # df = 1 (Cauchy): p = 1 - (2/pi) * atan(2) = 1 - 0.704833 = 0.295167
    # interval = 0.2 ± 12.706205 * 0.1 = [-1.070620, 1.470620]
    d = paired_test({3: 0.5, 7: 0.7}, {3: 0.4, 7: 0.4})
    assert d.n == 2 and d.t == pytest.approx(2.0)
    assert d.p == pytest.approx(0.295167, abs=1e-6)
    assert d.ci_low == pytest.approx(0.2 - T_975_DF1 * 0.1, abs=1e-6)
    assert verdict(d) == "within seed noise (p=0.295, n=2)"


def test_paired_only_common_seeds_and_degenerate_cases():
    # seed 1 has no reference: only seeds 0 and 2 pair
    assert paired_test({0: 0.5, 1: 0.9, 2: 0.6}, {0: 0.4, 2: 0.5}).n == 2
    # identical differences: zero variance, no division by zero
    same = paired_test({0: 0.45, 1: 0.55}, {0: 0.40, 1: 0.50})
    assert (same.std, same.p, same.ci_low, same.ci_high) == (0.0, 0.0, pytest.approx(0.05), pytest.approx(0.05))
    assert verdict(same).startswith("better by 5.0 points")
    tie = paired_test({0: 1 / 3, 1: 1 / 3}, {0: 1 / 3, 1: 1 / 3})  # both collapsed to the same class
    assert (tie.mean, tie.p) == (0.0, 1.0)
    assert verdict(tie).startswith("within seed noise (identical in every seed")
    one = paired_test({0: 0.6}, {0: 0.4})
    assert one.n == 1 and math.isnan(one.p)
    assert verdict(one).startswith("not testable: 1 paired seed (difference +20.0 points")
    assert verdict(paired_test({}, {0: 0.4})).startswith("not compared")


def test_formatting_helpers():
    assert [fmt_num(x) for x in (1e-3, 8e-4, 3e-3, 0.03, 0.1, 4096, 0, None)] == [
        "1e-3", "8e-4", "3e-3", "0.03", "0.1", "4096", "0", "none"]
    import pandas as pd

    table = markdown_table(pd.DataFrame([{"a": "x|y", "b": 1}]))
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


def test_paper_constants_agree_with_config():
    assert paper.WARMUP_STEPS == PAPER_WARMUP_STEPS == 10_000
    assert paper.BATCH_SIZE == 4096 and paper.FINETUNE["resolution"] == 384
    assert paper.SEED_RESULTS["scratch"]["correct"] == 25 and paper.SEED_RESULTS["frozen"]["correct"] == 69


# ----------------------------------------------------------------------------- rendering

RECIPES, SEEDS = ("baseline", "warmup", "paper"), (0, 1)
CORRECT = {  # (pizza, steak, sushi) correct of (25, 19, 31), or the one class a collapsed run predicts
    ("scratch", "baseline", 0): "pizza", ("scratch", "baseline", 1): "pizza",
    ("scratch", "warmup", 0): (20, 10, 15),
    ("scratch", "paper", 0): (22, 12, 20), ("scratch", "paper", 1): (20, 11, 19),
    ("frozen", "baseline", 0): (24, 17, 29), ("frozen", "baseline", 1): (23, 18, 28),
    ("frozen", "warmup", 0): (24, 18, 29), ("frozen", "warmup", 1): (22, 17, 30),
    ("frozen", "paper", 0): (25, 18, 30), ("frozen", "paper", 1): (25, 19, 31),
}
MISSING = ("scratch", "warmup", 1)
FAILED = ("frozen", "paper", 1)
LOSS = {k: 1.2 - 0.01 * i for i, k in enumerate(sorted(CORRECT))}


def _acc(correct) -> float:
    n = TEST_COUNTS[correct] if isinstance(correct, str) else sum(correct)
    return n / sum(TEST_COUNTS.values())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A study with one missing and one failed run, rendered twice into two folders."""
    root = tmp_path_factory.mktemp("study")
    params = fixture_params(RECIPES, SEEDS)
    for key, correct in CORRECT.items():
        status = "FAILED" if key == FAILED else "FINISHED"
        write_run(root / "runs", params, *key, correct, test_loss=LOSS[key], status=status)
    first = build_report(root / "runs", params, root / "a")
    second = build_report(root / "runs", params, root / "b")
    return params, root, first, second


def _row(text: str, first_cell: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert rows, f"no table row for {first_cell}"
    return rows[0]


def test_report_has_every_section_and_variant(built):
    params, _, report, _ = built
    text = report.read_text()
    assert report.name == "report.md"
    for heading in ("## 1. Settings against the paper", "## 2. Results", "## 3. What the paper's recipe changes",
                    "## 4. Figures", "## 5. Model", "## 6. Provenance"):
        assert heading in text
    assert text.startswith("# ")
    for backbone in ("scratch", "frozen"):
        for recipe in RECIPES:
            assert f"| {backbone}-{recipe} |" in text
    head = "\n".join(text.splitlines()[:12])
    assert "cpu-small" in head and "cpu (x86_64, 2 threads), fp32" in head and "pizza_steak_sushi" in head
    assert "frozen = ViT-S/14 DINOv2" in head  # the local backbone, never called ViT-B/16 ImageNet
    assert "ViT-Ti/16 from scratch" in head


def test_report_flags_missing_and_failed_runs(built):
    _, _, report, _ = built
    text = report.read_text()
    banner = [line for line in text.splitlines()[:20] if line.startswith(">")]
    assert "Incomplete study: 1 of 12 runs missing, 1 failed." in banner[0]
    assert any("runs/scratch/warmup/seed1" in line and "missing" in line for line in banner)
    assert any("runs/frozen/paper/seed1" in line and "failed" in line for line in banner)
    assert "**failed**: run status FAILED" in _row(text.split("Every run:")[1], "frozen-paper | 1")
    results = text.split("## 2. Results")[1]
    assert "| 1 of 2 |" in _row(results, "frozen-paper")  # the failed run is not in the statistics


def test_report_shows_paper_values(built):
    _, _, report, _ = built
    text = report.read_text()
    for value in ("4096", "10,000", "10k", "1e-3", "8e-4", "3e-3", "0.03", "SGD, momentum 0.9", "512", "384", "86M",
                  "coupled L2 (torch.optim.Adam)", "not stated", "9 of 80 steps"):
        assert value in text, value
    assert "33.3 (25/75; printed 0.2604)" in text and "92.0 (69/75; printed 0.9176)" in text
    assert "**differs**" in text


def test_report_numbers_equal_the_runs(built):
    _, _, report, _ = built
    text = report.read_text()
    results = text.split("## 2. Results")[1].split("Every run:")[0]
    for backbone in ("scratch", "frozen"):
        for recipe in RECIPES:
            keys = [(backbone, recipe, s) for s in SEEDS if (backbone, recipe, s) in CORRECT
                    and (backbone, recipe, s) not in (MISSING, FAILED)]
            accs = [_acc(CORRECT[k]) for k in keys]
            losses = [LOSS[k] for k in keys]
            row = _row(results, f"{backbone}-{recipe}")
            if len(keys) >= 2:
                assert f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}" in row
                assert f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}" in row
            else:
                assert f"| {100 * accs[0]:.2f} | none (n<2) |" in row
    # paired: scratch paper vs baseline over seeds 0, 1
    diffs = [_acc(CORRECT[("scratch", "paper", s)]) - _acc(CORRECT[("scratch", "baseline", s)]) for s in SEEDS]
    assert f"+{100 * statistics.mean(diffs):.2f}" in _row(text, "scratch | paper")
    assert "scratch-baseline: **collapsed**: 2 of 2 seeds (always 'pizza')" in text
    assert "yes ('pizza')" in _row(text.split("Every run:")[1], "scratch-baseline | 0")


def test_report_figures_exist_and_are_png(built):
    _, _, report, _ = built
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    assert len(links) >= 7
    for link in links:
        path = report.parent / link
        assert path.is_file(), link
        assert path.read_bytes()[:8] == PNG_SIGNATURE, link


def test_report_provenance(built):
    _, _, report, _ = built
    text = report.read_text().split("## 6. Provenance")[1]
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in text
    assert "#/experiments/1/runs/" in text
    assert "cfcfb44adde2f2f255fc85bc7a42f552b273fa04061fe89c2285c370fc5a40b9" in text
    assert "last run finished 2025-01-01T" in text
    assert "| scratch-warmup | 1 | missing | none |" in text


def test_report_is_byte_identical_when_rebuilt(built):
    _, _, first, second = built
    assert first.read_bytes() == second.read_bytes()
    names = sorted(p.name for p in (first.parent / "figures").glob("*.png"))
    assert names == sorted(p.name for p in (second.parent / "figures").glob("*.png"))
    for name in names:
        assert (first.parent / "figures" / name).read_bytes() == (second.parent / "figures" / name).read_bytes(), name


def test_complete_study_has_no_banner_and_single_seed_has_no_interval(tmp_path):
    params = fixture_params(("baseline",), (0,))
    write_run(tmp_path / "runs", params, "scratch", "baseline", 0, "sushi")
    write_run(tmp_path / "runs", params, "frozen", "baseline", 0, (24, 18, 30))
    study = load_study(tmp_path / "runs", params)
    assert list(study.runs["status"]) == ["finished", "finished"]
    text = build_report(tmp_path / "runs", params, tmp_path / "reports").read_text()
    assert "Incomplete study" not in text
    assert "complete, all 2 runs finished" in text
    assert "none (n<2)" in text
