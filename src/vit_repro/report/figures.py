"""The report's figures, drawn from the runs' outputs; the same runs give byte-identical PNGs.

Every figure shows seeds as they are (dots or thin lines) beside their mean, with the reference a reader
needs to judge it (chance, ln 3 for the loss, the paper's clipping threshold). Nothing is chosen on the
test set: confusion matrices are summed over every seed of a variant.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..core import paper  # noqa: E402
from ..core.config import variant_id  # noqa: E402
from .analysis import CHANCE_CLASSES, arms, main_recipe, summary_of, train_sets  # noqa: E402
from .load import Study  # noqa: E402

DPI = 100
FILES = {"accuracy": "balanced_accuracy.png", "loss": "test_loss.png", "data": "data_size.png",
         "curves": "curves.png", "lr": "lr_schedule.png", "grad": "grad_norm.png", "confusion": "confusion.png"}
METADATA = {"Software": None}  # no version string: the same runs give the same bytes


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata=METADATA)
    plt.close(fig)
    return path


def _grid(n: int, ncols: int, size: tuple[float, float]) -> tuple[plt.Figure, list[plt.Axes]]:
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows + 0.6), squeeze=False,
                             layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_axis_off()
    return fig, flat[:n]


def _short(variant: str, arm: str) -> str:
    return variant.removeprefix(f"{arm}/")


def seeds_and_means(study: Study, path: Path, metric: str) -> Path:
    """Per arm: every seed of every variant (dots), its mean and 95 % t-interval; chance or ln 3 for reference."""
    value = {"bacc": lambda r: 100 * r.record.test.balanced_accuracy, "loss": lambda r: r.record.test.loss}[metric]
    names = arms(study)
    fig, axes = _grid(len(names), 2, (6.4, 3.4))
    for ax, arm in zip(axes, names):
        variants = study.variants(arm)
        for i, v in enumerate(variants):
            runs = study.seeds(v)
            ys = [value(r) for r in runs]
            xs = i + np.linspace(-0.15, 0.15, len(ys)) if len(ys) > 1 else [i] * len(ys)
            ax.scatter(xs, ys, s=10, color="tab:blue", alpha=0.6, zorder=2)
            s = summary_of(study, v, metric)
            scale = 100 if metric == "bacc" else 1
            if s.n:
                ax.plot([i - 0.3, i + 0.3], [scale * s.mean] * 2, color="black", lw=1.5, zorder=3)
            if s.n > 1:
                ax.errorbar(i + 0.32, scale * s.mean, yerr=[[scale * (s.mean - s.low)], [scale * (s.high - s.mean)]],
                            color="black", capsize=3, lw=1, zorder=3)
        if metric == "bacc":
            ax.axhline(100 / CHANCE_CLASSES, color="tab:red", ls="--", lw=1, label="chance (1/3)")
            ax.set_ylim(0, 100)
            ax.set_ylabel("test balanced accuracy (%)")
        else:
            ax.axhline(math.log(CHANCE_CLASSES), color="tab:red", ls="--", lw=1, label="ln 3 (uniform prediction)")
            ax.set_ylabel("test loss (cross-entropy)")
        ax.set_xticks(range(len(variants)), [_short(v, arm) for v in variants], rotation=35, ha="right", fontsize=7)
        ax.set_title(arm, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if metric == "bacc" else "upper right")
    label = "balanced accuracy" if metric == "bacc" else "loss"
    fig.suptitle(f"Test {label} of every seed (dots), mean (bar) and 95% interval", fontsize=11)
    return _save(fig, path)


def data_size(study: Study, path: Path) -> Path:
    """Balanced accuracy against the number of training images, per arm at its main recipe: the data-size axis."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for arm in arms(study):
        sets = train_sets(study, arm)
        xs, means, lows, highs = [], [], [], []
        for t in sets:
            s = summary_of(study, variant_id(arm, t, main_recipe(study, arm)))
            if s.n:
                xs.append(int(t) if t.isdigit() else len(xs))
                means.append(100 * s.mean)
                lows.append(100 * (s.mean - s.low) if s.n > 1 else 0)
                highs.append(100 * (s.high - s.mean) if s.n > 1 else 0)
        if xs:
            ax.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3, label=f"{arm} ({main_recipe(study, arm)})")
    ax.axhline(100 / CHANCE_CLASSES, color="tab:red", ls="--", lw=1, label="chance")
    ax.set(xlabel="training images", ylabel="test balanced accuracy (%)", ylim=(0, 100),
           title="More data: every arm at its main recipe, mean and 95% interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def curves(study: Study, path: Path) -> Path:
    """Per arm and train set: test balanced accuracy over training, each seed thin, each recipe's mean thick."""
    panels = [(a, t) for a in arms(study) for t in train_sets(study, a)
              if any(r.history is not None and len(r.history) for r in study.finished if r.config.arm == a)]
    fig, axes = _grid(max(1, len(panels)), 2, (6.0, 3.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (arm, t) in zip(axes, panels):
        for k, v in enumerate(v for v in study.variants(arm) if v.split("/")[1] == t):
            frames = [r.history.dropna(subset=["test_balanced_acc"]) for r in study.seeds(v)]
            frames = [f for f in frames if len(f)]
            color = colors[k % len(colors)]
            for f in frames:
                ax.plot(f["epoch"], 100 * f["test_balanced_acc"], color=color, lw=0.5, alpha=0.3)
            if frames:
                mean = sum(f.set_index("epoch")["test_balanced_acc"] for f in frames) / len(frames)
                ax.plot(mean.index, 100 * mean.values, color=color, lw=1.8, label=v.split("/")[2])
        ax.axhline(100 / CHANCE_CLASSES, color="tab:red", ls="--", lw=1)
        ax.set(title=f"{arm}, {t} training images", xlabel="epoch", ylabel="test balanced accuracy (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncols=2)
    fig.suptitle("Test balanced accuracy during training (for the curves only: nothing is chosen on them)", fontsize=11)
    return _save(fig, path)


def _step_panels(study: Study, path: Path, title: str, ylabel: str, draw, log: bool = False,
                 threshold: float | None = None) -> Path:
    """One panel per arm that records optimisation steps; ``draw(ax, arm, variant)`` adds a variant's line."""
    names = [a for a in arms(study) if any(r.steps is not None and len(r.steps) for r in study.finished if r.config.arm == a)]
    fig, axes = _grid(max(1, len(names)), 2, (6.0, 3.0))
    for ax, arm in zip(axes, names):
        for v in study.variants(arm):
            draw(ax, arm, v)
        if threshold is not None:
            ax.axhline(threshold, color="black", ls="--", lw=1)
        if log:
            ax.set_yscale("log")
        ax.set(title=arm, xlabel="optimisation step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncols=2)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def lr_schedule(study: Study, path: Path) -> Path:
    """The learning rate of each recipe as recorded per step (first seed of each variant), per arm."""
    def draw(ax: plt.Axes, arm: str, v: str) -> None:
        run = study.first(v)
        if run is not None and len(run.steps):
            ax.plot(run.steps["step"], run.steps["lr"], lw=1, label=_short(v, arm))

    return _step_panels(study, path, "Learning rate per step, as recorded (steps.csv)", "learning rate", draw)


def grad_norm(study: Study, path: Path) -> Path:
    """Median over seeds of the gradient norm before clipping, per step, with the paper's threshold."""
    def draw(ax: plt.Axes, arm: str, v: str) -> None:
        steps = [r.steps.set_index("step")["grad_norm"] for r in study.seeds(v) if len(r.steps)]
        if steps:
            median = np.median(np.stack([s.to_numpy() for s in steps if len(s) == len(steps[0])]), axis=0)
            above = float(np.mean(np.concatenate([s.to_numpy() for s in steps]) > paper.CLIP_GRAD_NORM))
            ax.plot(steps[0].index, median, lw=1, label=f"{_short(v, arm)} ({100 * above:.0f}% > 1)")

    return _step_panels(study, path, "Gradient norm before clipping (median over seeds); dashed: the paper's threshold 1",
                        "gradient norm (log)", draw, log=True, threshold=paper.CLIP_GRAD_NORM)


def confusion(study: Study, path: Path) -> Path:
    """Test confusion matrices summed over every seed, for each arm's main recipe on each train set."""
    panels = [variant_id(a, t, main_recipe(study, a)) for a in arms(study) for t in train_sets(study, a)]
    panels = [v for v in panels if study.seeds(v)]
    fig, axes = _grid(max(1, len(panels)), 4, (3.2, 3.0))
    for ax, v in zip(axes, panels):
        runs = study.seeds(v)
        cm = np.sum([np.asarray(r.record.test.confusion) for r in runs], axis=0)
        classes = runs[0].record.data.classes
        ax.imshow(cm, cmap="Blues", vmin=0)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(len(classes)), classes, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set(xlabel="predicted", ylabel="true")
        ax.set_title(f"{v}\n{len(runs)} seeds summed", fontsize=8)
    fig.suptitle("Test confusion matrices, every seed summed (rows: true class)", fontsize=11)
    return _save(fig, path)


def write_figures(study: Study, fig_dir: Path) -> dict[str, Path]:
    """Every figure; returns {key: path}. PNGs in ``fig_dir`` that no figure wrote are removed."""
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        figs = {
            "accuracy": seeds_and_means(study, fig_dir / FILES["accuracy"], "bacc"),
            "loss": seeds_and_means(study, fig_dir / FILES["loss"], "loss"),
            "data": data_size(study, fig_dir / FILES["data"]),
            "curves": curves(study, fig_dir / FILES["curves"]),
            "lr": lr_schedule(study, fig_dir / FILES["lr"]),
            "grad": grad_norm(study, fig_dir / FILES["grad"]),
            "confusion": confusion(study, fig_dir / FILES["confusion"]),
        }
    keep = {p.name for p in figs.values()}
    for stale in sorted(fig_dir.glob("*.png")):
        if stale.name not in keep:
            stale.unlink()
    return figs
