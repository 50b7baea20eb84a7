"""The report's statistics: summaries over seeds, the test behind every verdict, Holm's correction, power.

Every p-value and power figure comes from scipy or statsmodels. The primary metric is balanced accuracy
(mean per-class recall), so a model that predicts one class scores 1/k whichever class it picks.

Each comparison is a ``Test``: an estimate (in balanced-accuracy fraction) with its Student-t interval
over seeds, a two-sided p-value, an equivalence (TOST) p-value at the declared margin, Cohen's effect
size, the minimal detectable effect at 80 % power, and a bootstrap interval over seeds *and* test images
(the seed-level interval treats the 211 test images as fixed; the bootstrap lets them vary too). ``holm``
corrects a family of tests, and ``verdict`` turns a corrected test into words.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

POWER = 0.8


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof 1) and Student-t interval of the mean over independent values (seeds)."""

    n: int
    mean: float
    std: float
    low: float
    high: float


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    x = np.asarray([v for v in values if v == v], dtype=float)
    if len(x) == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    if len(x) == 1:
        return Summary(1, float(x[0]), math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return Summary(len(x), float(x.mean()), std, float(x.mean()) - half, float(x.mean()) + half)


@dataclass(frozen=True)
class Test:
    """One comparison of the report's family.

    Attributes:
        key: a stable id (``recipe:vit/225/clip``); ``question``: what it answers, in words.
        kind: ``paired`` (by seed: same initialisation and data order), ``welch`` (independent groups),
            ``chance`` (one sample against 1/k), ``reference`` (one sample against a fixed value) or
            ``interaction`` (a difference of differences, OLS with HC3 errors).
        n: seeds on each side. ``estimate``, ``low``, ``high``: the difference and its t-interval.
        effect: Cohen's d (dz when paired). ``p``: two-sided; ``tost_p``: equivalence within ±margin
            (None where equivalence is not asked). ``mde``: the smallest difference detectable with 80 %
            power at the family's strictest level. ``boot_low``/``boot_high``: bootstrap over seeds and
            test images. ``note``: why there is no test. ``p_holm``/``tost_holm``: set by ``holm``.
    """

    key: str
    question: str
    kind: str
    n: tuple[int, ...]
    estimate: float
    low: float = math.nan
    high: float = math.nan
    effect: float = math.nan
    p: float | None = None
    tost_p: float | None = None
    mde: float = math.nan
    boot_low: float = math.nan
    boot_high: float = math.nan
    note: str = ""
    p_holm: float | None = None
    tost_holm: float | None = None
    words: tuple[str, str] = ("better", "worse")  # for a positive / negative difference

    @property
    def testable(self) -> bool:
        return self.p is not None


def _tiny(sd: float, scale: float) -> bool:
    return sd <= 1e-12 * max(1.0, abs(scale))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


def paired(key: str, question: str, a: Sequence[float], b: Sequence[float], margin: float, alpha: float,
           confidence: float = 0.95) -> Test:
    """``a - b`` paired by seed: t-test (scipy ``ttest_rel``), TOST at ±margin, dz, MDE."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a - b
    n = len(d)
    if n < 2:
        return Test(key, question, "paired", (n, n), float(d.mean()) if n else math.nan, note=f"no test: {n} paired seed(s)")
    s = summarize(d, confidence)
    if _tiny(s.std, s.mean):
        return Test(key, question, "paired", (n, n), s.mean, s.mean, s.mean,
                    note=f"no test: every seed gives the same difference ({100 * s.mean:+.2f} points)")
    p = float(_quiet(stats.ttest_rel, a, b).pvalue)
    tost = float(_quiet(ttost_paired, a, b, -margin, margin)[0])
    mde = float(TTestPower().solve_power(nobs=n, alpha=alpha, power=POWER)) * s.std
    return Test(key, question, "paired", (n, n), s.mean, s.low, s.high, s.mean / s.std, p, tost, mde)


def welch(key: str, question: str, a: Sequence[float], b: Sequence[float], margin: float | None, alpha: float,
          confidence: float = 0.95) -> Test:
    """``mean(a) - mean(b)`` for independent groups: Welch's t-test and interval, TOST (Welch), Cohen's d, MDE."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    est = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return Test(key, question, "welch", (len(a), len(b)), est, note="no test: fewer than 2 seeds on a side")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if _tiny(math.sqrt(va + vb), est):
        return Test(key, question, "welch", (len(a), len(b)), est, est, est,
                    note="no test: every seed of both groups scores the same")
    result = _quiet(stats.ttest_ind, a, b, equal_var=False)
    ci = result.confidence_interval(confidence)
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    tost = float(_quiet(ttost_ind, a, b, -margin, margin, usevar="unequal")[0]) if margin is not None else None
    d = float(TTestIndPower().solve_power(nobs1=len(a), ratio=len(b) / len(a), alpha=alpha, power=POWER))
    return Test(key, question, "welch", (len(a), len(b)), est, float(ci.low), float(ci.high),
                est / pooled if pooled else math.nan, float(result.pvalue), tost, d * pooled)


def one_sample(key: str, question: str, a: Sequence[float], value: float, alpha: float, kind: str = "chance",
               confidence: float = 0.95) -> Test:
    """``mean(a) - value``: one-sample t-test (two-sided) and interval, Cohen's d, MDE. No equivalence claim."""
    a = np.asarray(a, float)
    n = len(a)
    est = float(a.mean() - value) if n else math.nan
    if n < 2:
        return Test(key, question, kind, (n,), est, note=f"no test: {n} seed(s)")
    s = summarize(a - value, confidence)
    if _tiny(s.std, s.mean):
        return Test(key, question, kind, (n,), est, est, est,
                    note=f"no test: every seed scores {100 * a[0]:.2f} %")
    p = float(_quiet(stats.ttest_1samp, a, value).pvalue)
    mde = float(TTestPower().solve_power(nobs=n, alpha=alpha, power=POWER)) * s.std
    return Test(key, question, kind, (n,), est, s.low, s.high, est / s.std, p, None, mde)


def interaction(key: str, question: str, a_low: Sequence[float], a_high: Sequence[float], b_low: Sequence[float],
                b_high: Sequence[float], alpha: float, confidence: float = 0.95) -> Test:
    """(A_high - A_low) - (B_high - B_low) for four independent groups: OLS with HC3 standard errors.

    The MDE is the normal-theory (t_{1-alpha/2} + t_{power}) x SE with the residual degrees of freedom.
    """
    import statsmodels.api as sm

    groups = [(1.0, 0.0, a_low), (1.0, 1.0, a_high), (0.0, 0.0, b_low), (0.0, 1.0, b_high)]
    sizes = tuple(len(g) for *_, g in groups)
    if min(sizes) < 2:
        return Test(key, question, "interaction", sizes, math.nan, note="no test: fewer than 2 seeds in a group")
    is_a = np.array([f for f, _, g in groups for _ in g])
    high = np.array([h for _, h, g in groups for _ in g])
    y = np.concatenate([np.asarray(g, float) for *_, g in groups])
    fit = sm.OLS(y, np.column_stack([np.ones_like(y), is_a, high, is_a * high])).fit(cov_type="HC3")
    est, se = float(fit.params[3]), float(fit.bse[3])
    low, high_ = (float(v) for v in fit.conf_int(1 - confidence)[3])
    df = fit.df_resid
    mde = float(stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(POWER, df)) * se
    return Test(key, question, "interaction", sizes, est, low, high_, math.nan, float(fit.pvalues[3]), None, mde)


def holm(tests: list[Test], alpha: float = 0.05) -> list[Test]:
    """Holm-adjusted p-values over the testable members of the family (and, separately, their TOST p-values)."""
    out = list(tests)
    for attr, adjusted in (("p", "p_holm"), ("tost_p", "tost_holm")):
        idx = [i for i, t in enumerate(out) if getattr(t, attr) is not None]
        if idx:
            corrected = multipletests([getattr(out[i], attr) for i in idx], alpha=alpha, method="holm")[1]
            for i, value in zip(idx, corrected):
                out[i] = replace(out[i], **{adjusted: float(value)})
    return out


def family_alpha(tests: list[Test], alpha: float = 0.05) -> float:
    """The strictest level a Holm test of this family uses: alpha over the number of tests."""
    return alpha / max(1, sum(t.testable for t in tests))


def verdict(t: Test, alpha: float, margin: float | None, unit: float = 100.0) -> str:
    """Words for a Holm-corrected test: better / worse / above chance, or inconclusive.

    *Equivalent within ±margin* needs both the corrected equivalence test (TOST) and the 95 % interval inside
    the margin (TOST alone works at the 90 % interval): the stricter of the two.
    """
    pts = f"{unit * t.estimate:+.1f} points"
    if not t.testable:
        return t.note
    interval = f"95% CI [{unit * t.low:+.1f}, {unit * t.high:+.1f}]"
    if t.p_holm is not None and t.p_holm < alpha:
        if t.kind == "chance":
            return f"{'above' if t.estimate > 0 else 'below'} chance by {pts.lstrip('+')} ({interval})"
        return f"{t.words[0] if t.estimate > 0 else t.words[1]} by {abs(unit * t.estimate):.1f} points ({interval})"
    inside = -margin <= t.low and t.high <= margin if margin is not None else False
    if inside and t.tost_holm is not None and t.tost_holm < alpha:
        return f"equivalent within ±{unit * margin:.1f} points ({interval})"
    return (f"inconclusive: {pts}, {interval}; the design detects ≥ {unit * t.mde:.1f} points with "
            f"{POWER:.0%} power")


# ----------------------------------------------------------------------------------------- bootstrap

def balanced_accuracy(correct: np.ndarray, labels: np.ndarray, classes: int) -> float:
    """Mean per-class recall of a [seeds, images] correctness matrix (averaged over seeds)."""
    acc = correct.mean(axis=0)
    return float(np.mean([acc[labels == c].mean() for c in range(classes) if (labels == c).any()]))


def bootstrap(groups: list[np.ndarray], weights: Sequence[float], labels: np.ndarray, classes: int, paired: bool,
              draws: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of sum_g weights[g] x balanced_accuracy(group g), resampling seeds and test images.

    ``groups``: correctness matrices [seeds, images] over the same test images. ``paired``: the groups share
    their seeds (same rows resampled together); else each group's seeds are resampled on their own. The
    images are resampled once per draw for all groups: the comparison stays on a common test set.
    """
    rng = np.random.default_rng(seed)
    n_images = len(labels)
    onehot = np.eye(classes)[labels]  # [images, classes]
    image_w = rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=draws).astype(float)  # [draws, images]
    per_class = image_w @ onehot  # images of each class in each draw
    total = np.zeros(draws)
    shared = rng.multinomial(len(groups[0]), np.full(len(groups[0]), 1 / len(groups[0])), size=draws) if paired else None
    for group, weight in zip(groups, weights):
        n = len(group)
        seed_w = shared if paired else rng.multinomial(n, np.full(n, 1 / n), size=draws)
        acc = (seed_w @ group.astype(float)) / n  # [draws, images]: each image's accuracy over the drawn seeds
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = ((acc * image_w) @ onehot) / per_class
        total += weight * np.nanmean(recall, axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(total, [tail, 100 - tail])
    return float(low), float(high)
