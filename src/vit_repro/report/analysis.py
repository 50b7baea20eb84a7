"""The questions the report answers, as one family of tests on balanced accuracy, Holm-corrected together.

* chance: does an arm beat 1/3 on each training set (at its main recipe)?
* recipe: what does each recipe change against ``baseline``, paired by seed (``-keep-last`` recipes against
  ``baseline-keep-last``, which is itself compared with ``baseline``: the effect of dropping the last batch);
  and does keeping the last batch change the clipping effect (a difference of paired differences)?
* data: does the larger training set help each arm (at its main recipe)?
* versus: how do two arms compare at each shared training set (``report.versus``, e.g. ViT vs ResNet-18), and
  does more data help one more than the other (the paper's data-hunger claim, as an interaction)?
* converged: how far is each frozen arm from the converged probe on the same features (``report.converged``)?

An arm's *main recipe* is the one it trains on every training set (else its first). Runs of one seed
(the converged probe) enter as fixed references, never as samples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import stats
from ..core.config import variant_id
from .load import Study

KEEP_LAST = "-keep-last"
CHANCE_CLASSES = 3


@dataclass(frozen=True)
class Family:
    """Every test the report shows, Holm-corrected, and the level and margin their verdicts use."""

    tests: list[stats.Test]
    alpha: float
    margin: float

    @property
    def mde_alpha(self) -> float:
        return stats.family_alpha(self.tests, self.alpha)

    def get(self, key: str) -> stats.Test | None:
        return next((t for t in self.tests if t.key == key), None)

    def verdict(self, test: stats.Test) -> str:
        return stats.verdict(test, self.alpha, self.margin if test.tost_p is not None else None)

    def by_kind(self, *kinds: str) -> list[stats.Test]:
        return [t for t in self.tests if t.key.split(":")[0] in kinds]


def main_recipe(study: Study, arm: str) -> str:
    cfg = study.params.arm(study.params.kind_of(arm), arm)
    shared = set.intersection(*(set(r) for r in cfg.recipes.values()))
    first = next(iter(cfg.recipes.values()))[0]
    return next((r for r in next(iter(cfg.recipes.values())) if r in shared), first)


def arms(study: Study) -> list[str]:
    return list(dict.fromkeys(r.config.arm for r in study.runs))


def train_sets(study: Study, arm: str) -> list[str]:
    return list(study.params.arm(study.params.kind_of(arm), arm).recipes)


def bacc(study: Study, variant: str) -> dict[int, float]:
    return {r.config.seed: r.record.test.balanced_accuracy for r in study.seeds(variant)}


def reference_recipe(recipe: str) -> str | None:
    """What a recipe is compared with: ``baseline``, or ``baseline-keep-last`` for the other keep-last recipes."""
    if recipe == "baseline":
        return None
    if recipe.endswith(KEEP_LAST) and recipe != "baseline" + KEEP_LAST:
        return "baseline" + KEEP_LAST
    return "baseline"


class _Builder:
    def __init__(self, study: Study, margin: float, alpha: float, draws: int) -> None:
        self.study, self.margin, self.alpha, self.draws = study, margin, alpha, draws
        self.tests: list[stats.Test] = []
        self.boot: dict[str, tuple[list[str], list[float], bool]] = {}  # key -> variants, weights, paired

    def add(self, test: stats.Test, variants: list[str], weights: list[float], paired: bool) -> None:
        self.tests.append(test)
        self.boot[test.key] = (variants, weights, paired)

    def paired_seeds(self, a: str, b: str) -> tuple[list[float], list[float]]:
        x, y = bacc(self.study, a), bacc(self.study, b)
        seeds = sorted(x.keys() & y.keys())
        return [x[s] for s in seeds], [y[s] for s in seeds]

    def build(self) -> Family:
        s = self.study
        alpha_mde = self.alpha  # replaced below by the family's strictest level, once the family is known
        for arm in arms(s):
            main = main_recipe(s, arm)
            for ts in train_sets(s, arm):
                v = variant_id(arm, ts, main)
                if len(bacc(s, v)) > 1:
                    q = f"does {arm} beat chance on {ts} images ({main})?"
                    self.add(stats.one_sample(f"chance:{v}", q, list(bacc(s, v).values()), 1 / CHANCE_CLASSES, alpha_mde),
                             [v], [1.0], False)
            for ts, recipes in s.params.arm(s.params.kind_of(arm), arm).recipes.items():
                for recipe in recipes:
                    ref = reference_recipe(recipe)
                    if ref is None or ref not in recipes:
                        continue
                    a, b = variant_id(arm, ts, recipe), variant_id(arm, ts, ref)
                    x, y = self.paired_seeds(a, b)
                    if len(x) > 1:
                        q = f"{arm}, {ts} images: `{recipe}` against `{ref}`"
                        self.add(stats.paired(f"recipe:{a}", q, x, y, self.margin, alpha_mde), [a, b], [1, -1], True)
                clip, keep = "clip", "clip" + KEEP_LAST
                base, base_keep = "baseline", "baseline" + KEEP_LAST
                if {clip, keep, base, base_keep} <= set(recipes):
                    seeds = [bacc(s, variant_id(arm, ts, r)) for r in (clip, base, keep, base_keep)]
                    common = sorted(set.intersection(*(set(d) for d in seeds)))
                    drop_effect = [seeds[0][k] - seeds[1][k] for k in common]
                    keep_effect = [seeds[2][k] - seeds[3][k] for k in common]
                    q = (f"{arm}, {ts} images: the clipping effect with the last batch kept, against with it dropped "
                         "(a difference of paired differences)")
                    test = stats.paired(f"droplast:{arm}/{ts}", q, keep_effect, drop_effect, self.margin, alpha_mde)
                    self.add(replace(test, words=("larger", "smaller")),
                             [variant_id(arm, ts, r) for r in (keep, base_keep, clip, base)], [1, -1, -1, 1], True)
            sets = train_sets(s, arm)
            if len(sets) > 1:
                lo, hi = variant_id(arm, sets[0], main), variant_id(arm, sets[-1], main)
                x, y = list(bacc(s, hi).values()), list(bacc(s, lo).values())
                if len(x) > 1 and len(y) > 1:
                    q = f"{arm}: {sets[-1]} against {sets[0]} training images ({main})"
                    self.add(stats.welch(f"data:{arm}", q, x, y, self.margin, alpha_mde), [hi, lo], [1, -1], False)
        for a_arm, b_arm in s.params.report.versus:
            shared = [t for t in train_sets(s, a_arm) if t in train_sets(s, b_arm)]
            va = {t: variant_id(a_arm, t, main_recipe(s, a_arm)) for t in shared}
            vb = {t: variant_id(b_arm, t, main_recipe(s, b_arm)) for t in shared}
            for t in shared:
                x, y = list(bacc(s, va[t]).values()), list(bacc(s, vb[t]).values())
                q = f"{a_arm} against {b_arm} on {t} images"
                self.add(stats.welch(f"versus:{a_arm}-{b_arm}/{t}", q, x, y, self.margin, alpha_mde), [va[t], vb[t]],
                         [1, -1], False)
            if len(shared) >= 2:
                lo, hi = shared[0], shared[-1]
                q = (f"does {a_arm} gain more than {b_arm} from {hi} instead of {lo} images? "
                     f"({a_arm} gain − {b_arm} gain)")
                groups = [list(bacc(s, v).values()) for v in (va[lo], va[hi], vb[lo], vb[hi])]
                test = stats.interaction(f"hunger:{a_arm}-{b_arm}", q, *groups, alpha_mde)
                self.add(replace(test, words=("larger", "smaller")),
                         [va[hi], va[lo], vb[hi], vb[lo]], [1, -1, -1, 1], False)
        probe = s.params.report.converged
        if probe in s.params.frozen:
            for arm in arms(s):
                if arm == probe or s.params.kind_of(arm) != "frozen":
                    continue
                for t in train_sets(s, arm):
                    ref = s.first(variant_id(probe, t, main_recipe(s, probe)))
                    x = list(bacc(s, variant_id(arm, t, main_recipe(s, arm))).values())
                    if ref is None or len(x) < 2:
                        continue
                    q = f"{arm} ({main_recipe(s, arm)}) against the converged {probe} on {t} images"
                    self.add(stats.one_sample(f"converged:{arm}/{t}", q, x, ref.record.test.balanced_accuracy, alpha_mde,
                                              kind="reference"), [variant_id(arm, t, main_recipe(s, arm))], [1.0], False)
        return self.finish()

    def finish(self) -> Family:
        """Recompute every MDE at the family's strictest level, add the bootstrap intervals, correct by Holm."""
        level = stats.family_alpha(self.tests, self.alpha)
        tests = []
        for t in self.tests:
            if t.testable and t.mde == t.mde:
                scale = _mde_scale(t.n, self.alpha, level, t.kind)
                t = replace(t, mde=t.mde * scale)
            tests.append(self._with_bootstrap(t))
        return Family(stats.holm(tests, self.alpha), self.alpha, self.margin)

    def _with_bootstrap(self, t: stats.Test) -> stats.Test:
        variants, weights, paired = self.boot[t.key]
        groups, labels = [], None
        for v in variants:
            correct, labels_v, _ = self.study.correctness(v)
            groups.append(correct)
            labels = labels_v if labels is None else labels
        if any(len(g) == 0 for g in groups) or (paired and len({len(g) for g in groups}) > 1):
            return t
        constant = -1 / CHANCE_CLASSES if t.kind == "chance" else 0.0
        if t.kind == "reference":  # estimate = mean - reference, and the seeds' mean is the pooled balanced accuracy
            constant = t.estimate - stats.balanced_accuracy(groups[0], labels, CHANCE_CLASSES)
        low, high = stats.bootstrap(groups, weights, labels, CHANCE_CLASSES, paired, self.draws)
        return replace(t, boot_low=low + constant, boot_high=high + constant)


def _mde_scale(n: tuple[int, ...], alpha: float, level: float, kind: str) -> float:
    """How much larger the MDE is at the family's level than at ``alpha`` (the tests computed it at ``alpha``)."""
    from statsmodels.stats.power import TTestIndPower, TTestPower

    if kind in ("welch",):
        solver = TTestIndPower()
        at = lambda a: solver.solve_power(nobs1=n[0], ratio=n[1] / n[0], alpha=a, power=stats.POWER)  # noqa: E731
    elif kind == "interaction":
        from scipy import stats as sps

        df = sum(n) - 4
        at = lambda a: sps.t.ppf(1 - a / 2, df) + sps.t.ppf(stats.POWER, df)  # noqa: E731
    else:
        at = lambda a: TTestPower().solve_power(nobs=n[0], alpha=a, power=stats.POWER)  # noqa: E731
    return float(at(level) / at(alpha))


def analyse(study: Study) -> Family:
    """The report's family of tests on this study's finished runs."""
    r = study.params.report
    return _Builder(study, r.equivalence_margin, r.alpha, r.bootstrap_draws).build()


def summary_of(study: Study, variant: str, metric: str = "bacc") -> stats.Summary:
    values = {"bacc": lambda r: r.record.test.balanced_accuracy, "acc": lambda r: r.record.test.accuracy,
              "loss": lambda r: r.record.test.loss}[metric]
    return stats.summarize([values(r) for r in study.seeds(variant)])


def collapsed(study: Study, variant: str) -> tuple[int, int, list[str]]:
    """(collapsed seeds, finished seeds, the classes they collapsed to)."""
    runs = study.seeds(variant)
    hit = [r for r in runs if r.record.test.collapsed]
    classes = sorted({r.record.data.classes[int(np.argmax(np.asarray(r.record.test.confusion).sum(0)))] for r in hit})
    return len(hit), len(runs), classes
