"""``vit-repro bench`` and the time estimates: what the study costs on this machine, measured through the core.

- ``measure``: the sections, timed with ``torch.utils.benchmark``: ``study`` (what the estimates need: every study's
  scratch models through ``core.train.Trainer.step`` and ``evaluate``, backbone features, one head and one probe
  run through ``fit`` / ``fit_logistic``) and ``compare`` (our ViT against torchvision's and timm's, same step).
- ``cli``: options, the machine and versions, targets (``benchmarks/targets.yaml``), tables, results files.
- ``estimate``: the estimated time of a study from the results file of this kind of machine
  (``vit-repro check`` and every train stage print it).
"""

from .cli import main

__all__ = ["main"]
