"""vit-repro: a tracked reproducibility study of the Vision Transformer."""

__version__ = "0.2.0"

# The modules a training stage executes: the train stages' DVC dependencies (dvc.yaml lists exactly these,
# tests/test_stages.py checks it) and the code digest that every run, checkpoint and stage key carries.
TRAINING_MODULES = (
    "__init__", "backbone", "checkpoint", "cli", "config", "convert", "dataset", "devices", "distributed", "errors",
    "fsutil", "images", "model", "models", "paper", "plan", "record", "runner", "schedule", "splits", "tracking",
    "train",
)
