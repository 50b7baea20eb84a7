"""The paper's numbers: the one place the model, the configuration and the report read them from.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021, arXiv:2010.11929 (Table 1, Table 3, Sec. 4.1, App. B.1.1), plus the official code for the
variants the paper does not list, torchvision's weight documentation and the seed notebook.
Derived values (the ImageNet run's steps, the warmup fraction, batch-scaled learning rates) are
computed here from those numbers, never written down twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PAPER = "Dosovitskiy et al., ICLR 2021, arXiv:2010.11929"


# --- Table 1: model variants ---------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """A Table 1 row: the encoder's sizes and the published parameter count (1000-class head)."""

    name: str
    layers: int
    hidden: int
    mlp: int
    heads: int
    params_millions: float
    source: str


TABLE1: dict[str, Variant] = {
    "Ti": Variant("ViT-Tiny", 12, 192, 768, 3, 5.7, "official code and DeiT; not in the paper"),
    "S": Variant("ViT-Small", 12, 384, 1536, 6, 22, "official code and DeiT; not in the paper"),
    "B": Variant("ViT-Base", 12, 768, 3072, 12, 86, "Table 1"),
    "L": Variant("ViT-Large", 24, 1024, 4096, 16, 307, "Table 1"),
    "H": Variant("ViT-Huge", 32, 1280, 5120, 16, 632, "Table 1"),
}
TABLE1_NUM_CLASSES = 1000  # Table 1 counts an ImageNet head
VIT_B16_PARAMS_1000_CLASSES = 86_567_656  # torchvision vit_b_16
VIT_B16_PARAMS_3_CLASSES = 85_800_963  # what a faithful ViT-B/16 with 3 classes must give


# --- Table 3: pre-training (ViT rows; ResNet and hybrid rows omitted) ------------------------------

@dataclass(frozen=True)
class PretrainRow:
    """A Table 3 row. ``epochs`` is text because the paper gives e.g. "7/14" for two runs."""

    models: str
    dataset: str
    epochs: str
    base_lr: float
    decay: str
    weight_decay: float
    dropout: float


TABLE3: tuple[PretrainRow, ...] = (
    PretrainRow("ViT-B/{16,32}", "JFT-300M", "7", 8e-4, "linear", 0.1, 0.0),
    PretrainRow("ViT-L/32", "JFT-300M", "7", 6e-4, "linear", 0.1, 0.0),
    PretrainRow("ViT-L/16", "JFT-300M", "7/14", 4e-4, "linear", 0.1, 0.0),
    PretrainRow("ViT-H/14", "JFT-300M", "14", 3e-4, "linear", 0.1, 0.0),
    PretrainRow("ViT-B/{16,32}", "ImageNet-21k", "90", 1e-3, "linear", 0.03, 0.1),
    PretrainRow("ViT-L/{16,32}", "ImageNet-21k", "30/90", 1e-3, "linear", 0.03, 0.1),
    PretrainRow("ViT-*", "ImageNet", "300", 3e-3, "cosine", 0.3, 0.1),
)
IMAGENET_ROW = TABLE3[-1]  # ViT trained from scratch on ImageNet: the row our from-scratch arms follow
BATCH_SIZE = 4096  # Table 3 caption, Sec. 4.1
WARMUP_STEPS = 10_000  # Table 3 caption
CLIP_GRAD_NORM = 1.0  # Table 3 caption: "gradient clipping at global norm 1" (ImageNet)
RESOLUTION = 224  # Table 3 caption
BETAS = (0.9, 0.999)  # Sec. 4.1
OPTIMIZER = "Adam"
PRETRAIN_HEAD = "MLP with one hidden layer (tanh) at pre-training; one linear layer at fine-tuning"
AUGMENTATION = "inception crop and horizontal flip (official code; the paper text does not list any)"
DATASET_IMAGES = {"ImageNet": 1_281_167, "ImageNet-21k": 14_000_000, "JFT-300M": 303_000_000}

IMAGENET_EPOCHS = int(IMAGENET_ROW.epochs)
IMAGENET_STEPS = round(IMAGENET_EPOCHS * DATASET_IMAGES["ImageNet"] / BATCH_SIZE)  # ~93.8k
WARMUP_FRACTION = WARMUP_STEPS / IMAGENET_STEPS  # ~10.7 % of training


def scaled_lr(lr: float, batch_size: int, rule: str, reference_batch: int = BATCH_SIZE) -> float:
    """``lr`` (set at ``reference_batch``) at ``batch_size``: ``linear`` or ``sqrt`` in the batch ratio, or ``none``."""
    ratio = batch_size / reference_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}
    if rule not in factor:
        raise ValueError(f"unknown learning-rate scaling {rule!r}: use none, linear or sqrt")
    return lr * factor[rule]


# --- App. B.1.1 / Table 4: fine-tuning -----------------------------------------------------------

@dataclass(frozen=True)
class FineTuning:
    optimizer: str
    momentum: float
    batch_size: int
    weight_decay: float
    clip_grad_norm: float
    decay: str
    resolution: int
    head: str
    trainable: str
    steps_and_lr: dict[str, tuple[int, tuple[float, ...]]]
    warmup_steps_official_code: int  # not in the paper text


FINETUNE = FineTuning(
    optimizer="SGD",
    momentum=0.9,
    batch_size=512,
    weight_decay=0.0,
    clip_grad_norm=1.0,
    decay="cosine",
    resolution=384,
    head="one zero-initialised linear layer replaces the pre-training head",
    trainable="all parameters (full fine-tuning)",
    steps_and_lr={
        "ImageNet": (20_000, (0.003, 0.01, 0.03, 0.06)),
        "CIFAR-10/100": (10_000, (0.001, 0.003, 0.01, 0.03)),
        "Oxford-IIIT Pets, Flowers-102": (500, (0.001, 0.003, 0.01, 0.03)),
        "VTAB": (2_500, (0.01,)),
    },
    warmup_steps_official_code=500,
)


# --- the seed notebook ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeedResult:
    """What the seed notebook printed for one run, and its per-image value on the 75-image test split."""

    run: str
    optimizer: str
    printed_acc: float  # averaged over test batches of 32, 32 and 11 images: not per image
    correct: int
    images: int
    note: str


SEED_RESULTS = {
    "scratch": SeedResult("ViT-B/16 from scratch", "Adam lr 1e-3, wd 0.1", 0.2604, 25, 75,
                          "predicts one class for every image"),
    "frozen": SeedResult("ViT-B/16 IMAGENET1K_V1, frozen, new linear head", "Adam lr 1e-3, no wd", 0.9176, 69, 75, ""),
}
