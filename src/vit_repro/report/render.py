"""``build_report``: the runs -> ``report.md``, its figures, a study-level ``metrics.json`` and plot data.

The same runs and parameters give byte-identical files: everything is sorted, nothing reads the clock,
every path shown is relative to the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..core import paper
from ..core.config import Params, split_vit_name, variant_id, vit_name

from ..core.fsutil import staged_dir
from ..core.record import LAYERS_FILE
from ..tables import fmt_p, markdown_table, pct
from . import settings
from .analysis import Family, analyse, arms, collapsed, main_recipe, summary_of, train_sets
from .figures import write_figures
from .load import FAILED, FINISHED, MISSING, STALE, Study, load_study

PLOTS_FILE = "plots/curves.csv"


def _interval(low: float, high: float) -> str:
    return "n/a" if low != low else f"[{pct(low)}, {pct(high)}]"


def _signed(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:+.1f}"


def _signed_interval(low: float, high: float) -> str:
    return "n/a" if low != low else f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def _about(study: Study, arm: str) -> str:
    return " ".join(study.params.arm(study.params.kind_of(arm), arm).about.split())


def header(study: Study) -> list[str]:
    p = study.params
    counts = {s: sum(r.status == s for r in study.runs) for s in (FINISHED, MISSING, FAILED, STALE)}
    records = [r.record for r in study.finished]
    commits = sorted({r.provenance.git_commit for r in records})
    dirty = any(r.provenance.git_dirty for r in records)
    lines = [
        "# Vision Transformer reproducibility study: pizza, steak, sushi", "",
        f"*An Image is Worth 16x16 Words* ({paper.PAPER}), reproduced in miniature on three Food-101 classes.", "",
        f"- **Study:** `{p.study.name}`: {' '.join(p.studies[p.study.name].about.split())}; "
        f"{len(study.runs)} runs in {len(arms(study))} arms ({', '.join(arms(study))})",
        f"- **Produced by:** git commit {', '.join(f'`{c[:12]}`' for c in commits) or 'none'}"
        + (" (**uncommitted changes to code or recipes**)" if dirty else " (clean)")
        + f"; params digest {', '.join(sorted({f'`{r.provenance.params_digest}`' for r in records})) or 'none'}",
        f"- **Test set:** {records[0].data.test_images if records else '?'} images, the union of both archives' test splits, "
        "disjoint from every training set (checked by image hash). All results are conditional on these images; the "
        "bootstrap intervals let them vary too.",
        "- **Primary metric:** balanced accuracy (mean per-class recall; 33.3 % for a model that predicts one class). "
        "Accuracy per image and test loss are shown beside it.",
        "- **Regenerate:** `dvc repro` (this report: `dvc repro report`).",
    ]
    if counts[FINISHED] == len(study.runs):
        lines.append(f"- **Status:** complete, all {len(study.runs)} runs finished.")
    else:
        lines += ["", f"> **Incomplete study: {counts[MISSING]} missing, {counts[FAILED]} failed, {counts[STALE]} stale of "
                      f"{len(study.runs)} runs.** Statistics use only the {counts[FINISHED]} finished runs. Not finished:", ">"]
        for r in study.runs:
            if not r.finished:
                lines.append(f"> - `{study.runs_name}/{r.config.out_dir.as_posix()}`: **{r.status}**: {r.reason}")
    return lines + [""]


def _test_rows(family: Family, tests) -> list[dict[str, str]]:
    return [{
        "Question": t.question, "Seeds": " vs ".join(map(str, t.n)), "Δ balanced acc. (points)": _signed(t.estimate),
        "95% CI (seeds)": _signed_interval(t.low, t.high), "95% CI (seeds × images)": _signed_interval(t.boot_low, t.boot_high),
        "Effect size": "n/a" if t.effect != t.effect else f"{t.effect:+.2f}", "p": fmt_p(t.p), "p (Holm)": fmt_p(t.p_holm),
        "MDE (points)": "n/a" if t.mde != t.mde else f"{100 * t.mde:.1f}", "Verdict": family.verdict(t),
    } for t in tests]


def answers(study: Study, family: Family) -> list[str]:
    out = ["## 1. What the runs show", "",
           f"Every comparison below is one member of a single family of {sum(t.testable for t in family.tests)} tests, "
           f"Holm-corrected together at {family.alpha:.2f}. A verdict says *better*, *worse* or *above chance* only where "
           f"the corrected test supports it, *equivalent within ±{100 * family.margin:.0f} points* only where the "
           "equivalence test (TOST) does, and otherwise *inconclusive*, with the interval and the smallest effect the design "
           f"could have detected (MDE: 80% power at the family's strictest level, α = {family.mde_alpha:.4f}). "
           "Differences are in points of balanced accuracy.", ""]
    out += ["### Does each model learn anything? (against chance, 1/3)", ""]
    rows = []
    for arm in arms(study):
        for t in train_sets(study, arm):
            v = variant_id(arm, t, main_recipe(study, arm))
            s = summary_of(study, v)
            k, n, classes = collapsed(study, v)
            test = family.get(f"chance:{v}")
            rows.append({"Arm": arm, "Train images": t, "Recipe": main_recipe(study, arm), "Seeds": s.n,
                         "Balanced acc. %": pct(s.mean), "95% CI": _interval(s.low, s.high),
                         "Accuracy %": pct(summary_of(study, v, "acc").mean),
                         "Collapsed seeds": f"{k} of {n}" + (f" ({', '.join(classes)})" if classes else ""),
                         "Verdict": family.verdict(test) if test else "reference value (one deterministic run): no test"})
    out += [markdown_table(rows), ""]
    if "vit-seed" in study.params.scratch:
        out += ["`vit-seed` replicates the seed notebook's from-scratch run (its settings at CPU size): it is the record of "
                "that run's collapse, not evidence about warmup, decay or clipping.", ""]
    for title, kinds in (("### What warmup, decay and clipping change", ("recipe",)),
                         ("### Dropping or keeping the last, incomplete batch", ("droplast",)),
                         ("### More data, and ViT against ResNet-18 (the paper's data-hunger claim in miniature)",
                          ("data", "versus", "hunger")),
                         ("### How far the 10-epoch head is from what the features allow", ("converged",))):
        tests = [t for t in family.by_kind(*kinds) if not (kinds == ("recipe",) and "keep-last" in t.key)]
        if kinds == ("droplast",):
            tests = [t for t in family.by_kind("recipe") if "keep-last" in t.key] + family.by_kind("droplast")
        if not tests:
            continue
        out += [title, "", markdown_table(_test_rows(family, tests)), ""]
    return out


def arms_and_settings(study: Study) -> list[str]:
    out = ["## 2. Arms and their settings against the paper", "",
           "From-scratch arms are compared with the paper's pre-training (Table 1, Table 3's ImageNet row, Sec. 4.1), "
           "frozen arms with its fine-tuning (App. B.1.1). *same* means the same value under the same conditions; every "
           "other row says why it differs.", ""]
    for arm in arms(study):
        records = [study.first(v).record for v in study.variants(arm) if study.first(v) is not None]
        kind = study.params.kind_of(arm)
        out += [f"### `{arm}` ({'from scratch' if kind == 'scratch' else 'frozen backbone'})", "", _about(study, arm) + ".", ""]
        if not records:
            out += ["No finished run.", ""]
            continue
        table = settings.SCRATCH_ROWS if kind == "scratch" else settings.FROZEN_ROWS
        out += [markdown_table(settings.rows(records, table)), ""]
    out += ["### Recipes", "", "Warmup is the paper's share of training (10k of ~93.8k steps), scaled to each run's steps.", "",
            markdown_table(settings.paper_recipe_rows() + settings.recipe_rows(
                [study.first(v).record for v in study.variants() if study.first(v) is not None])), ""]
    return out


def results(study: Study) -> list[str]:
    rows = []
    for v in study.variants():
        s, acc, loss = summary_of(study, v), summary_of(study, v, "acc"), summary_of(study, v, "loss")
        k, n, _ = collapsed(study, v)
        runs = study.seeds(v)
        expected = sum(r.config.variant == v for r in study.runs)
        rows.append({
            "Variant": v, "Seeds": f"{s.n} of {expected}", "Balanced acc. %": pct(s.mean), "95% CI": _interval(s.low, s.high),
            "Accuracy %": pct(acc.mean), "Test loss": "n/a" if loss.mean != loss.mean else f"{loss.mean:.3f}",
            "Train acc. %": pct(sum(r.record.train.accuracy for r in runs) / len(runs)) if runs else "n/a",
            "Collapsed": f"{k} of {n}",
            "Time per run s": f"{sum(r.record.provenance.wall_time_s for r in runs) / len(runs):.1f}" if runs else "n/a",
        })
    seed = paper.SEED_RESULTS
    return ["## 3. Results per variant", "",
            "Mean over seeds with a 95% Student-t interval (n−1 df). Train accuracy: the final weights over every training "
            f"image. The seed notebook reported {seed['scratch'].printed_acc} (scratch ViT-B/16, "
            f"{seed['scratch'].correct}/{seed['scratch'].images} per image: one class) and {seed['frozen'].printed_acc} (frozen "
            f"ViT-B/16 IMAGENET1K_V1, {seed['frozen'].correct}/{seed['frozen'].images}) on its 75-image test split, batch-averaged; "
            "those are other models on another test set, so they are not plotted beside ours.", "",
            markdown_table(rows), ""]


def all_tests(family: Family) -> list[str]:
    return ["## 4. Every test of the family", "",
            "Paired tests pair runs by seed (same initialisation and data order); data-size and architecture comparisons "
            "are Welch tests between independent groups; the data-hunger question is the interaction of an OLS model "
            "(HC3 errors). Effect size: Cohen's d (dz when paired). `no test` marks a comparison without a p-value "
            "(zero variance or one seed); no p-value is printed that was not computed.", "",
            markdown_table(_test_rows(family, family.tests)), ""]


FIGURE_CAPTIONS = {
    "accuracy": "Test balanced accuracy of every seed, per variant, with the mean and its 95% interval; dashed: chance.",
    "loss": "Test loss of every seed per variant; dashed: ln 3, the loss of a uniform prediction.",
    "data": "Balanced accuracy against the number of training images, every arm at its main recipe.",
    "curves": "Test balanced accuracy during training: seeds thin, recipe means thick (the curves select nothing).",
    "lr": "The learning rate of each recipe per optimisation step, as recorded.",
    "grad": "Gradient norm before clipping (median over seeds), with the paper's threshold 1.",
    "confusion": "Test confusion matrices summed over all seeds of each arm's main recipe.",
}


def figures(figs: dict[str, Path], out_dir: Path) -> list[str]:
    out = ["## 5. Figures", ""]
    for key, path in figs.items():
        out += [f"**{FIGURE_CAPTIONS[key]}**", "", f"![{key}]({path.relative_to(out_dir).as_posix()})", ""]
    return out


def models(study: Study) -> list[str]:
    rows = []
    seen = set()
    for r in (study.first(v) for v in study.variants()):
        if r is None or r.record.model.name in seen:
            continue
        m = r.record.model
        seen.add(m.name)
        vit = vit_name(m.name)
        t1 = paper.TABLE1[split_vit_name(vit)[0]] if vit else None
        layers = f"{study.runs_name}/{r.config.arm}/{LAYERS_FILE}"
        rows.append({"Model": m.name, "Image size": m.image_size, "Parameters (3 classes)": f"{m.params_total:,}",
                     "Trainable": f"{m.params_trainable:,}", "Forward GMACs per image": f"{m.forward_gmacs:.3f}",
                     "Table 1": (f"{t1.name}: {t1.layers} layers, D {t1.hidden}, MLP {t1.mlp}, {t1.heads} heads, "
                                 f"{t1.params_millions:g}M with a {paper.TABLE1_NUM_CLASSES}-class head ({t1.source})")
                     if t1 else "not in Table 1", "Layers": f"[{layers}](../{layers})"})
    return ["## 6. Models", "",
            f"Reference: torchvision's vit_b_16 has {paper.VIT_B16_PARAMS_1000_CLASSES:,} parameters with 1000 classes and "
            f"{paper.VIT_B16_PARAMS_3_CLASSES:,} with 3; multiply-accumulates are counted by torch's FLOP counter "
            "(ViT-B/16 at 224 px: 17.56 G). Each arm's layer table (torchinfo: shapes and parameters per layer) is "
            "written once beside its runs.", "", markdown_table(rows), ""]


def provenance(study: Study) -> list[str]:
    records = [r.record for r in study.finished]
    if not records:
        return ["## 7. Provenance", "", "No finished run.", ""]

    def unique(get) -> str:
        return ", ".join(sorted({str(get(r)) for r in records}))

    backbones = sorted({json.dumps(r.backbone.model_dump(), sort_keys=True) for r in records if r.backbone})
    out = ["## 7. Provenance", "",
           f"- **Data:** archives from `{unique(lambda r: r.data.source)}` (DVC remote `course-data`), verified image by image; "
           f"manifest digests {unique(lambda r: ', '.join(f'{k} `{v}`' for k, v in sorted(r.data.datasets.items())))}",
           f"- **Image sets:** test `{unique(lambda r: r.data.test_digest)}`; training sets "
           + ", ".join(sorted({f"{r.data.train_set} `{r.data.train_digest}`" for r in records}))]
    for b in map(json.loads, backbones):
        out.append(f"- **Frozen backbone:** {b['label']} ({b['origin']}); converted weights sha256 `{b['sha256']}`; "
                   f"{b['provenance']}; features `{b['features_key']}` ({b['features_precision']})")
    out += [
        f"- **Code:** commit(s) {unique(lambda r: r.provenance.git_commit[:12])}; code digest(s) "
        f"{unique(lambda r: r.provenance.code_digest)}"
        + ("; **some runs had uncommitted changes**" if any(r.provenance.git_dirty for r in records) else "; clean"),
        f"- **Versions:** Python {unique(lambda r: r.provenance.python)}, torch {unique(lambda r: r.provenance.torch)}, "
        f"torchvision {unique(lambda r: r.provenance.torchvision)}, MLflow {unique(lambda r: r.provenance.mlflow)}",
        f"- **Machine:** {unique(lambda r: f'{r.provenance.device_name}, {r.provenance.precision}')}; "
        f"{unique(lambda r: r.provenance.platform)}",
        f"- **Finished:** {max(r.provenance.finished_at for r in records)} (last run)",
        "",
        f"Each run is an MLflow run in the experiment `{unique(lambda r: r.mlflow.experiment_name)}`, nested under its "
        "variant. From the repository root: "
        + ", or ".join(sorted({f"`mlflow ui --backend-store-uri '{r.mlflow.store}'`" for r in records}))
        + ", then open "
        + ", ".join(sorted({f"http://127.0.0.1:5000/#/experiments/{r.mlflow.experiment_id}/runs?workflowType=machine_learning"
                            for r in records}))
        + " (the training runs; run ids are in each `run.json`).", ""]
    return out


def metrics(study: Study, family: Family) -> dict:
    """The study at a glance for `dvc metrics show` / `dvc exp show`: per variant, balanced accuracy and n."""
    out: dict = {"runs_finished": len(study.finished), "runs_expected": len(study.runs), "variants": {}}
    for v in study.variants():
        s = summary_of(study, v)
        if s.n:
            out["variants"][v] = {"bacc": round(s.mean, 4), "bacc_low": round(s.low, 4) if s.n > 1 else None,
                                  "bacc_high": round(s.high, 4) if s.n > 1 else None, "n": s.n}
    out["verdicts"] = {t.key: family.verdict(t).split(":")[0].split(" (")[0] for t in family.tests}
    return out


def plot_data(study: Study) -> pd.DataFrame:
    """Mean test balanced accuracy per evaluated epoch and variant (long format, for `dvc plots show`)."""
    rows = []
    for v in study.variants():
        frames = [r.history.dropna(subset=["test_balanced_acc"]) for r in study.seeds(v)]
        frames = [f.set_index("epoch")["test_balanced_acc"] for f in frames if len(f)]
        if frames:
            mean = sum(frames) / len(frames)
            rows += [{"variant": v, "epoch": int(e), "test_balanced_acc": round(float(a), 4)} for e, a in mean.items()]
    return pd.DataFrame(rows, columns=["variant", "epoch", "test_balanced_acc"])


def build_report(runs_dir: Path, params: Params, out_dir: Path, experiments: Path = Path("experiments"),
                 root: Path | None = None) -> Path:
    """Write ``out_dir/{report.md, metrics.json, plots/curves.csv, figures/}``; returns the report's path."""
    out_dir = Path(out_dir)
    study = load_study(Path(runs_dir), params, experiments)
    family = analyse(study)
    out_dir.mkdir(parents=True, exist_ok=True)
    with staged_dir(out_dir / "figures") as tmp:
        figs = {k: out_dir / "figures" / p.name for k, p in write_figures(study, tmp).items()}
    text = "\n".join(header(study) + answers(study, family) + arms_and_settings(study) + results(study)
                     + all_tests(family) + figures(figs, out_dir) + models(study) + provenance(study)).rstrip() + "\n"
    (out_dir / "plots").mkdir(exist_ok=True)
    plot_data(study).to_csv(out_dir / PLOTS_FILE, index=False)
    (out_dir / "metrics.json").write_text(json.dumps(metrics(study, family), indent=2, sort_keys=True) + "\n")
    path = out_dir / "report.md"
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(text)
    tmp_path.replace(path)
    return path
