"""vit-repro: a tracked reproducibility study of the Vision Transformer."""

__version__ = "0.1.0"
