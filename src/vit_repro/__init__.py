"""vit-repro: a tracked reproducibility study of the Vision Transformer."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vit-repro")
except PackageNotFoundError:  # pragma: no cover - run from a source tree without installing
    __version__ = "unknown"
