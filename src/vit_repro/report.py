"""The study report: ``reports/report.md`` and ``reports/figures/*.png``, built from the runs' outputs only.

Inputs are the files each training run writes (``runs/<backbone>/<recipe>/seed<k>/``, see
docs/run-outputs.md); MLflow is never queried, so the report stage depends on exactly what DVC tracks.
The same inputs give byte-identical outputs: everything is sorted, nothing reads the clock, and the
figures are written by matplotlib's Agg renderer without a "Software" tag.

    study = load_study(runs_dir, params)     # pandas frames of every expected run
    variant_summary(study)                    # mean, std, 95% t-interval per variant
    compare_recipes(study)                    # each recipe against the baseline, paired by seed
    build_report(runs_dir, params, out_dir)   # all of it, rendered
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from . import paper
from .config import Params
from .plots import draw_confusion

BACKBONES = ("scratch", "frozen")
REFERENCE_RECIPE = "baseline"
FINISHED, MISSING, FAILED, STALE = "finished", "missing", "failed", "stale"
METRIC_KEYS = ("test_acc", "test_loss", "test_correct", "test_images", "train_acc", "train_loss",
               "wall_time_s", "train_images_per_s", "collapsed", "predicted_classes")
DPI = 110
FIGURE_FILES = {
    "accuracy": "test_accuracy.png",
    "curves": "curves_{backbone}.png",
    "lr": "lr_schedule.png",
    "grad": "grad_norm.png",
    "confusion": "confusion_best.png",
    "per_class": "per_class_accuracy.png",
}


# ----------------------------------------------------------------------------- loading the runs

@dataclass(frozen=True)
class Study:
    """Everything the report reads, as pandas frames.

    Attributes:
        params: the study's settings (which runs are expected).
        runs: one row per expected run (backbone, recipe, seed), in study order, with ``status``
            (finished / missing / failed / stale), ``reason`` and the metrics.json values (NaN if not finished).
        history: history.csv of every finished run, with backbone, recipe, seed columns.
        steps: steps.csv of every finished run, with backbone, recipe, seed columns.
        info: run.json of every run that has one (finished or not), keyed by (backbone, recipe, seed).
        runs_name: the runs folder's name, for paths shown in the report.
    """

    params: Params
    runs: pd.DataFrame
    history: pd.DataFrame
    steps: pd.DataFrame
    info: dict[tuple[str, str, int], dict]
    runs_name: str = "runs"

    @property
    def finished(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == FINISHED]

    def current_infos(self) -> list[dict]:
        """run.json of every run of this study that has one (not stale), in study order."""
        keys = [(r.backbone, r.recipe, r.seed) for r in self.runs.itertuples() if r.status != STALE]
        return [self.info[k] for k in keys if k in self.info]

    def first_info(self, backbone: str, recipe: str | None = None) -> dict | None:
        """run.json of the first run (study order) of a backbone (and recipe), finished runs first.

        Stale runs (another study's) are never used: their settings are not this study's.
        """
        order = {(r.backbone, r.recipe, r.seed): (r.status != FINISHED, i) for i, r in enumerate(self.runs.itertuples())
                 if r.status != STALE}
        keys = [k for k in self.info if k in order and k[0] == backbone and (recipe is None or k[1] == recipe)]
        keys.sort(key=lambda k: order.get(k, (True, 1 << 30)))
        return self.info[keys[0]] if keys else None


def expected_runs(params: Params) -> list[tuple[str, str, int]]:
    """The study's runs: backbones x params.study.recipes x params.study.seeds, in that order."""
    return [(b, r, s) for b in BACKBONES for r in params.study.recipes for s in params.study.seeds]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_run(run_dir: Path, study_name: str) -> dict[str, Any]:
    """Read one run folder. Returns a dict with ``status``, ``reason`` and whatever could be read
    (``info`` = run.json, ``metrics``, ``history``, ``steps``)."""
    if not run_dir.is_dir():
        return {"status": MISSING, "reason": "no output folder (not run yet, or its stage failed)"}
    try:
        info = _read_json(run_dir / "run.json")
    except FileNotFoundError:
        return {"status": FAILED, "reason": "run.json missing"}
    except (OSError, ValueError) as exc:
        return {"status": FAILED, "reason": f"run.json unreadable ({type(exc).__name__})"}
    out: dict[str, Any] = {"info": info}
    if info.get("status") != "FINISHED":
        return out | {"status": FAILED, "reason": f"run status {info.get('status')}"}
    if info.get("study", study_name) != study_name:
        return out | {"status": STALE, "reason": f"from study {info.get('study')!r}, not {study_name!r}"}
    readers = {"metrics": ("metrics.json", _read_json), "history": ("history.csv", pd.read_csv),
               "steps": ("steps.csv", pd.read_csv)}
    for key, (name, reader) in readers.items():
        try:
            out[key] = reader(run_dir / name)
        except FileNotFoundError:
            return out | {"status": FAILED, "reason": f"{name} missing"}
        except (OSError, ValueError) as exc:
            return out | {"status": FAILED, "reason": f"{name} unreadable ({type(exc).__name__})"}
    return out | {"status": FINISHED, "reason": ""}


def load_study(runs_dir: Path, params: Params) -> Study:
    """Read every expected run below ``runs_dir`` into a :class:`Study`; absent runs become ``missing`` rows."""
    runs_dir = Path(runs_dir)
    rows, histories, steps, info = [], [], [], {}
    for backbone, recipe, seed in expected_runs(params):
        run = read_run(runs_dir / backbone / recipe / f"seed{seed}", params.study.name)
        key = {"backbone": backbone, "recipe": recipe, "seed": seed}
        row = key | {"variant": f"{backbone}-{recipe}", "status": run["status"], "reason": run["reason"]}
        metrics = run.get("metrics", {}) if run["status"] == FINISHED else {}
        row |= {k: metrics.get(k, np.nan) for k in METRIC_KEYS}
        if "info" in run:
            info[(backbone, recipe, seed)] = run["info"]
            mlflow = run["info"].get("mlflow") or {}
            row |= {"run_id": mlflow.get("run_id", ""), "experiment_id": mlflow.get("experiment_id", "")}
        rows.append(row)
        if run["status"] == FINISHED:
            histories.append(run["history"].assign(**key))
            steps.append(run["steps"].assign(**key))
    frame = pd.DataFrame(rows)
    for col in ("run_id", "experiment_id"):
        frame[col] = frame[col].fillna("") if col in frame else ""
    return Study(
        params=params,
        runs=frame,
        history=pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(),
        steps=pd.concat(steps, ignore_index=True) if steps else pd.DataFrame(),
        info=info,
        runs_name=runs_dir.name,
    )


# ----------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof=1) and 95% Student-t interval of the mean; std/interval NaN when n < 2."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Summary of independent values (e.g. one metric over seeds): t-interval with n-1 df."""
    x = np.asarray([v for v in values if v == v], dtype=float)  # drop NaN
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Paired:
    """A recipe against its reference over the seeds both finished: differences recipe - reference."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    t: float
    p: float


def paired_test(treated: Mapping[int, float], reference: Mapping[int, float], confidence: float = 0.95) -> Paired:
    """Paired t-test by seed (same seed = same initialisation and data order).

    Only seeds present in both are used. With n < 2 there is no interval and no test (NaN). When
    every difference is the same the variance is zero: p = 1 if the difference is 0, else 0 (t = ±inf),
    and the interval collapses to that difference.
    """
    seeds = sorted(set(treated) & set(reference))
    a = np.asarray([treated[s] for s in seeds], dtype=float)
    b = np.asarray([reference[s] for s in seeds], dtype=float)
    d = a - b
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n < 2:
        return Paired(1, mean, math.nan, math.nan, math.nan, math.nan, math.nan)
    std = float(d.std(ddof=1))
    if std <= 1e-12 * max(1.0, abs(mean)):
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        return Paired(n, mean, 0.0, mean, mean, t, 1.0 if mean == 0 else 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_rel(a, b)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Paired(n, mean, std, mean - half, mean + half, float(result.statistic), float(result.pvalue))


def fmt_p(p: float) -> str:
    """p-value for prose: three decimals, or '<0.001'."""
    if p != p:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def effective_batch(train: Mapping[str, Any]) -> int:
    """Images per optimisation step: the (global) batch times the gradient-accumulation steps."""
    return int(train["batch_size"]) * int(train.get("grad_accum_steps", 1))


def verdict(d: Paired, scale: float = 100.0, unit: str = "points", higher_is_better: bool = True) -> str:
    """Words for a paired difference: within seed noise when the 95% interval contains 0, else better/worse."""
    if d.n == 0:
        return "not compared: no seed finished in both"
    if d.n < 2:
        return f"not testable: 1 paired seed (difference {d.mean * scale:+.1f} {unit}, no interval)"
    if d.std == 0 and d.mean == 0:
        return f"within seed noise (identical in every seed, p=1.000, n={d.n})"
    if d.ci_low <= 0 <= d.ci_high:
        return f"within seed noise (p={fmt_p(d.p)}, n={d.n})"
    better = (d.mean > 0) == higher_is_better
    return (f"{'better' if better else 'worse'} by {abs(d.mean) * scale:.1f} {unit} "
            f"(95% CI {d.ci_low * scale:+.1f} to {d.ci_high * scale:+.1f}, p={fmt_p(d.p)}, n={d.n})")


def variant_summary(study: Study) -> pd.DataFrame:
    """One row per variant: n finished of n expected, test accuracy/loss summaries, means of the rest."""
    rows = []
    for (backbone, recipe), g in study.runs.groupby(["backbone", "recipe"], sort=False):
        ok = g[g["status"] == FINISHED]
        acc, loss = summarize(ok["test_acc"]), summarize(ok["test_loss"])
        rows.append({
            "backbone": backbone, "recipe": recipe, "variant": f"{backbone}-{recipe}",
            "n": acc.n, "n_expected": len(g), "n_failed": int((g["status"] != FINISHED).sum()),
            "acc_mean": acc.mean, "acc_std": acc.std, "acc_low": acc.ci_low, "acc_high": acc.ci_high,
            "loss_mean": loss.mean, "loss_std": loss.std, "loss_low": loss.ci_low, "loss_high": loss.ci_high,
            "train_acc_mean": _mean(ok["train_acc"]), "wall_time_mean": _mean(ok["wall_time_s"]),
            "images_per_s_mean": _mean(ok["train_images_per_s"]),
            "collapsed": int(_flag(ok["collapsed"]).sum()),
        })
    return pd.DataFrame(rows)


def _flag(values: pd.Series) -> pd.Series:
    """A boolean column that may hold NaN (not recorded): NaN counts as False."""
    return values.map(lambda v: bool(v) if v == v else False).astype(bool)


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


def compare_recipes(study: Study, reference: str = REFERENCE_RECIPE) -> pd.DataFrame:
    """Every recipe against ``reference`` within each backbone, paired by seed, on test accuracy and loss."""
    rows = []
    if reference not in study.params.study.recipes:
        return pd.DataFrame(rows)
    ok = study.finished
    for backbone in BACKBONES:
        base = ok[(ok["backbone"] == backbone) & (ok["recipe"] == reference)].set_index("seed")
        for recipe in study.params.study.recipes:
            if recipe == reference:
                continue
            other = ok[(ok["backbone"] == backbone) & (ok["recipe"] == recipe)].set_index("seed")
            acc = paired_test(other["test_acc"].to_dict(), base["test_acc"].to_dict())
            loss = paired_test(other["test_loss"].to_dict(), base["test_loss"].to_dict())
            rows.append({"backbone": backbone, "recipe": recipe, "reference": reference, "acc": acc, "loss": loss,
                         "verdict": verdict(acc)})
    return pd.DataFrame(rows)


def predicted_class(info: Mapping) -> str | None:
    """Name of the only class predicted, if the confusion matrix has a single non-empty column."""
    ev = info.get("evaluation") or {}
    cm, classes = ev.get("confusion_matrix"), ev.get("classes")
    if not cm or not classes:
        return None
    used = [c for j, c in enumerate(classes) if sum(row[j] for row in cm) > 0]
    return used[0] if len(used) == 1 else None


def grad_norm_summary(study: Study, threshold: float = paper.CLIP_GRAD_NORM) -> pd.DataFrame:
    """Per variant: the clipping setting and how the pre-clipping gradient norm behaved over all seeds' steps."""
    rows = []
    if study.steps.empty:
        return pd.DataFrame(rows)
    for (backbone, recipe), g in study.steps.groupby(["backbone", "recipe"], sort=False):
        norms = g["grad_norm"].dropna()
        clip = _train_setting(study, backbone, recipe, "clip_grad_norm")
        rows.append({"backbone": backbone, "recipe": recipe, "clip": clip, "steps": len(norms),
                     "median": float(norms.median()) if len(norms) else math.nan,
                     "max": float(norms.max()) if len(norms) else math.nan,
                     "above": float((norms > threshold).mean()) if len(norms) else math.nan})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- formatting

def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of a frame's string values (no index); '|' in cells is escaped."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def fmt_num(x: float | None) -> str:
    """Compact number as the paper writes it: 8e-4, 1e-3, 0.03, 0.1, 4096."""
    if x is None:
        return "none"
    if x == 0:
        return "0"
    if abs(x) < 0.01:
        mantissa, exponent = f"{x:.1e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:g}"


def pct(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{100 * x:.{digits}f}"


def mean_std(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    if mean != mean:
        return "n/a"
    return f"{mean * scale:.{digits}f}" + ("" if std != std else f" ± {std * scale:.{digits}f}")


def interval(low: float, high: float, scale: float = 100.0, digits: int = 2) -> str:
    if low != low:
        return "none (n<2)"
    return f"[{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def short_label(label: str) -> str:
    """'ViT-S/14 DINOv2 (LVD-142M, ...), local checkpoint' -> 'ViT-S/14 DINOv2'."""
    return label.split(" (")[0].split(",")[0]


def backbone_label(study: Study, backbone: str, short: bool = False) -> str:
    """What a backbone is, read from its runs: 'ViT-Ti/16 from scratch' or the pretrained label."""
    info = study.first_info(backbone)
    if info is None:
        return f"{backbone} (no run)"
    cfg = info.get("config") or {}
    pre = info.get("pretrained") or cfg.get("pretrained")
    if backbone == "frozen" and pre:
        label = pre.get("label", pre.get("name", "pretrained"))
        return f"{short_label(label)}, frozen" if short else f"{label}, frozen, new linear head"
    return f"ViT-{cfg.get('model', '?')} from scratch"


# ----------------------------------------------------------------------------- section 1: settings

def _family(model: str) -> tuple[str, int]:
    name, _, patch = model.removeprefix("ViT-").partition("/")
    return name, int(patch) if patch.isdigit() else 0


def table3_rows(model: str) -> tuple[list[dict], str]:
    """Table 3 rows that apply to ``model`` (its family and patch, plus ViT-*); B/16's when none do."""
    def applies(row: dict, fam: str, patch: int) -> bool:
        spec = row["models"].removeprefix("ViT-")
        if spec == "*":
            return True
        name, _, patches = spec.partition("/")
        return name == fam and str(patch) in patches.strip("{}").split(",")

    fam, patch = _family(model)
    rows = [r for r in paper.TABLE3 if r["models"] != "ViT-*" and applies(r, fam, patch)]
    note = ""
    if not rows:
        rows = [r for r in paper.TABLE3 if r["models"] != "ViT-*" and applies(r, "B", 16)]
        note = f"ViT-{model} is not in Table 3: ViT-B/16's rows shown"
    return rows + [r for r in paper.TABLE3 if r["models"] == "ViT-*"], note


def _by_row(rows: list[dict], key: str, fmt=fmt_num) -> str:
    return " · ".join(f"{fmt(r[key]) if not isinstance(r[key], str) else r[key]} ({r['dataset']})" for r in rows)


def _group(values: Mapping[str, str]) -> str:
    """'x' when every recipe has the same value, else 'x (a, b); y (c)'."""
    groups: dict[str, list[str]] = {}
    for recipe, value in values.items():
        groups.setdefault(value, []).append(recipe)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{v} ({', '.join(rs)})" for v, rs in groups.items())


def _coupling(optimizer: str) -> str:
    return ("decoupled (torch.optim.AdamW)" if optimizer == "adamw" else "coupled L2 (torch.optim.Adam)")


def _per_recipe(study: Study, backbone: str) -> dict[str, dict]:
    """run.json of the first run of each recipe of a backbone (recipes with no run.json are left out)."""
    out = {}
    for recipe in study.params.study.recipes:
        info = study.first_info(backbone, recipe)
        if info is not None:
            out[recipe] = info
    return out


def _train_setting(study: Study, backbone: str, recipe: str, key: str) -> Any:
    """A ``config.train`` value of a variant, read from its first run.json (None if absent)."""
    info = study.first_info(backbone, recipe) or {}
    return ((info.get("config") or {}).get("train") or {}).get(key)


def _row(setting: str, paper_value: str, ours: Mapping[str, str], verdicts: Mapping[str, str], why: str) -> dict:
    """One settings row: the worst verdict over recipes ('differs' > 'unstated' > 'same')."""
    rank = {"same": 0, "unstated": 1, "differs": 2}
    worst = max(verdicts.values(), key=rank.__getitem__) if verdicts else "n/a"
    shown = {"same": "same", "unstated": "not stated in paper", "differs": "**differs**", "n/a": "n/a"}[worst]
    return {"Setting": setting, "Paper": paper_value, "Ours": _group(ours), "": shown,
            "Why": why if worst != "same" else ""}


def scratch_settings(study: Study) -> tuple[pd.DataFrame, str]:
    """The from-scratch backbone against pre-training (Table 1, Table 3, Sec. 4.1)."""
    runs = _per_recipe(study, "scratch")
    if not runs:
        return pd.DataFrame(), ""
    first = next(iter(runs.values()))
    model = first["config"]["model"]
    rows3, note = table3_rows(model)
    fam, patch = _family(model)
    t1 = paper.TABLE1.get(fam, {})
    b = paper.TABLE1["B"]
    cfg = {r: i["config"] for r, i in runs.items()}
    tr = {r: c["train"] for r, c in cfg.items()}
    sch = {r: i.get("schedule") or {} for r, i in runs.items()}
    n_train = {r: str(i["data"]["counts"]["train"]["total"]) for r, i in runs.items()}
    m = first.get("model") or {}
    out = []

    ours_model = {r: f"ViT-{c['model']}" for r, c in cfg.items()}
    out.append(_row(
        "Model (Table 1)",
        f"ViT-B/16: {b['layers']} layers, D {b['hidden']}, MLP {b['mlp']}, {b['heads']} heads, {b['params']}",
        {r: f"{v}: {m.get('layers')} layers, D {m.get('hidden')}, MLP {m.get('mlp')}, {m.get('heads')} heads"
         for r, v in ours_model.items()},
        {r: "same" if c["model"] == "B/16" else "differs" for r, c in cfg.items()},
        f"ViT-{model} ({t1.get('source', 'not in Table 1')}) is the `{study.params.study.name}` study's model: "
        "the same architecture at another size.",
    ))
    sizes = " · ".join(f"{v} ({k})" for k, v in sorted(paper.DATASET_IMAGES.items(), key=lambda kv: kv[0]))
    out.append(_row("Training images", sizes,
                    {r: f"{v} ({runs[r]['data'].get('dataset', '?')} train)" for r, v in n_train.items()},
                    {r: "differs" for r in runs},
                    "the study's subject: a ViT on a 3-class Food-101 subset, as in the seed notebook."))
    out.append(_row(
        "Epochs (steps)", _by_row(rows3, "epochs") + f"; ~{paper.IMAGENET_TOTAL_STEPS} steps on ImageNet",
        {r: f"{t['epochs']} ({sch[r].get('total_steps', '?')} steps)" for r, t in tr.items()},
        {r: "same" if str(t["epochs"]) in {x for row in rows3 for x in row["epochs"].split("/")} else "differs"
         for r, t in tr.items()},
        "a 225-image set gives few steps per epoch; schedules are scaled as a fraction of training instead.",
    ))
    out.append(_row("Batch size (effective)", f"{paper.BATCH_SIZE} (Table 3 caption)",
                    {r: str(effective_batch(t)) for r, t in tr.items()},
                    {r: "same" if effective_batch(t) == paper.BATCH_SIZE else "differs" for r, t in tr.items()},
                    f"the seed notebook's batch; the training set is smaller than one batch of {paper.BATCH_SIZE}."))
    betas = paper.BETAS
    out.append(_row(
        "Optimizer, betas", f"{paper.OPTIMIZER}, β1 {betas[0]}, β2 {betas[1]} (Sec. 4.1)",
        {r: f"{'AdamW' if t['optimizer'] == 'adamw' else 'Adam'}, β1 {t['betas'][0]}, β2 {t['betas'][1]}"
         for r, t in tr.items()},
        {r: "differs" if tuple(t["betas"]) != betas else ("unstated" if t["optimizer"] == "adamw" else "same")
         for r, t in tr.items()},
        "AdamW is Adam with decoupled weight decay, which the paper does not specify; betas from train.betas.",
    ))
    lrs = {row["base_lr"] for row in rows3}
    out.append(_row("Base LR", _by_row(rows3, "base_lr"), {r: fmt_num(t["lr"]) for r, t in tr.items()},
                    {r: "same" if t["lr"] in lrs else "differs" for r, t in tr.items()},
                    "the seed notebook's rate, not re-tuned for the smaller batch (no linear LR scaling)."))
    wds = {row["weight_decay"] for row in rows3}
    out.append(_row(
        "Weight decay (coupling)", _by_row(rows3, "weight_decay") + f"; coupling {paper.WEIGHT_DECAY_COUPLING}",
        {r: f"{fmt_num(t['weight_decay'])}, {_coupling(t['optimizer'])}" for r, t in tr.items()},
        {r: "unstated" if t["weight_decay"] in wds else "differs" for r, t in tr.items()},
        "the paper does not say whether weight decay is coupled (L2 in Adam) or decoupled (AdamW); "
        f"we state ours. Sec. 4.1 calls {fmt_num(paper.WEIGHT_DECAY_HIGH)} 'high'.",
    ))
    drops = {row["dropout"] for row in rows3}
    out.append(_row("Dropout", _by_row(rows3, "dropout"), {r: fmt_num(c["dropout"]) for r, c in cfg.items()},
                    {r: "same" if c["dropout"] in drops else "differs" for r, c in cfg.items()},
                    "scratch.dropout in params.yaml."))
    out.append(_row("Resolution", f"{paper.RESOLUTION} (Table 3 caption)",
                    {r: str(c["image_size"]) for r, c in cfg.items()},
                    {r: "same" if c["image_size"] == paper.RESOLUTION else "differs" for r, c in cfg.items()},
                    "scratch.image_size in params.yaml."))
    out.append(_row("Pre-training data", " · ".join(sorted(paper.DATASET_IMAGES)) + " (Table 3)",
                    {r: "none (random initialisation)" for r in runs}, {r: "differs" for r in runs},
                    "trained from scratch on the small set itself, as the seed notebook; the paper pre-trains first."))
    return pd.DataFrame(out), note


def frozen_settings(study: Study) -> pd.DataFrame:
    """The frozen pretrained backbone against the paper's fine-tuning protocol (App. B.1.1)."""
    runs = _per_recipe(study, "frozen")
    if not runs:
        return pd.DataFrame()
    ft = paper.FINETUNE
    cfg = {r: i["config"] for r, i in runs.items()}
    tr = {r: c["train"] for r, c in cfg.items()}
    sch = {r: i.get("schedule") or {} for r, i in runs.items()}
    pre = {r: (i.get("pretrained") or c.get("pretrained") or {}) for (r, i), c in zip(runs.items(), cfg.values())}
    models = {r: i.get("model") or {} for r, i in runs.items()}
    steps = " · ".join(f"{s:,} ({d})" for d, (s, _) in ft["steps_and_lr"].items())
    sweeps = " · ".join(f"{{{', '.join(fmt_num(x) for x in lr)}}} ({d})" for d, (_, lr) in ft["steps_and_lr"].items())
    all_lrs = {x for _, lr in ft["steps_and_lr"].values() for x in lr}
    tv = paper.TORCHVISION_VIT_B16_IMAGENET1K_V1
    first_pre = next(iter(pre.values()))
    if first_pre.get("source") == "torchvision":
        why_backbone = (f"torchvision's IMAGENET1K_V1 (the seed notebook's backbone, acc@1 {tv['acc1']}), "
                        "trained with a DeiT-style recipe, not a checkpoint from the paper.")
    else:
        why_backbone = (f"{first_pre.get('pretraining', 'unknown pre-training')}; results are for this "
                        "backbone, not for the paper's or the seed notebook's ViT-B/16.")
    out = [
        _row("Backbone", "ViT-B/16 (and L, H) pre-trained by the authors",
             {r: p.get("label", "?") for r, p in pre.items()},
             {r: "differs" for r in runs}, why_backbone),
        _row("Pre-training data", " · ".join(sorted(paper.DATASET_IMAGES)) + " (Table 3)",
             {r: p.get("pretraining", "?") for r, p in pre.items()},
             {r: "same" if str(p.get("pretraining", "")).startswith(("ImageNet", "JFT")) else "differs"
              for r, p in pre.items()},
             "not one of the paper's supervised pre-training sets."),
        _row("Trainable parameters", ft["trainable"],
             {r: f"{m.get('params_trainable', 0):,} of {m.get('params_total', 0):,} (new linear head only)"
              for r, m in models.items()},
             {r: "differs" for r in runs},
             "the seed notebook's protocol: frozen features and a linear head (a linear probe)."),
        _row("Training images", "the target set (ImageNet, CIFAR, Pets, Flowers-102, VTAB)",
             {r: f"{i['data']['counts']['train']['total']} ({i['data'].get('dataset', '?')} train)"
              for r, i in runs.items()},
             {r: "differs" for r in runs}, "the study's subject, a 3-class Food-101 subset."),
        _row("Steps", steps, {r: f"{sch[r].get('total_steps', '?')} ({t['epochs']} epochs)" for r, t in tr.items()},
             {r: "same" if sch[r].get("total_steps") in {s for s, _ in ft["steps_and_lr"].values()} else "differs"
              for r, t in tr.items()},
             "the seed notebook's epochs of the small set."),
        _row("Batch size (effective)", f"{ft['batch_size']} (App. B.1.1)", {r: str(effective_batch(t)) for r, t in tr.items()},
             {r: "same" if effective_batch(t) == ft["batch_size"] else "differs" for r, t in tr.items()},
             f"the seed notebook's batch; the training set is smaller than one batch of {ft['batch_size']}."),
        _row("Optimizer", f"{ft['optimizer']}, momentum {ft['momentum']}",
             {r: f"{'AdamW' if t['optimizer'] == 'adamw' else 'Adam'}, β1 {t['betas'][0]}, β2 {t['betas'][1]}"
              for r, t in tr.items()},
             {r: "differs" for r in runs},
             "the seed notebook's optimiser for the head; the paper fine-tunes all weights with SGD."),
        _row("Base LR (sweep)", sweeps, {r: fmt_num(t["lr"]) for r, t in tr.items()},
             {r: "same" if t["lr"] in all_lrs else "differs" for r, t in tr.items()},
             "one value, not swept: the seed notebook's rate."),
        _row("Weight decay", fmt_num(ft["weight_decay"]) + " (App. B.1.1)",
             {r: f"{fmt_num(t['weight_decay'])}" + (f", {_coupling(t['optimizer'])}" if t["weight_decay"] else "")
              for r, t in tr.items()},
             {r: "same" if t["weight_decay"] == ft["weight_decay"] else "differs" for r, t in tr.items()},
             "frozen.weight_decay in params.yaml."),
        _row("Dropout", "not stated", {r: fmt_num(c["dropout"]) for r, c in cfg.items()}, {r: "unstated" for r in runs},
             "the paper states no fine-tuning dropout; the frozen backbone runs in eval mode."),
        _row("Resolution", f"{ft['resolution']} (App. B.1.1)", {r: str(c["image_size"]) for r, c in cfg.items()},
             {r: "same" if c["image_size"] == ft["resolution"] else "differs" for r, c in cfg.items()},
             "the backbone's pre-training resolution; 384 would need interpolated position embeddings "
             "and about 3x the compute per image."),
    ]
    return pd.DataFrame(out)


def recipe_settings(study: Study) -> pd.DataFrame:
    """Warmup (paper steps and the scaled value used), decay and clipping per variant, against the paper."""
    rows = [
        {"Variant": "paper: pre-training (Table 3)",
         "Warmup": f"{paper.WARMUP_STEPS:,} steps (10k, ~{paper.WARMUP_FRACTION} of ~{paper.IMAGENET_TOTAL_STEPS})",
         "Decay": " · ".join(f"{d} ({', '.join(sorted({r['dataset'] for r in paper.TABLE3 if r['decay'] == d}))})"
                             for d in ("linear", "cosine")),
         "Clipping": f"global norm {fmt_num(paper.CLIP_GRAD_NORM)} (ImageNet)", "Deviations": ""},
        {"Variant": "paper: fine-tuning (App. B.1.1)",
         "Warmup": f"not stated (official code: {paper.FINETUNE['warmup_steps_official_code']} steps)",
         "Decay": paper.FINETUNE["decay"], "Clipping": f"global norm {fmt_num(paper.FINETUNE['clip_grad_norm'])}",
         "Deviations": ""},
    ]
    for backbone in BACKBONES:
        for recipe in study.params.study.recipes:
            info = study.first_info(backbone, recipe)
            variant = f"{backbone}-{recipe}"
            if info is None:
                rows.append({"Variant": variant, "Warmup": "n/a", "Decay": "n/a", "Clipping": "n/a",
                             "Deviations": "no run to read"})
                continue
            t, s = info["config"]["train"], info.get("schedule") or {}
            total, warm = s.get("total_steps"), s.get("warmup_steps", 0)
            paper_warm, paper_total = s.get("paper_warmup_steps", paper.WARMUP_STEPS), s.get("paper_total_steps")
            if t["warmup"] and warm:
                warmup = f"{warm} of {total} steps ({100 * warm / total:.1f}%)"
            else:
                warmup = "none"
            scaled, off = [], []  # deviations forced by the small data set / switched off by the recipe
            if backbone == "scratch":
                if warmup == "none":
                    off.append("no warmup")
                else:
                    scaled.append(f"warmup scaled from {paper_warm:,} of {paper_total:,} steps to the same fraction")
                if t["decay"] == "none":
                    off.append("constant rate (paper decays linearly or by cosine)")
            else:
                if warmup != "none":
                    scaled.append("pre-training warmup scaled to this run (paper text: none)")
                if t["decay"] != paper.FINETUNE["decay"]:
                    off.append(f"{t['decay'] if t['decay'] != 'none' else 'constant rate'} (paper: cosine)")
            if t["clip_grad_norm"] is None:
                off.append("no clipping")
            elif t["clip_grad_norm"] != paper.CLIP_GRAD_NORM:
                scaled.append(f"clipping at {fmt_num(t['clip_grad_norm'])}, not {fmt_num(paper.CLIP_GRAD_NORM)}")
            dev = scaled + ([f"ablation: {', '.join(off)}"] if off else [])
            clip = "none" if t["clip_grad_norm"] is None else f"global norm {fmt_num(t['clip_grad_norm'])}"
            rows.append({"Variant": variant, "Warmup": warmup, "Decay": t["decay"], "Clipping": clip,
                         "Deviations": "; ".join(dev) if dev else "as the paper"})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- figures

def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0), **kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    return path


def _legend(ax, **kw) -> None:
    """A legend only when the axis has labelled artists (an empty study has none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _colors(recipes: Sequence[str]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:gray", "tab:olive", "tab:cyan"]
    return {r: palette[i % len(palette)] for i, r in enumerate(recipes)}


def _test_counts(study: Study) -> dict[str, int] | None:
    for info in study.info.values():
        counts = ((info.get("data") or {}).get("counts") or {}).get("test")
        if counts:
            return counts
    return None


def plot_accuracy(study: Study, summary: pd.DataFrame, path: Path) -> Path:
    """Test accuracy per variant: every seed as a dot, the mean with its 95% t-interval, chance and majority lines."""
    recipes = study.params.study.recipes
    fig, axes = _figure(1, len(BACKBONES), (max(6.0, 1.3 * len(recipes) * 2), 4.2), sharey=True)
    counts = _test_counts(study)
    colors = _colors(recipes)
    for ax, backbone in zip(axes[0], BACKBONES):
        for i, recipe in enumerate(recipes):
            row = summary[(summary["backbone"] == backbone) & (summary["recipe"] == recipe)].iloc[0]
            runs = study.finished
            runs = runs[(runs["backbone"] == backbone) & (runs["recipe"] == recipe)]
            if row["n"] == 0:
                ax.text(i, 50, "no finished\nrun", ha="center", va="center", fontsize=8, color="tab:red")
                continue
            offsets = np.linspace(-0.15, 0.15, len(runs)) if len(runs) > 1 else [0.0]
            ax.scatter(i + np.asarray(offsets), 100 * runs["test_acc"].to_numpy(), s=18, color=colors[recipe],
                       alpha=0.6, zorder=3)
            err = None
            if row["n"] >= 2:
                err = [[100 * (row["acc_mean"] - row["acc_low"])], [100 * (row["acc_high"] - row["acc_mean"])]]
            ax.errorbar([i + 0.3], [100 * row["acc_mean"]], yerr=err, fmt="o", color="black", capsize=4, zorder=4)
        seed = paper.SEED_RESULTS[backbone]
        if REFERENCE_RECIPE in recipes:
            ax.scatter([recipes.index(REFERENCE_RECIPE) - 0.3], [100 * seed["correct"] / seed["images"]], marker="*",
                       s=120, color="gold", edgecolor="black", zorder=5, label="seed notebook (per image)")
        if counts:
            classes = [c for c in counts if c != "total"]
            ax.axhline(100 / len(classes), color="gray", ls=":", lw=1, label="chance")
            top = max(classes, key=lambda c: (counts[c], c))
            ax.axhline(100 * counts[top] / counts["total"], color="tab:red", ls="--", lw=1,
                       label=f"always '{top}'")
        ax.set_xticks(range(len(recipes)), recipes, rotation=20)
        ax.set_ylim(0, 100)
        ax.set_title(backbone_label(study, backbone, short=True), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy per image (%)")
    _legend(axes[0][-1], fontsize=7, loc="lower right")
    fig.suptitle("Test accuracy: seeds (dots), mean and 95% t-interval (black)", fontsize=11)
    return _save(fig, path)


def plot_curves(study: Study, backbone: str, path: Path) -> Path:
    """Train/test loss and accuracy per epoch for each recipe of a backbone: mean over seeds, band ±1 std."""
    recipes = study.params.study.recipes
    fig, axes = _figure(len(recipes), 2, (9.0, 2.2 * len(recipes) + 0.6), sharex=True)
    h = study.history
    for ax_row, recipe in zip(axes, recipes):
        g = h[(h["backbone"] == backbone) & (h["recipe"] == recipe)] if not h.empty else h
        n = g["seed"].nunique() if not g.empty else 0
        for ax, metric, scale in ((ax_row[0], "loss", 1.0), (ax_row[1], "acc", 100.0)):
            ax.set_title(f"{backbone}-{recipe} (n={n}): {'loss' if metric == 'loss' else 'accuracy (%)'}", fontsize=9)
            ax.grid(alpha=0.3)
            if g.empty:
                ax.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes, color="tab:red")
                continue
            for split, color in (("train", "tab:blue"), ("test", "tab:orange")):
                stat = g.groupby("epoch")[f"{split}_{metric}"].agg(["mean", "std"]).sort_index()
                ax.plot(stat.index, scale * stat["mean"], color=color, label=split)
                if n >= 2:
                    ax.fill_between(stat.index, scale * (stat["mean"] - stat["std"]),
                                    scale * (stat["mean"] + stat["std"]), color=color, alpha=0.2, lw=0)
    _legend(axes[0][1], fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.suptitle(f"{backbone_label(study, backbone, short=True)}: mean over seeds, band ±1 std", fontsize=11)
    return _save(fig, path)


def plot_lr(study: Study, path: Path) -> Path:
    """The recorded learning rate per step of each recipe (first finished seed), both backbones."""
    recipes = study.params.study.recipes
    ncols = min(4, len(recipes))
    nrows = math.ceil(len(recipes) / ncols)
    fig, axes = _figure(nrows, ncols, (3.2 * ncols, 2.5 * nrows + 0.5), sharey=True)
    s = study.steps
    flat = [ax for row in axes for ax in row]
    for ax, recipe in zip(flat, recipes):
        ax.set_title(recipe, fontsize=9)
        ax.grid(alpha=0.3)
        for backbone, style in zip(BACKBONES, ("-", "--")):
            g = s[(s["backbone"] == backbone) & (s["recipe"] == recipe)] if not s.empty else s
            if g.empty:
                continue
            g = g[g["seed"] == g["seed"].min()].sort_values("step")
            ax.plot(g["step"], g["lr"], ls=style, label=backbone)
        ax.set_xlabel("step")
    for ax in flat[len(recipes):]:
        ax.set_axis_off()
    flat[0].set_ylabel("learning rate")
    _legend(flat[0], fontsize=7)
    fig.suptitle("Learning rate per optimisation step, as recorded (steps.csv)", fontsize=11)
    return _save(fig, path)


def plot_grad_norm(study: Study, path: Path) -> Path:
    """Global gradient norm before clipping per step: each seed a line, the paper's threshold dashed."""
    recipes = study.params.study.recipes
    fig, axes = _figure(len(BACKBONES), len(recipes), (2.8 * len(recipes), 2.4 * len(BACKBONES) + 0.5), sharex=True)
    s = study.steps
    for ax_row, backbone in zip(axes, BACKBONES):
        for ax, recipe in zip(ax_row, recipes):
            g = s[(s["backbone"] == backbone) & (s["recipe"] == recipe)] if not s.empty else s
            ax.grid(alpha=0.3)
            if g.empty or g["grad_norm"].dropna().empty:
                ax.set_title(f"{backbone}-{recipe}", fontsize=8)
                ax.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes, color="tab:red")
                continue
            for seed, gs in g.groupby("seed", sort=True):
                gs = gs.sort_values("step")
                ax.plot(gs["step"], gs["grad_norm"], lw=0.8, alpha=0.8, label=f"seed {seed}")
            ax.axhline(paper.CLIP_GRAD_NORM, color="black", ls="--", lw=1)
            above = float((g["grad_norm"].dropna() > paper.CLIP_GRAD_NORM).mean())
            clip = _train_setting(study, backbone, recipe, "clip_grad_norm")
            ax.set_yscale("log")
            ax.set_title(f"{backbone}-{recipe} ({'clip ' + fmt_num(clip) if clip else 'no clipping'}):\n"
                         f"{100 * above:.0f}% of steps > {fmt_num(paper.CLIP_GRAD_NORM)}", fontsize=8)
        ax_row[0].set_ylabel("grad norm (log)")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle("Gradient norm before clipping; dashed: the paper's clipping threshold "
                 f"{fmt_num(paper.CLIP_GRAD_NORM)}", fontsize=11)
    return _save(fig, path)


def best_runs(study: Study) -> dict[str, tuple[str, int]]:
    """Best finished run per backbone: highest test accuracy, then lowest test loss, then study order."""
    out = {}
    ok = study.finished.reset_index(drop=True)
    for backbone in BACKBONES:
        g = ok[ok["backbone"] == backbone]
        if g.empty:
            continue
        order = g.assign(_pos=range(len(g))).sort_values(["test_acc", "test_loss", "_pos"],
                                                          ascending=[False, True, True])
        best = order.iloc[0]
        out[backbone] = (str(best["recipe"]), int(best["seed"]))
    return out


def plot_confusion(study: Study, path: Path) -> Path:
    """Confusion matrix (test set, counts) of the best run of each backbone."""
    fig, axes = _figure(1, len(BACKBONES), (5.0 * len(BACKBONES), 4.3))
    best = best_runs(study)
    for ax, backbone in zip(axes[0], BACKBONES):
        if backbone not in best:
            ax.set_axis_off()
            ax.set_title(f"{backbone}: no finished run", fontsize=9)
            continue
        recipe, seed = best[backbone]
        ev = study.info[(backbone, recipe, seed)].get("evaluation") or {}
        cm, classes = np.asarray(ev.get("confusion_matrix", [[0]])), ev.get("classes", ["?"])
        draw_confusion(ax, cm.tolist(), classes)
        correct, total = int(np.trace(cm)), int(cm.sum())
        ax.set_title(f"{backbone_label(study, backbone, short=True)}\nbest: {recipe} seed {seed}, {correct}/{total}",
                     fontsize=9)
    fig.suptitle("Confusion matrix of the best run per backbone (test set)", fontsize=11)
    return _save(fig, path)


def per_class_frame(study: Study) -> pd.DataFrame:
    """Per-class test accuracy of every finished run (long format: backbone, recipe, seed, class, accuracy)."""
    rows = []
    for r in study.finished.itertuples():
        ev = study.info[(r.backbone, r.recipe, r.seed)].get("evaluation") or {}
        for cls, acc in (ev.get("per_class_accuracy") or {}).items():
            rows.append({"backbone": r.backbone, "recipe": r.recipe, "seed": r.seed, "class": cls, "accuracy": acc})
    return pd.DataFrame(rows, columns=["backbone", "recipe", "seed", "class", "accuracy"])


def plot_per_class(study: Study, frame: pd.DataFrame, path: Path) -> Path:
    """Per-class test accuracy per variant: mean over seeds, error bar ±1 std."""
    recipes = study.params.study.recipes
    colors = _colors(recipes)
    fig, axes = _figure(1, len(BACKBONES), (6.0 * len(BACKBONES), 4.0), sharey=True)
    classes = list(dict.fromkeys(frame["class"])) if not frame.empty else []
    width = 0.8 / max(1, len(recipes))
    for ax, backbone in zip(axes[0], BACKBONES):
        ax.set_title(backbone_label(study, backbone, short=True), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        for k, recipe in enumerate(recipes):
            g = frame[(frame["backbone"] == backbone) & (frame["recipe"] == recipe)]
            if g.empty:
                continue
            stat = g.groupby("class")["accuracy"].agg(["mean", "std"]).reindex(classes)
            x = np.arange(len(classes)) - 0.4 + width * (k + 0.5)
            ax.bar(x, 100 * stat["mean"], width, yerr=100 * stat["std"].fillna(0), color=colors[recipe],
                   label=recipe, capsize=2)
        ax.set_xticks(range(len(classes)), classes)
        ax.set_ylim(0, 105)
    axes[0][0].set_ylabel("test accuracy of the class (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8)
    fig.suptitle("Per-class test accuracy: mean over seeds, ±1 std", fontsize=11)
    return _save(fig, path)


def write_figures(study: Study, summary: pd.DataFrame, fig_dir: Path) -> dict[str, Path]:
    """Every figure of the report; returns {key: path}. Stale PNGs in ``fig_dir`` are removed."""
    import matplotlib

    figs: dict[str, Path] = {}
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        figs["accuracy"] = plot_accuracy(study, summary, fig_dir / FIGURE_FILES["accuracy"])
        for backbone in BACKBONES:
            name = FIGURE_FILES["curves"].format(backbone=backbone)
            figs[f"curves_{backbone}"] = plot_curves(study, backbone, fig_dir / name)
        figs["lr"] = plot_lr(study, fig_dir / FIGURE_FILES["lr"])
        figs["grad"] = plot_grad_norm(study, fig_dir / FIGURE_FILES["grad"])
        figs["confusion"] = plot_confusion(study, fig_dir / FIGURE_FILES["confusion"])
        figs["per_class"] = plot_per_class(study, per_class_frame(study), fig_dir / FIGURE_FILES["per_class"])
    keep = {p.name for p in figs.values()}
    for stale in sorted(fig_dir.glob("*.png")):
        if stale.name not in keep:
            stale.unlink()
    return figs


# ----------------------------------------------------------------------------- section 5: model

def layer_summary(info: Mapping) -> str:
    """torchinfo layer summary of a run's architecture, rebuilt from run.json (no weights needed).

    A ``model.summary`` string in run.json is used as is when present.
    """
    model = info.get("model") or {}
    if model.get("summary"):
        return str(model["summary"])
    cfg = info.get("config") or {}
    try:
        from .model import VisionTransformer, model_summary, parse_model_name

        classes = (info.get("evaluation") or {}).get("classes") or (info.get("data") or {}).get("classes") or [0, 0, 0]
        vit = VisionTransformer(parse_model_name(cfg["model"], image_size=cfg["image_size"],
                                                 num_classes=len(classes), dropout=cfg.get("dropout", 0.0)))
        if info.get("backbone") == "frozen":  # as trained: only the new head learns
            for name, param in vit.named_parameters():
                param.requires_grad_(name.startswith("heads."))
        return model_summary(vit, batch_size=1, depth=3)
    except Exception as exc:  # the report must still be written; say why the summary is absent
        return f"layer summary unavailable: {type(exc).__name__}: {exc}"


def model_table(study: Study) -> pd.DataFrame:
    """Parameter counts of the runs' models against Table 1 (whose counts include a 1000-class head)."""
    rows = []
    for backbone in BACKBONES:
        info = study.first_info(backbone)
        if info is None:
            rows.append({"Backbone": backbone, "Model": "no run"})
            continue
        m = info.get("model") or {}
        fam, _ = _family(m.get("name", info["config"]["model"]))
        t1 = paper.TABLE1.get(fam, {})
        classes = len((info.get("evaluation") or {}).get("classes") or (info.get("data") or {}).get("classes") or [])
        total = m.get("params_total")
        with_1000 = None
        if total and classes:  # Table 1 counts a 1000-class head: D + 1 parameters per output
            with_1000 = total + (paper.TABLE1_NUM_CLASSES - classes) * (m.get("hidden", 0) + 1)
        rows.append({
            "Backbone": backbone_label(study, backbone, short=True),
            "Model": f"ViT-{m.get('name', '?')}",
            "Layers / D / MLP / heads (ours)": " / ".join(str(m.get(k)) for k in ("layers", "hidden", "mlp", "heads")),
            "Table 1": (f"{t1['layers']} / {t1['hidden']} / {t1['mlp']} / {t1['heads']}" if t1 else "not in Table 1"),
            f"Params ({classes} classes)": f"{total:,}" if total else "?",
            "Params with a 1000-class head": f"{with_1000:,}" if with_1000 else "?",
            "Table 1 params": f"{t1['params']} ({t1['source']})" if t1 else "n/a",
            "Trainable": f"{m.get('params_trainable', 0):,}",
        })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- markdown

def _device(prov: Mapping) -> str:
    """'cpu (x86_64, 2 threads), fp32' / 'cuda (NVIDIA H100 80GB HBM3), bf16' from a run's provenance."""
    device, name = prov.get("device", "?"), prov.get("device_name", "")
    where = name if name.startswith(device) else f"{device} ({name or '?'})"
    return f"{where}, {prov.get('precision', '?')}"


def _unique(values: Sequence[Any]) -> list[Any]:
    return sorted({v for v in values if v not in (None, "")}, key=str)


def header_lines(study: Study) -> list[str]:
    """Title, study, device, backbones, data set and completeness: the report's first lines."""
    p = study.params
    infos = study.current_infos()
    prov = [i.get("provenance") or {} for i in infos]
    devices = _unique([_device(x) for x in prov])
    data = next((i.get("data") for i in infos if i.get("data")), None) or {}
    counts = data.get("counts") or {}
    n_total = len(study.runs)
    not_ok = study.runs[study.runs["status"] != FINISHED]
    lines = [
        "# Vision Transformer reproducibility study: pizza, steak, sushi",
        "",
        f"*An Image is Worth 16x16 Words* ({paper.PAPER}), reproduced on a 3-class Food-101 subset.",
        "",
        f"- **Study:** `{p.study.name}`: {len(BACKBONES)} backbones x {len(p.study.recipes)} recipes "
        f"({', '.join(p.study.recipes)}) x {len(p.study.seeds)} seeds ({', '.join(map(str, p.study.seeds))})",
        f"- **Backbones:** scratch = {backbone_label(study, 'scratch')}; frozen = {backbone_label(study, 'frozen')}",
        f"- **Hardware:** {'; '.join(devices) if devices else 'not recorded'}",
        f"- **Data:** {data.get('dataset', p.data.dataset)}, "
        f"{(counts.get('train') or {}).get('total', '?')} train / "
        f"{(counts.get('test') or {}).get('total', '?')} test images",
    ]
    if not_ok.empty:
        lines.append(f"- **Status:** complete, all {n_total} runs finished.")
    else:
        count = {st: int((not_ok["status"] == st).sum()) for st in (MISSING, FAILED, STALE)}
        others = "".join(f", {count[st]} {st}" for st in (FAILED, STALE) if count[st])
        lines += ["", f"> **Incomplete study: {count[MISSING]} of {n_total} runs missing{others}.** "
                  f"Statistics use only the finished runs ({n_total - len(not_ok)} of {n_total}). Not finished:", ">"]
        for r in not_ok.itertuples():
            lines.append(f"> - `{study.runs_name}/{r.backbone}/{r.recipe}/seed{r.seed}`: **{r.status}**: {r.reason}")
    return lines


def section_settings(study: Study) -> list[str]:
    scratch, note = scratch_settings(study)
    frozen = frozen_settings(study)
    out = ["## 1. Settings against the paper", "",
           "Paper values come from `vit_repro.paper` (Table 1, Table 3, Sec. 4.1, App. B.1.1); ours are read from "
           "each variant's `run.json`. Every row that is not the same as the paper says why.", ""]
    out += ["### From-scratch backbone against pre-training (Table 1, Table 3, Sec. 4.1)", ""]
    if scratch.empty:
        out += ["No scratch run recorded its settings.", ""]
    else:
        out += [markdown_table(scratch), ""] + ([f"Note: {note}.", ""] if note else [])
    out += ["### Frozen backbone against fine-tuning (App. B.1.1)", ""]
    out += ([markdown_table(frozen), ""] if not frozen.empty else ["No frozen run recorded its settings.", ""])
    out += ["### Recipes: warmup, decay and clipping", "",
            "Recipes switch the paper's warmup, decay and clipping on and off one at a time; `paper` has all three. "
            "Warmup is scaled to the paper's fraction of training (`run.json` schedule).", "",
            markdown_table(recipe_settings(study)), ""]
    return out


def section_results(study: Study, summary: pd.DataFrame) -> list[str]:
    ok = study.finished
    rows = []
    for r in summary.itertuples():
        seed_col = ""
        if r.recipe == REFERENCE_RECIPE:
            s = paper.SEED_RESULTS[r.backbone]
            seed_col = (f"{pct(s['correct'] / s['images'], 1)} ({s['correct']}/{s['images']}; "
                        f"printed {s['printed_acc']})")
        rows.append({
            "Variant": r.variant, "n": f"{r.n} of {r.n_expected}",
            "Test acc % (mean ± std)": mean_std(r.acc_mean, r.acc_std), "Acc 95% CI": interval(r.acc_low, r.acc_high),
            "Test loss (mean ± std)": mean_std(r.loss_mean, r.loss_std, 1.0, 4),
            "Loss 95% CI": interval(r.loss_low, r.loss_high, 1.0, 4),
            "Train acc %": pct(r.train_acc_mean), "Wall time s": "n/a" if r.wall_time_mean != r.wall_time_mean
            else f"{r.wall_time_mean:.1f}",
            "Images/s": "n/a" if r.images_per_s_mean != r.images_per_s_mean else f"{r.images_per_s_mean:.1f}",
            "Collapsed": f"{r.collapsed} of {r.n}", "Seed notebook %": seed_col,
        })
    per_run = []
    for r in study.runs.itertuples():
        fin = r.status == FINISHED
        per_run.append({
            "Variant": r.variant, "Seed": r.seed, "Status": r.status if fin else f"**{r.status}**: {r.reason}",
            "Test correct": f"{int(r.test_correct)}/{int(r.test_images)}" if fin else "",
            "Test acc %": pct(r.test_acc) if fin else "", "Test loss": f"{r.test_loss:.4f}" if fin else "",
            "Train acc %": pct(r.train_acc) if fin else "",
            "Collapsed": ("yes" + (f" ('{predicted_class(study.info[(r.backbone, r.recipe, r.seed)])}')"
                                   if predicted_class(study.info[(r.backbone, r.recipe, r.seed)]) else "")
                          if r.collapsed else "no") if fin else "",
        })
    notes = []
    scratch_info, frozen_info = study.first_info("scratch"), study.first_info("frozen")
    if scratch_info and scratch_info["config"]["model"] != "B/16":
        notes.append(f"The seed notebook trained ViT-B/16 from scratch; this study's scratch model is "
                     f"ViT-{scratch_info['config']['model']}, so its seed column is a reference point, "
                     "not a replication.")
    if frozen_info and ((frozen_info.get("pretrained") or {}).get("source") != "torchvision"):
        notes.append(f"The seed notebook's frozen backbone was torchvision's ViT-B/16 IMAGENET1K_V1; this study's is "
                     f"{short_label((frozen_info.get('pretrained') or {}).get('label', '?'))}.")
    return [
        "## 2. Results", "",
        f"Accuracy is per image (correct / {int(ok['test_images'].iloc[0]) if not ok.empty else '?'} test images), "
        "mean ± sample std over seeds with a 95% Student-t interval (n-1 df; none for n<2). "
        "The seed notebook printed batch-averaged accuracy; its per-image value is shown beside our baseline.", "",
        markdown_table(pd.DataFrame(rows)), "",
        *[f"- {n}" for n in notes], *([""] if notes else []),
        "Every run:", "", markdown_table(pd.DataFrame(per_run)), "",
    ]


def section_comparison(study: Study, summary: pd.DataFrame) -> list[str]:
    comp = compare_recipes(study)
    out = ["## 3. What the paper's recipe changes", ""]
    if comp.empty:
        out += [f"No comparison: the study has no `{REFERENCE_RECIPE}` recipe to compare against.", ""]
    else:
        out += [f"Each recipe against `{REFERENCE_RECIPE}` of the same backbone, paired by seed (same seed: same "
                "initialisation and data order): mean difference in test accuracy (points), its 95% t-interval, "
                "and the paired t-test (scipy `ttest_rel`). A difference whose interval contains 0 is within "
                "seed noise.", ""]
        rows = [{"Backbone": r.backbone, "Recipe": r.recipe, "Pairs": r.acc.n,
                 "Δ acc (points)": "n/a" if r.acc.n == 0 else f"{100 * r.acc.mean:+.2f}",
                 "95% CI": interval(r.acc.ci_low, r.acc.ci_high) if r.acc.n >= 2 else "none (n<2)",
                 "p (paired t)": fmt_p(r.acc.p), "Δ test loss": "n/a" if r.loss.n == 0 else f"{r.loss.mean:+.4f}",
                 "Verdict": r.verdict} for r in comp.itertuples()]
        out += [markdown_table(pd.DataFrame(rows)), "", "Conclusions:", ""]
        collapsed = {(r.backbone, r.recipe): (r.collapsed, r.n) for r in summary.itertuples()}
        for r in comp.itertuples():
            label = backbone_label(study, r.backbone, short=True)
            line = f"- {label}: `{r.recipe}` against `{r.reference}`: {r.verdict}"
            k, n = collapsed.get((r.backbone, r.recipe), (0, 0))
            if k and not r.verdict.startswith("within"):
                line += (f"; but {k} of {n} `{r.recipe}` seeds predict one class for every test image, so the "
                         "difference reflects which class it collapsed to, not better features")
            out.append(line + ".")
        out.append("")
    out += ["Collapse (one class predicted for every test image):", ""]
    for r in summary.itertuples():
        if r.n == 0:
            out.append(f"- {r.variant}: no finished run.")
            continue
        g = study.finished[(study.finished["backbone"] == r.backbone) & (study.finished["recipe"] == r.recipe)]
        seeds = g[_flag(g["collapsed"])]["seed"]
        classes = _unique([predicted_class(study.info[(r.backbone, r.recipe, s)]) for s in seeds])
        what = f" (always {', '.join(repr(c) for c in classes)})" if classes else ""
        flag = "**collapsed**" if r.collapsed else "no collapse"
        out.append(f"- {r.variant}: {flag}: {r.collapsed} of {r.n} seeds{what}.")
    out.append("")
    gn = grad_norm_summary(study)
    if not gn.empty:
        out += [f"Gradient clipping evidence: the global gradient norm before clipping, over all steps of all seeds; "
                f"the paper clips at {fmt_num(paper.CLIP_GRAD_NORM)}. Clipping can only matter where the norm "
                "exceeds it.", ""]
        out += [markdown_table(pd.DataFrame([
            {"Variant": f"{r.backbone}-{r.recipe}",
             "Clipping": "none" if r.clip is None or r.clip != r.clip else fmt_num(r.clip),
             "Steps": r.steps, "Median norm": f"{r.median:.3g}", "Max norm": f"{r.max:.3g}",
             f"Steps > {fmt_num(paper.CLIP_GRAD_NORM)}": pct(r.above, 1) + "%"} for r in gn.itertuples()])), ""]
    return out


def section_figures(figs: Mapping[str, Path], out_dir: Path) -> list[str]:
    captions = [
        ("accuracy", "Test accuracy per variant: every seed, the mean with its 95% interval, chance, the "
                     "always-majority-class level and the seed notebook's per-image number."),
        *[(f"curves_{b}", f"Train and test loss and accuracy per epoch, {b} backbone: mean over seeds, band ±1 std.")
          for b in BACKBONES],
        ("lr", "Learning-rate schedule of each recipe as recorded per step."),
        ("grad", "Gradient norm before clipping per step (log scale), with the paper's threshold: the evidence for or "
                 "against clipping."),
        ("confusion", "Confusion matrix of the best run of each backbone."),
        ("per_class", "Per-class test accuracy per variant."),
    ]
    out = ["## 4. Figures", ""]
    for key, caption in captions:
        rel = figs[key].relative_to(out_dir).as_posix()
        out += [f"**{caption}**", "", f"![{key}]({rel})", ""]
    return out


def section_model(study: Study) -> list[str]:
    out = ["## 5. Model", "",
           f"Table 1 counts a {paper.TABLE1_NUM_CLASSES}-class head; the column 'with a 1000-class head' adds "
           f"{paper.TABLE1_NUM_CLASSES} - k outputs of D + 1 parameters each to ours. Reference: torchvision's "
           f"vit_b_16 has {paper.VIT_B16_PARAMS_1000_CLASSES:,} parameters, {paper.VIT_B16_PARAMS_3_CLASSES:,} "
           "with 3 classes.", "",
           markdown_table(model_table(study)), ""]
    for backbone in BACKBONES:
        info = study.first_info(backbone)
        if info is None:
            continue
        m = info.get("model") or {}
        title = f"Layer summary: {backbone_label(study, backbone, short=True)} (ViT-{info['config']['model']})"
        body = layer_summary(info)
        if backbone == "frozen":
            body += (f"\n\nTrainable: {m.get('params_trainable', 0):,} of {m.get('params_total', 0):,} parameters "
                     "(the new linear head; the backbone is frozen)")
        out += ["<details>", f"<summary>{title}</summary>", "", "```text", body.rstrip(), "```", "", "</details>", ""]
    return out


def section_provenance(study: Study) -> list[str]:
    infos = study.current_infos()
    prov = [i.get("provenance") or {} for i in infos]
    data = [i.get("data") or {} for i in infos]
    out = ["## 6. Provenance", ""]
    d0 = next((d for d in data if d), {})
    digests = _unique([d.get("digest") for d in data])
    out += [f"- **Dataset:** {d0.get('dataset', '?')}; source: {d0.get('source', 'not recorded in run.json')}; "
            f"digest {', '.join(f'`{x}`' for x in digests) or 'not recorded'}"
            + (" (**runs used different data**)" if len(digests) > 1 else "")]
    counts = d0.get("counts") or {}
    if counts:
        classes = [c for c in (counts.get("train") or {}) if c != "total"]
        frame = pd.DataFrame([{"Split": split, **{c: (counts.get(split) or {}).get(c, "?") for c in classes},
                               "total": (counts.get(split) or {}).get("total", "?")} for split in ("train", "test")])
        out += ["", markdown_table(frame), ""]
    pre = _unique([json.dumps(i.get("pretrained"), sort_keys=True) for i in infos if i.get("pretrained")])
    for p in map(json.loads, pre):
        source_sha = f" (source file sha256 `{p['source_sha256']}`)" if p.get("source_sha256") else ""
        out.append(f"- **Pretrained weights:** {p.get('label', '?')} (`{p.get('name', '?')}`, "
                   f"ViT-{p.get('model', '?')}, source {p.get('source', '?')}); "
                   f"sha256 `{p.get('sha256') or 'not recorded'}`{source_sha}; "
                   f"pre-training: {p.get('pretraining', '?')}; "
                   f"transform {json.dumps(p.get('transform'), sort_keys=True)}")
    commits = _unique([x.get("git_commit") for x in prov])
    dirty = any(bool(x.get("git_dirty")) for x in prov)
    out.append(f"- **Code:** git commit {', '.join(f'`{c}`' for c in commits) or 'not recorded'}"
               + (f" (**{len(commits)} different commits**)" if len(commits) > 1 else "")
               + ("; **some runs had uncommitted changes**" if dirty else "; clean working tree"))
    for key, label in (("python", "Python"), ("torch", "torch"), ("torchvision", "torchvision"), ("mlflow", "MLflow"),
                       ("platform", "Platform")):
        vals = _unique([x.get(key) for x in prov])
        out.append(f"- **{label}:** {', '.join(map(str, vals)) or 'not recorded'}")
    devices = _unique([_device(x) for x in prov])
    out.append(f"- **Device and precision:** {'; '.join(devices) or 'not recorded'}")
    dates = _unique([x.get("finished_at") for x in prov])
    out.append(f"- **Date:** {'last run finished ' + max(dates) if dates else 'not recorded in run.json'}")
    out.append("")
    uris = _unique([(i.get("mlflow") or {}).get("tracking_uri") for i in infos])
    out += ["MLflow runs. Open the UI with " + (", or ".join(f"`mlflow ui --backend-store-uri {u}`" for u in uris)
            if uris else "`mlflow ui`") + " and append the path below to its address (http://127.0.0.1:5000/).", ""]
    rows = []
    for r in study.runs.itertuples():
        info = study.info.get((r.backbone, r.recipe, r.seed)) or {}
        ml = info.get("mlflow") or {}
        run_id = ml.get("run_id")
        rows.append({"Variant": r.variant, "Seed": r.seed, "Status": r.status,
                     "Run id": f"`{run_id}`" if run_id else "none",
                     "UI path": f"`#/experiments/{ml.get('experiment_id')}/runs/{run_id}`" if run_id else "",
                     "DVC stage": (info.get("provenance") or {}).get("dvc_stage", "")})
    out += [markdown_table(pd.DataFrame(rows)), ""]
    return out


def render_report(study: Study, figs: Mapping[str, Path], out_dir: Path) -> str:
    """The whole markdown document."""
    summary = variant_summary(study)
    lines = header_lines(study) + [""]
    lines += section_settings(study)
    lines += section_results(study, summary)
    lines += section_comparison(study, summary)
    lines += section_figures(figs, out_dir)
    lines += section_model(study)
    lines += section_provenance(study)
    return "\n".join(lines).rstrip() + "\n"


def build_report(runs_dir: Path, params: Params, out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` and ``out_dir/figures/*.png`` from the runs below ``runs_dir``.

    Returns the report's path. The same runs and params give byte-identical files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = load_study(Path(runs_dir), params)
    figs = write_figures(study, variant_summary(study), out_dir / "figures")
    path = out_dir / "report.md"
    path.write_text(render_report(study, figs, out_dir))
    return path
