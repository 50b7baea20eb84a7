"""Figures of a single run, logged to MLflow as artifacts (the report draws the study-level figures)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402


def curves_figure(history_csv: Path, title: str) -> Figure:
    """Train/test loss and per-image accuracy per epoch."""
    history = pd.read_csv(history_csv)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, style in (("train", "-"), ("test", "--")):
        ax_loss.plot(history["epoch"], history[f"{split}_loss"], style, marker="o", label=split)
        ax_acc.plot(history["epoch"], history[f"{split}_acc"], style, marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (per image)", title="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def draw_confusion(ax: plt.Axes, matrix: list[list[int]], classes: list[str]) -> AxesImage:
    """Confusion matrix with the count in every cell (rows: true class, columns: predicted)."""
    peak = max(max(row) for row in matrix) or 1
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true")
    return image


def confusion_figure(matrix: list[list[int]], classes: list[str], title: str) -> Figure:
    """One run's test-set confusion matrix as a figure."""
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    fig.colorbar(draw_confusion(ax, matrix, classes), ax=ax, fraction=0.046)
    ax.set_title(title)
    fig.tight_layout()
    return fig
