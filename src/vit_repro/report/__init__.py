"""The study report, built from the runs' outputs alone: load, stats, settings, figures, render."""
from .render import build_report

__all__ = ["build_report"]
