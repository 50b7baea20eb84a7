"""How closely a rerun study reproduces the committed one, run by run and verdict by verdict.

    python benchmarks/compare_runs.py RERUN_CHECKOUT [COMMITTED_CHECKOUT] [--out FILE.md]

RERUN_CHECKOUT is a clone where `dvc repro --force` retrained the study (on another machine, say);
COMMITTED_CHECKOUT (default: this checkout) holds the committed `runs/`. Per arm it
prints how many runs have bit-identical train/test records, how many test predictions changed, the largest
change in balanced accuracy and test loss and the wall time of both; then every report verdict that changed.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from vit_repro.config import load_params
from vit_repro.report.analysis import analyse
from vit_repro.report.load import load_study
from vit_repro.tables import markdown_table


@dataclass
class ArmDiff:
    """What changed between the committed runs of one arm and their rerun."""

    runs: int = 0
    identical: int = 0
    runs_with_changed_predictions: int = 0
    changed_predictions: int = 0
    predictions: int = 0
    max_balanced_points: float = 0.0
    max_test_loss_rel: float = 0.0
    committed_min: float = 0.0
    rerun_min: float = 0.0

    def add(self, committed: Path, rerun: Path) -> None:
        a, b = (json.loads((folder / "run.json").read_text()) for folder in (committed, rerun))
        pa, pb = (list(csv.DictReader((folder / "predictions.csv").open())) for folder in (committed, rerun))
        changed = sum(x["prediction"] != y["prediction"] for x, y in zip(pa, pb, strict=True))
        self.runs += 1
        self.identical += all(a[split] == b[split] for split in ("train", "test"))
        self.runs_with_changed_predictions += changed > 0
        self.changed_predictions += changed
        self.predictions += len(pa)
        self.max_balanced_points = max(self.max_balanced_points,
                                       100 * abs(a["test"]["balanced_accuracy"] - b["test"]["balanced_accuracy"]))
        self.max_test_loss_rel = max(self.max_test_loss_rel, abs(a["test"]["loss"] - b["test"]["loss"]) / a["test"]["loss"])
        self.committed_min += a["provenance"]["wall_time_s"] / 60
        self.rerun_min += b["provenance"]["wall_time_s"] / 60


def compare_runs(committed: Path, rerun: Path) -> dict[str, ArmDiff]:
    arms: dict[str, ArmDiff] = {}
    for record in sorted((committed / "runs").rglob("run.json")):
        rel = record.parent.relative_to(committed / "runs")
        arms.setdefault(rel.parts[0], ArmDiff()).add(record.parent, rerun / "runs" / rel)
    return arms


def verdicts(checkout: Path) -> dict[str, str]:
    """Every test of the report's family for a checkout's runs: its question -> the report's verdict, as
    `vit-repro report` computes it (the same loading, statistics and Holm correction)."""
    family = analyse(load_study(checkout / "runs", load_params(checkout / "params.yaml"), checkout / "experiments"))
    return {test.question: family.verdict(test) for test in family.tests}


def changed_verdicts(committed: Path, rerun: Path) -> list[dict[str, str]]:
    def word(verdict: str) -> str:
        return re.split(r"[:(]| by ", verdict)[0].strip()

    old, new = verdicts(committed), verdicts(rerun)
    return [{"comparison": key, "committed": old[key], "rerun": new.get(key, "(missing)")}
            for key in old if word(old[key]) != word(new.get(key, ""))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rerun", type=Path)
    parser.add_argument("committed", type=Path, nargs="?", default=Path(__file__).resolve().parents[1])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    arms = compare_runs(args.committed, args.rerun)
    table = markdown_table([{
        "arm": arm, "runs": d.runs, "bit-identical": d.identical,
        "runs with changed predictions": d.runs_with_changed_predictions,
        "changed predictions": f"{d.changed_predictions} of {d.predictions}",
        "max Δ balanced acc. (points)": f"{d.max_balanced_points:.2f}", "max test-loss rel. diff": f"{d.max_test_loss_rel:.1e}",
        "wall min (committed → rerun)": f"{d.committed_min:.1f} → {d.rerun_min:.1f}"} for arm, d in arms.items()])
    changed = changed_verdicts(args.committed, args.rerun)
    text = table + "\n\nVerdicts that changed:\n\n" + (markdown_table(changed) if changed else "none") + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
