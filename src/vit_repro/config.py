"""Typed, validated settings: ``params.yaml`` plus ``experiments/<recipe>.yaml``.

Everything a run depends on is resolved here, before any data is touched or any model is built,
so a bad value fails fast with a message that names the key and the file it came from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The paper's schedule (Table 3 caption, Sec. 4.1), used to scale warmup to short runs.
PAPER_WARMUP_STEPS = 10_000
PAPER_IMAGENET_STEPS = round(300 * 1_281_167 / 4096)  # 300 epochs of ImageNet at batch 4096: ~93.8k
PAPER_WARMUP_FRACTION = PAPER_WARMUP_STEPS / PAPER_IMAGENET_STEPS

Backbone = Literal["scratch", "frozen"]


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class TrainConfig(_Strict):
    """Optimisation settings shared by both backbones; recipes override any of them."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)  # global: all torchrun processes together
    grad_accum_steps: int = Field(1, ge=1)  # micro-batches per optimisation step; effective batch = batch_size x this
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: PositiveFloat = 1e-3
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    weight_decay: NonNegFloat = 0.0
    warmup: bool = False
    warmup_fraction: float = PAPER_WARMUP_FRACTION
    decay: Literal["none", "cosine", "linear"] = "none"
    clip_grad_norm: PositiveFloat | None = None
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    weights_for_seeds: list[int] = [0]
    checkpoint: bool = True  # save the training state after every epoch; a rerun resumes from it

    @field_validator("warmup_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in {"auto", "cpu", "cuda", "mps"} or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v


class ScratchConfig(_Strict):
    """What the from-scratch ViT changes relative to ``train``."""

    image_size: int = Field(224, ge=1)
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    weight_decay: NonNegFloat = 0.1


class FrozenConfig(_Strict):
    """What the frozen-backbone run changes relative to ``train``."""

    weight_decay: NonNegFloat = 0.0


class BackboneSpec(_Strict):
    """A pretrained backbone: where its weights come from and the transform they expect."""

    label: str
    model: str
    source: Literal["torchvision", "file"]
    weights: str | None = None
    path: str | None = None
    sha256: str | None = None
    pretraining: str
    resize: int = Field(ge=1)
    crop: int = Field(ge=1)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"

    @model_validator(mode="after")
    def _source_fields(self) -> "BackboneSpec":
        if self.source == "torchvision" and not self.weights:
            raise ValueError("source 'torchvision' needs `weights` (e.g. IMAGENET1K_V1)")
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs `path` to a torchvision-format checkpoint")
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        return self


class StudyPreset(_Strict):
    scratch_model: str
    frozen_backbone: str


class StudyConfig(_Strict):
    name: str
    seeds: list[int] = Field(min_length=1)
    recipes: list[str] = Field(min_length=1)


class DataConfig(_Strict):
    dataset: Literal["pizza_steak_sushi", "pizza_steak_sushi_20_percent"] = "pizza_steak_sushi"


class Params(_Strict):
    """The whole of ``params.yaml``."""

    data: DataConfig
    study: StudyConfig
    studies: dict[str, StudyPreset]
    backbones: dict[str, BackboneSpec]
    train: TrainConfig
    scratch: ScratchConfig
    frozen: FrozenConfig

    @model_validator(mode="after")
    def _references(self) -> "Params":
        if self.study.name not in self.studies:
            raise ValueError(f"study.name {self.study.name!r} is not one of studies: {sorted(self.studies)}")
        for name, preset in self.studies.items():
            if preset.frozen_backbone not in self.backbones:
                raise ValueError(
                    f"studies.{name}.frozen_backbone {preset.frozen_backbone!r} is not one of backbones: "
                    f"{sorted(self.backbones)}"
                )
        return self

    @property
    def preset(self) -> StudyPreset:
        return self.studies[self.study.name]


class RunConfig(_Strict):
    """Everything one training run (backbone, recipe, seed) depends on, fully resolved."""

    study: str
    backbone: Backbone
    recipe: str
    seed: int
    dataset: str
    model: str  # Table 1 name, e.g. "B/16"
    image_size: int
    dropout: float
    train: TrainConfig
    pretrained: BackboneSpec | None = None  # frozen runs only
    pretrained_name: str | None = None

    @property
    def variant(self) -> str:
        return f"{self.backbone}-{self.recipe}"

    @property
    def run_name(self) -> str:
        return f"{self.variant}/seed{self.seed}"


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see params.yaml for the valid keys)"
        lines.append(f"  {key}: {msg}")
    return f"invalid settings in {source}:\n" + "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the repository root or pass --params/--experiments")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    try:
        return Params.model_validate(_read_yaml(path))
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, str(path))) from None


def load_recipe(name: str, experiments_dir: str | Path = "experiments") -> dict[str, Any]:
    """Read ``experiments/<name>.yaml``: a partial ``train`` section, validated key by key."""
    path = Path(experiments_dir) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(experiments_dir).glob("*.yaml"))
        raise ConfigError(f"unknown recipe {name!r}: {path} does not exist (known recipes: {known})")
    overrides = _read_yaml(path)
    unknown = sorted(set(overrides) - set(TrainConfig.model_fields))
    if unknown:
        raise ConfigError(
            f"invalid settings in {path}:\n  {', '.join(unknown)}: unknown key; a recipe may set only "
            f"these `train` keys: {sorted(TrainConfig.model_fields)}"
        )
    return overrides


def resolve_run(
    params: Params,
    backbone: Backbone,
    recipe: str,
    seed: int,
    experiments_dir: str | Path = "experiments",
) -> RunConfig:
    """Merge params.yaml defaults, the backbone's section and the recipe file into one RunConfig."""
    from .model import parse_model_name  # model names are defined next to the architectures

    per_backbone = params.scratch if backbone == "scratch" else params.frozen
    merged = params.train.model_dump() | {"weight_decay": per_backbone.weight_decay}
    merged |= load_recipe(recipe, experiments_dir)
    source = f"params.yaml + experiments/{recipe}.yaml"
    try:
        train = TrainConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None

    pretrained = pretrained_name = None
    if backbone == "scratch":
        model, image_size, dropout = params.preset.scratch_model, params.scratch.image_size, params.scratch.dropout
    else:
        pretrained_name = params.preset.frozen_backbone
        pretrained = params.backbones[pretrained_name]
        model, image_size, dropout = pretrained.model, pretrained.crop, 0.0
    try:
        parse_model_name(model, image_size=image_size)
    except ValueError as exc:
        raise ConfigError(f"invalid settings in params.yaml: model {model!r}: {exc}") from None
    return RunConfig(
        study=params.study.name,
        backbone=backbone,
        recipe=recipe,
        seed=seed,
        dataset=params.data.dataset,
        model=model,
        image_size=image_size,
        dropout=dropout,
        train=train,
        pretrained=pretrained,
        pretrained_name=pretrained_name,
    )


def resolve_study(params: Params, experiments_dir: str | Path = "experiments") -> list[RunConfig]:
    """Every run of the configured study; raises before any training if one of them is invalid."""
    return [
        resolve_run(params, backbone, recipe, seed, experiments_dir)
        for backbone in ("scratch", "frozen")
        for recipe in params.study.recipes
        for seed in params.study.seeds
    ]


def scaled_warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """Warmup length in optimisation steps: the paper's fraction of training, scaled to this run."""
    return math.ceil(train.warmup_fraction * total_steps) if train.warmup else 0
