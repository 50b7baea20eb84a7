"""Each arm's settings beside the paper's, as rows of data: what the paper did, what we did, whether that is
the same value under the same conditions, and why not.

A from-scratch arm is compared with pre-training (Table 1, Table 3's ImageNet row, Sec. 4.1), a frozen arm with
fine-tuning (App. B.1.1). "same" is only ever claimed for the same value under the same conditions: a learning
rate at another batch size is not the same, so the rate rows show the paper's value, its batch-scaled values and
ours. ``None`` from a row's ``same`` means the paper does not say.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core import paper
from ..core.record import RunRecord
from ..tables import fmt_num

Rec = RunRecord


@dataclass(frozen=True)
class Setting:
    name: str
    paper: Callable[[Rec], str]
    ours: Callable[[Rec], str]
    same: Callable[[Rec], bool | None]
    why: Callable[[Rec], str]


def _const(text: str) -> Callable[[Rec], str]:
    return lambda r: text


def _is_vit(r: Rec) -> bool:
    return r.config.model.startswith("vit:")


def _model(r: Rec) -> str:
    m = r.model
    if not _is_vit(r):
        return f"{r.config.model} (a CNN, {m.params_total:,} parameters)"
    return f"ViT-{r.config.model[4:]}: {m.layers} layers, D {m.hidden}, MLP {m.mlp}, {m.heads} heads, {m.params_total:,} parameters"


def _lr_rows(r: Rec, reference: float) -> str:
    b = r.schedule.effective_batch
    return (f"{fmt_num(reference)} at batch {paper.BATCH_SIZE}; at batch {b}: {fmt_num(paper.scaled_lr(reference, b, 'linear'))} "
            f"(linear), {fmt_num(paper.scaled_lr(reference, b, 'sqrt'))} (square root)")


def _our_lr(r: Rec) -> str:
    s = r.schedule
    rule = {"none": "used as set", "linear": "linearly scaled", "sqrt": "square-root scaled"}[s.lr_scaling]
    base = f" from {fmt_num(s.lr)} at batch {s.lr_reference_batch}" if s.lr_scaling != "none" else ""
    return f"{fmt_num(s.effective_lr)} at batch {s.effective_batch} ({rule}{base})"


def _optimizer(r: Rec) -> str:
    t = r.config.train
    if t.optimizer == "lbfgs":
        return "L-BFGS (scikit-learn logistic regression, to convergence)"
    name = {"adam": "Adam, coupled L2 weight decay", "adamw": "AdamW, decoupled weight decay"}[t.optimizer]
    return f"{name}, β {t.betas[0]}/{t.betas[1]}"


def _augment(r: Rec) -> str:
    a = r.config.augment
    parts = ([f"random-resized crop (scale {a.crop_scale[0]}-{a.crop_scale[1]})"] if a.crop_scale else []) + \
        (["horizontal flip"] if a.flip else []) + (["TrivialAugment"] if a.trivial_augment else [])
    return ", ".join(parts) or "none"


def _steps(r: Rec) -> str:
    s = r.schedule
    if r.config.train.optimizer == "lbfgs":
        return f"full batch to convergence ({(r.search or {}).get('iterations', '?')} L-BFGS iterations)"
    return (f"{s.epochs} epoch{'s' * (s.epochs != 1)} of {s.images} images: {s.total_steps:,} steps, "
            f"{s.total_steps * s.effective_batch:,} images seen")


def _last_batch(r: Rec) -> str:
    s = r.schedule
    if s.images % s.batch_size == 0:
        return "none (the images divide into batches)"
    skipped = s.images % s.batch_size
    return (f"dropped ({skipped} image{'s' * (skipped != 1)} skipped per epoch)" if s.drop_last
            else f"kept: a {s.last_batch}-image step every epoch (the seed notebook's)")


PRETRAIN = paper.IMAGENET_ROW


def _rows_of(r: Rec) -> dict[str, list[str]]:
    """Which Table 3 rows each of the run's settings comes from (the rate before batch scaling)."""
    t = r.config.train
    lr = t.lr if t.lr_scaling != "none" else r.schedule.effective_lr
    picks = {"learning rate": lambda row: row.base_lr == lr, "weight decay": lambda row: row.weight_decay == t.weight_decay}
    if _is_vit(r):  # ResNet-18 has no dropout to match
        picks["dropout"] = lambda row: row.dropout == r.config.dropout
    return {name: sorted({row.dataset for row in paper.TABLE3 if match(row)}) for name, match in picks.items()}


def _table3(r: Rec) -> str:
    return "; ".join(f"{name}: {', '.join(rows) or 'no row'}" for name, rows in _rows_of(r).items())


def _one_row(r: Rec) -> bool:
    return bool(set.intersection(*(set(rows) for rows in _rows_of(r).values())))


SCRATCH_ROWS: tuple[Setting, ...] = (
    Setting("Model (Table 1)", _const("ViT-B/16: {0.layers} layers, D {0.hidden}, MLP {0.mlp}, {0.heads} heads, {0.params_millions:g}M "
                                      "(and L, H)".format(paper.TABLE1["B"])), _model,
            lambda r: r.config.model == "vit:B/16",
            lambda r: ("the same architecture at the size a CPU affords" if _is_vit(r)
                       else "the paper's comparison is a CNN; ResNet-18 is its smallest torchvision form (random init)")),
    Setting("Training data", _const(f"ImageNet, {paper.DATASET_IMAGES['ImageNet']:,} images (Table 3 row followed); "
                                    "ImageNet-21k and JFT-300M for the large models"),
            lambda r: f"{r.data.train_images} images of 3 Food-101 classes (train set {r.data.train_set})",
            lambda r: False, _const("the study's subject: a ViT on a small 3-class set, as in the seed notebook")),
    Setting("Resolution, patch", _const(f"{paper.RESOLUTION} px, patch 16"),
            lambda r: f"{r.config.image_size} px" + (f", patch {r.model.patch}" if _is_vit(r) else ""),
            lambda r: r.config.image_size == paper.RESOLUTION and r.model.patch in (16, None),
            lambda r: ("the seed notebook's resolution" if r.config.image_size == paper.RESOLUTION else
                       f"{r.config.image_size} px makes a run ~{(paper.RESOLUTION / r.config.image_size) ** 2:.0f}x cheaper, "
                       "so a CPU can afford the seeds and epochs training needs (benchmarks/README.md, regime sweep)")),
    Setting("Schedule length", _const(f"{PRETRAIN.epochs} epochs of ImageNet at batch {paper.BATCH_SIZE}: "
                                      f"~{paper.IMAGENET_STEPS:,} steps, ~{paper.IMAGENET_STEPS * paper.BATCH_SIZE / 1e6:.0f}M images seen"),
            _steps, lambda r: False,
            _const("a fixed budget of images for this CPU; warmup and decay are scaled as shares of training")),
    Setting("Batch size", _const(f"{paper.BATCH_SIZE} (Table 3 caption)"), lambda r: str(r.schedule.effective_batch),
            lambda r: r.schedule.effective_batch == paper.BATCH_SIZE,
            _const(f"the seed notebook's batch; a training set of a few hundred images is smaller than one batch of {paper.BATCH_SIZE}")),
    Setting("Optimizer", _const(f"{paper.OPTIMIZER}, β {paper.BETAS[0]}/{paper.BETAS[1]} (Sec. 4.1); coupling of weight decay not stated"),
            _optimizer, lambda r: None,
            _const("the paper does not say whether weight decay is coupled (L2 in Adam) or decoupled (AdamW): we state ours")),
    Setting("Base learning rate", lambda r: _lr_rows(r, PRETRAIN.base_lr) + f" (ImageNet row; {fmt_num(paper.TABLE3[4].base_lr)} for ImageNet-21k)",
            _our_lr, lambda r: False,
            lambda r: (f"the paper's rate scaled to our batch by a stated rule ({r.schedule.lr_scaling} in the batch ratio), "
                       "the candidate with the best validation balanced accuracy in the regime sweep "
                       "(benchmarks/scratch_regime.md)" if r.schedule.lr_scaling != "none"
                       else "the seed notebook's rate, 1e-3, used unscaled at 1/128 of the paper's batch")),
    Setting("Table 3 row followed", _const("one row per pre-training set: its rate, decay, weight decay and dropout "
                                           "belong together"), _table3, _one_row,
            lambda r: f"the values come from different rows ({_table3(r)}), the warmup share and cosine decay from the "
                      "ImageNet row: a mix the paper never ran (the seed notebook's settings)"),
    Setting("Weight decay", _const(f"{fmt_num(PRETRAIN.weight_decay)} (ImageNet row); 0.03 (ImageNet-21k), 0.1 (JFT); "
                                   "Sec. 4.1: 'high weight decay of 0.1'"),
            lambda r: f"{fmt_num(r.config.train.weight_decay)}, " + ("decoupled" if r.config.train.optimizer == "adamw" else "coupled (L2)"),
            lambda r: None if r.config.train.weight_decay == PRETRAIN.weight_decay else False,
            lambda r: ("the ImageNet row's value; the paper does not state its coupling" if
                       r.config.train.weight_decay == PRETRAIN.weight_decay else
                       "the seed notebook's value (Sec. 4.1's 'high' 0.1, the JFT rows), not the ImageNet row's")),
    Setting("Dropout", _const(f"{fmt_num(PRETRAIN.dropout)} (ImageNet row), after every dense layer but qkv and after the position add"),
            lambda r: fmt_num(r.config.dropout) if _is_vit(r) else "none (ResNet-18 has no dropout)",
            lambda r: _is_vit(r) and r.config.dropout == PRETRAIN.dropout,
            _const("ResNet-18 as torchvision defines it")),
    Setting("Data augmentation", _const(paper.AUGMENTATION), _augment,
            lambda r: None if not r.config.augment.enabled else False,
            lambda r: ("none: the seed notebook used none, and crops and flips did not help in the regime sweep at this "
                       "budget (benchmarks/scratch_regime.md)" if not r.config.augment.enabled else
                       "random-resized crops and flips, as inception crop + flip, at our resolution (torchvision.transforms.v2)")),
    Setting("Classifier head", _const(paper.PRETRAIN_HEAD), lambda r: "one linear layer, zero-initialised",
            lambda r: False, _const("the fine-tuning head from the start: a 3-class problem needs no pre-training head")),
    Setting("Last, incomplete batch", _const("not stated (it is negligible at 1.28M images)"), _last_batch, lambda r: None,
            lambda r: "a choice the paper never faces; the frozen arm measures its effect"),
    Setting("Model selection", _const("hyperparameters chosen on held-out sub-splits of the training data (App. B.1.1)"),
            lambda r: ("the seed notebook's settings, fixed before training" if r.schedule.lr_scaling == "none" else
                       "the regime chosen on a validation fold of the training set (benchmarks/scratch_regime.py), "
                       "never on the test set") + "; the final weights are the last ones",
            lambda r: None, _const("")),
)

FINETUNE = paper.FINETUNE
FROZEN_ROWS: tuple[Setting, ...] = (
    Setting("Backbone", _const("ViT-B/16, L/16, H/14 pre-trained by the authors (ImageNet-21k, JFT-300M)"),
            lambda r: f"{r.backbone.label}; {r.backbone.provenance}", lambda r: False,
            lambda r: f"{r.backbone.pretraining}: results are for this backbone, not the paper's"),
    Setting("Trainable parameters", _const(FINETUNE.trainable),
            lambda r: f"{r.model.params_trainable:,} of {r.model.params_total:,} (the head; the backbone is frozen)",
            lambda r: False, _const("the seed notebook's protocol: frozen features and a new head (a linear probe)")),
    Setting("Head", _const(FINETUNE.head),
            lambda r: ("one zero-initialised linear layer" if r.config.train.optimizer != "lbfgs"
                       else "one linear layer: multinomial logistic regression"),
            lambda r: r.config.train.optimizer != "lbfgs", _const("a logistic regression is that layer, solved exactly")),
    Setting("Resolution", _const(f"{FINETUNE.resolution} px"), lambda r: f"{r.config.image_size} px",
            lambda r: r.config.image_size == FINETUNE.resolution,
            _const("the backbone's pre-training resolution; 384 px would need resampled position embeddings and ~3x compute")),
    Setting("Steps", _const(" · ".join(f"{s:,} ({d})" for d, (s, _) in FINETUNE.steps_and_lr.items())), _steps,
            lambda r: False, _const("the seed notebook's 10 epochs of the small set")),
    Setting("Batch size", _const(f"{FINETUNE.batch_size}"),
            lambda r: "all images (full batch)" if r.config.train.optimizer == "lbfgs" else str(r.schedule.effective_batch),
            lambda r: r.schedule.effective_batch == FINETUNE.batch_size,
            _const(f"the seed notebook's batch; the training set is smaller than one batch of {FINETUNE.batch_size}")),
    Setting("Optimizer", _const(f"{FINETUNE.optimizer}, momentum {FINETUNE.momentum}"), _optimizer, lambda r: False,
            _const("the seed notebook's Adam for the head; L-BFGS for the converged reference")),
    Setting("Learning rate", _const("swept: " + " · ".join(f"{{{', '.join(fmt_num(x) for x in lr)}}} ({d})"
                                                          for d, (_, lr) in FINETUNE.steps_and_lr.items())),
            lambda r: "none (solved to convergence)" if r.config.train.optimizer == "lbfgs" else _our_lr(r),
            lambda r: False, _const("an Adam rate is not comparable with an SGD rate; not swept: the seed notebook's")),
    Setting("Weight decay / L2", _const(f"{fmt_num(FINETUNE.weight_decay)}"),
            lambda r: (f"C = {(r.search or {}).get('C')} chosen on the validation fold" if r.config.train.optimizer == "lbfgs"
                       else fmt_num(r.config.train.weight_decay)),
            lambda r: r.config.train.optimizer != "lbfgs" and r.config.train.weight_decay == FINETUNE.weight_decay,
            _const("a converged logistic regression needs some L2 to be well defined; chosen on validation data")),
    Setting("Data augmentation", _const("random crop and flip (official code)"), _augment, lambda r: False,
            _const("features are computed once per image, as in the seed notebook")),
    Setting("Last, incomplete batch", _const("not stated"), _last_batch, lambda r: None,
            _const("the seed notebook kept a 1-image batch; measured here both ways")),
)


def rows(records: list[Rec], table: tuple[Setting, ...]) -> list[dict[str, str]]:
    """One row per setting: the paper's value, ours (per variant when they differ), same / differs / not stated, why."""
    out = []
    for setting in table:
        ours: dict[str, list[str]] = {}
        verdicts = set()
        for r in records:
            ours.setdefault(setting.ours(r), []).append(r.variant)
            verdicts.add(setting.same(r))
        if len(ours) == 1:
            shown = next(iter(ours))
        else:
            shown = "; ".join(f"{value} ({', '.join(v.split('/', 1)[1] for v in variants)})" for value, variants in ours.items())
        if False in verdicts:
            mark = "**differs**"
        elif None in verdicts:
            mark = "not stated in the paper"
        else:
            mark = "same"
        why = "" if mark == "same" else setting.why(records[0])
        out.append({"Setting": setting.name, "Paper": setting.paper(records[0]), "Ours": shown, "": mark, "Why": why})
    return out


def recipe_rows(records: list[Rec]) -> list[dict[str, str]]:
    """Per variant: warmup (steps of all steps), decay, clipping, last batch and the rate after warmup."""
    out = []
    for r in records:
        s, t = r.schedule, r.config.train
        if t.optimizer == "lbfgs":
            continue
        out.append({
            "Variant": r.variant,
            "Warmup": (f"{s.warmup_steps} of {s.total_steps} steps ({100 * s.warmup_steps / s.total_steps:.1f} %)"
                       if s.warmup_steps else "none"),
            "Decay": s.decay, "Clipping": f"global norm {fmt_num(t.clip_grad_norm)}" if t.clip_grad_norm else "none",
            "Last batch": "dropped" if s.drop_last else f"kept ({s.last_batch} images)", "Rate after warmup": fmt_num(s.effective_lr),
        })
    return out


def paper_recipe_rows() -> list[dict[str, str]]:
    return [
        {"Variant": "paper: pre-training (Table 3)",
         "Warmup": f"{paper.WARMUP_STEPS:,} steps ({100 * paper.WARMUP_FRACTION:.1f} % of ~{paper.IMAGENET_STEPS:,})",
         "Decay": "cosine (ImageNet) · linear (ImageNet-21k, JFT-300M)", "Clipping": f"global norm {fmt_num(paper.CLIP_GRAD_NORM)} (ImageNet)",
         "Last batch": "not stated", "Rate after warmup": f"{fmt_num(PRETRAIN.base_lr)} at batch {paper.BATCH_SIZE}"},
        {"Variant": "paper: fine-tuning (App. B.1.1)",
         "Warmup": f"not stated (official code: {FINETUNE.warmup_steps_official_code} steps)", "Decay": FINETUNE.decay,
         "Clipping": f"global norm {fmt_num(FINETUNE.clip_grad_norm)}", "Last batch": "not stated",
         "Rate after warmup": "swept (SGD)"},
    ]
