"""The paper's settings as plain, cited data: the one place the report reads them from.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021, arXiv:2010.11929. Values are copied from ``../shared/reference/vit-paper-settings.md``,
which quotes the paper (Table 1, Table 3, Sec. 4.1, App. B.1.1), the official code, torchvision's
weights documentation and the seed notebook. Nothing here is computed from a run.
"""

from __future__ import annotations

PAPER = "Dosovitskiy et al., ICLR 2021, arXiv:2010.11929"

# --- Table 1: model variants -----------------------------------------------------------------
# Ti and S are not in the paper: google-research/vision_transformer (vit_jax/configs/models.py) and DeiT.
TABLE1: dict[str, dict] = {
    "Ti": {"name": "ViT-Tiny", "layers": 12, "hidden": 192, "mlp": 768, "heads": 3, "params": "5.7M",
           "source": "official code and DeiT; not in the paper"},
    "S": {"name": "ViT-Small", "layers": 12, "hidden": 384, "mlp": 1536, "heads": 6, "params": "22M",
          "source": "official code and DeiT; not in the paper"},
    "B": {"name": "ViT-Base", "layers": 12, "hidden": 768, "mlp": 3072, "heads": 12, "params": "86M",
          "source": "Table 1"},
    "L": {"name": "ViT-Large", "layers": 24, "hidden": 1024, "mlp": 4096, "heads": 16, "params": "307M",
          "source": "Table 1"},
    "H": {"name": "ViT-Huge", "layers": 32, "hidden": 1280, "mlp": 5120, "heads": 16, "params": "632M",
          "source": "Table 1"},
}
PATCH_SIZES = (32, 16, 14)  # patch sizes used in the paper
# Table 1's counts include a 1000-class ImageNet head; exact counts of ViT-B/16 (torchvision vit_b_16).
VIT_B16_PARAMS_1000_CLASSES = 86_567_656
VIT_B16_PARAMS_3_CLASSES = 85_800_963  # what a faithful from-scratch ViT-B/16 with 3 classes must give
TABLE1_NUM_CLASSES = 1000

# --- Table 3: pre-training hyperparameters (ViT rows; ResNet and hybrid rows omitted) ------------
# Caption: "All models are trained with a batch size of 4096 and learning rate warmup of 10k steps.
# For ImageNet we found it beneficial to additionally apply gradient clipping at global norm 1.
# Training resolution is 224."
TABLE3: list[dict] = [
    {"models": "ViT-B/{16,32}", "dataset": "JFT-300M", "epochs": "7", "base_lr": 8e-4, "decay": "linear",
     "weight_decay": 0.1, "dropout": 0.0},
    {"models": "ViT-L/32", "dataset": "JFT-300M", "epochs": "7", "base_lr": 6e-4, "decay": "linear",
     "weight_decay": 0.1, "dropout": 0.0},
    {"models": "ViT-L/16", "dataset": "JFT-300M", "epochs": "7/14", "base_lr": 4e-4, "decay": "linear",
     "weight_decay": 0.1, "dropout": 0.0},
    {"models": "ViT-H/14", "dataset": "JFT-300M", "epochs": "14", "base_lr": 3e-4, "decay": "linear",
     "weight_decay": 0.1, "dropout": 0.0},
    {"models": "ViT-B/{16,32}", "dataset": "ImageNet-21k", "epochs": "90", "base_lr": 1e-3, "decay": "linear",
     "weight_decay": 0.03, "dropout": 0.1},
    {"models": "ViT-L/{16,32}", "dataset": "ImageNet-21k", "epochs": "30/90", "base_lr": 1e-3, "decay": "linear",
     "weight_decay": 0.03, "dropout": 0.1},
    {"models": "ViT-*", "dataset": "ImageNet", "epochs": "300", "base_lr": 3e-3, "decay": "cosine",
     "weight_decay": 0.3, "dropout": 0.1},
]
BATCH_SIZE = 4096  # Table 3 caption, Sec. 4.1
WARMUP_STEPS = 10_000  # Table 3 caption: "learning rate warmup of 10k steps"
CLIP_GRAD_NORM = 1.0  # Table 3 caption: "gradient clipping at global norm 1" (ImageNet)
RESOLUTION = 224  # Table 3 caption
# Pre-training set sizes (Sec. 4.1). ImageNet as in the reference file (1.28M); 21k and JFT as in Sec. 4.1.
DATASET_IMAGES = {"ImageNet": "1.28M", "ImageNet-21k": "14M", "JFT-300M": "303M"}
# A 300-epoch ImageNet run at batch 4096 (reference file, "Scaling the schedule"): ~93.8k steps, of
# which the 10k warmup steps are ~10.7%.
IMAGENET_TOTAL_STEPS = "93.8k"
WARMUP_FRACTION = "10.7%"

# --- Sec. 4.1: optimiser -------------------------------------------------------------------
OPTIMIZER = "Adam"
BETAS = (0.9, 0.999)
WEIGHT_DECAY_HIGH = 0.1  # "high weight decay of 0.1"
WEIGHT_DECAY_COUPLING = "not stated"  # coupled (L2, torch.optim.Adam) or decoupled (AdamW): the paper does not say
DROPOUT_PLACEMENT = ("after every dense layer except the qkv-projections and directly after adding "
                     "positional- to patch embeddings")

# --- App. B.1.1 / Table 4: fine-tuning -------------------------------------------------------
FINETUNE = {
    "optimizer": "SGD",
    "momentum": 0.9,
    "batch_size": 512,
    "weight_decay": 0.0,
    "clip_grad_norm": 1.0,
    "decay": "cosine",
    "resolution": 384,
    "head": "one zero-initialised linear layer replaces the pre-training head",
    "trainable": "all parameters (full fine-tuning)",
    # dataset: (steps, learning-rate sweep)
    "steps_and_lr": {
        "ImageNet": (20_000, (0.003, 0.01, 0.03, 0.06)),
        "CIFAR-10/100": (10_000, (0.001, 0.003, 0.01, 0.03)),
        "Oxford-IIIT Pets, Flowers-102": (500, (0.001, 0.003, 0.01, 0.03)),
        "VTAB": (2_500, (0.01,)),
    },
    "warmup_steps_official_code": 500,  # not in the paper text
}

# --- torchvision ViT_B_16_Weights.IMAGENET1K_V1 (the paper-faithful frozen backbone) --------------
TORCHVISION_VIT_B16_IMAGENET1K_V1 = {
    "recipe": ("ImageNet-1k from scratch, modified DeiT recipe: 300 epochs, batch 4096, AdamW lr 0.003, "
               "weight decay 0.3, 30 warmup epochs, cosine, label smoothing 0.11, mixup 0.2, cutmix 1.0, "
               "RandAugment, clip-grad-norm 1, EMA, AMP"),
    "acc1": 81.072,
    "acc5": 95.318,
    "transform": {"resize": 256, "crop": 224, "interpolation": "bilinear"},
    "gmacs_224": 17.56,  # forward pass at 224x224: about 35.1 GFLOPs; a training step about 3x forward
    "gflops_224": 35.1,
}

# --- The seed notebook (the course code this study starts from) -------------------------------
SEED_DATASET = {
    "name": "pizza_steak_sushi",
    "train": {"pizza": 78, "steak": 75, "sushi": 72, "total": 225},
    "test": {"pizza": 25, "steak": 19, "sushi": 31, "total": 75},
}
SEED_SETTINGS = "224x224, batch 32, CrossEntropyLoss, 10 epochs, no warmup, no decay, no clipping"
# Printed accuracy is a mean over test batches (32, 32, 11 weigh equally), not per image.
SEED_RESULTS = {
    "scratch": {"run": "ViT-B/16 from scratch", "optimizer": "Adam lr 1e-3, wd 0.1", "printed_acc": 0.2604,
                "correct": 25, "images": 75, "note": "predicts one class for every image"},
    "frozen": {"run": "ViT-B/16 pretrained (IMAGENET1K_V1), frozen, new linear head",
               "optimizer": "Adam lr 1e-3, no wd", "printed_acc": 0.9176, "correct": 69, "images": 75, "note": ""},
}
