"""The report's statistics on data with known answers (src/vit_repro/report/stats.py).

Every p-value is checked against an independent computation (scipy / statsmodels called directly here),
and every verdict against what the corrected test supports.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from vit_repro.report import stats

ALPHA, MARGIN = 0.05, 0.02


def _paired_with_p(target: float, n: int, sd: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two seed vectors whose paired t-test gives p ≈ ``target`` (the difference is shifted to hit it)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, sd, n)
    noise -= noise.mean()
    sd = noise.std(ddof=1)
    shift = sps.t.ppf(1 - target / 2, n - 1) * sd / math.sqrt(n)
    base = rng.uniform(0.8, 0.9, n)
    return base + shift + noise, base


def test_a_raw_p_of_0_035_among_eight_comparisons_is_inconclusive_after_holm():
    a, b = _paired_with_p(0.035, n=5, sd=0.05)  # 5 seeds, a noisy few-point effect
    tests = [stats.paired("hit", "q", a, b, MARGIN, ALPHA)]
    rng = np.random.default_rng(1)
    for k in range(7):  # seven comparisons with nothing going on
        base = rng.uniform(0.8, 0.9, 5)
        tests.append(stats.paired(f"null{k}", "q", base + rng.normal(0, 0.05, 5), base, MARGIN, ALPHA))
    assert tests[0].p == pytest.approx(0.035, rel=1e-6)
    assert tests[0].p == pytest.approx(sps.ttest_rel(a, b).pvalue)
    family = stats.holm(tests, ALPHA)
    expected = multipletests([t.p for t in tests], method="holm")[1]
    assert [t.p_holm for t in family] == pytest.approx(list(expected))
    assert family[0].p_holm > ALPHA  # 0.035 does not survive 8 comparisons
    words = stats.verdict(family[0], ALPHA, MARGIN)
    assert words.startswith("inconclusive") and "better" not in words
    assert "detects ≥" in words  # the smallest detectable effect is stated


def test_a_large_consistent_effect_is_better_with_its_interval():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.5, 0.6, 10)
    t = stats.holm([stats.paired("big", "q", base + 0.10 + rng.normal(0, 0.01, 10), base, MARGIN, ALPHA)])[0]
    assert t.p_holm < 1e-6
    assert stats.verdict(t, ALPHA, MARGIN) == f"better by {100 * t.estimate:.1f} points (95% CI [{100 * t.low:+.1f}, {100 * t.high:+.1f}])"
    assert t.low < 0.10 < t.high
    worse = stats.holm([stats.paired("w", "q", base - 0.10 + rng.normal(0, 0.01, 10), base, MARGIN, ALPHA)])[0]
    assert stats.verdict(worse, ALPHA, MARGIN).startswith("worse by")


def test_identical_results_give_no_p_value_and_say_why():
    same = [0.8, 0.82, 0.85]
    t = stats.paired("same", "q", same, same, MARGIN, ALPHA)
    assert t.p is None and not t.testable
    assert "no test" in t.note and "same difference (+0.00" in t.note
    family = stats.holm([t])
    assert family[0].p_holm is None
    assert stats.verdict(family[0], ALPHA, MARGIN) == t.note  # no p-value is printed
    chance = stats.one_sample("c", "q", [1 / 3] * 3, 1 / 3, ALPHA)
    assert chance.p is None and "33.33 %" in chance.note


def test_a_collapsed_model_has_balanced_accuracy_at_chance_whichever_class_it_predicts():
    labels = np.array([0] * 25 + [1] * 19 + [2] * 31)  # the 75-image test split's classes
    for predicted in range(3):
        correct = (labels == predicted)[None, :]
        assert stats.balanced_accuracy(correct, labels, 3) == pytest.approx(1 / 3)
        assert correct.mean() == pytest.approx((labels == predicted).mean())  # accuracy: 33.3 / 25.3 / 41.3 %


def test_equivalence_needs_a_tight_interval_inside_the_margin():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.8, 0.9, 20)
    tight = stats.holm([stats.paired("t", "q", base + rng.normal(0, 0.003, 20), base, MARGIN, ALPHA)])[0]
    assert tight.tost_holm < ALPHA and -MARGIN < tight.low and tight.high < MARGIN
    assert stats.verdict(tight, ALPHA, MARGIN).startswith("equivalent within ±2.0 points")
    wide = stats.holm([stats.paired("w", "q", base + rng.normal(0, 0.05, 20), base, MARGIN, ALPHA)])[0]
    assert not (-MARGIN < wide.low and wide.high < MARGIN)  # the 95% interval leaves the margin
    assert stats.verdict(wide, ALPHA, MARGIN).startswith("inconclusive")


def test_minimal_detectable_effect_matches_statsmodels_power():
    from statsmodels.stats.power import TTestPower

    rng = np.random.default_rng(4)
    base = rng.uniform(0.8, 0.9, 20)
    treated = base + rng.normal(0, 0.026, 20)
    t = stats.paired("m", "q", treated, base, MARGIN, ALPHA / 8)
    sd = np.std(treated - base, ddof=1)
    assert t.mde == pytest.approx(TTestPower().solve_power(nobs=20, alpha=ALPHA / 8, power=0.8) * sd)
    # a design with power 0.8 at the MDE: the noncentral t says so
    assert TTestPower().power(effect_size=t.mde / sd, nobs=20, alpha=ALPHA / 8) == pytest.approx(0.8, abs=1e-6)


def test_welch_and_interaction_agree_with_direct_computation():
    import statsmodels.api as sm

    rng = np.random.default_rng(5)
    a_lo, a_hi, b_lo, b_hi = (rng.normal(m, 0.02, 6) for m in (0.45, 0.50, 0.60, 0.61))
    w = stats.welch("w", "q", a_hi, a_lo, MARGIN, ALPHA)
    assert w.p == pytest.approx(sps.ttest_ind(a_hi, a_lo, equal_var=False).pvalue)
    assert w.estimate == pytest.approx(a_hi.mean() - a_lo.mean())
    i = stats.interaction("i", "q", a_lo, a_hi, b_lo, b_hi, ALPHA)
    assert i.estimate == pytest.approx((a_hi.mean() - a_lo.mean()) - (b_hi.mean() - b_lo.mean()))
    y = np.concatenate([a_lo, a_hi, b_lo, b_hi])
    is_a = np.repeat([1.0, 1.0, 0.0, 0.0], 6)
    hi = np.repeat([0.0, 1.0, 0.0, 1.0], 6)
    fit = sm.OLS(y, np.column_stack([np.ones(24), is_a, hi, is_a * hi])).fit(cov_type="HC3")
    assert i.p == pytest.approx(fit.pvalues[3])


def test_bootstrap_over_seeds_and_images_covers_the_observed_difference():
    rng = np.random.default_rng(6)
    labels = np.repeat([0, 1, 2], 70)
    a = rng.random((10, 210)) < 0.8
    b = rng.random((10, 210)) < 0.7
    low, high = stats.bootstrap([a, b], [1, -1], labels, 3, paired=True, draws=1000)
    observed = stats.balanced_accuracy(a, labels, 3) - stats.balanced_accuracy(b, labels, 3)
    assert low < observed < high
    assert 0.02 < high - low < 0.2  # image resampling makes it wider than the seed noise alone
    assert (low, high) == stats.bootstrap([a, b], [1, -1], labels, 3, paired=True, draws=1000)  # seeded
