"""The models an arm trains, by name: ``vit:<Table 1 name>/<patch>`` (ours), ``resnet18`` (torchvision), a head.

``build_model`` makes one from its name; ``describe`` says what it is (sizes, parameter counts, forward cost)
for the run's record, so that nothing downstream has to rebuild a model to report it; ``layer_summary`` is its
layer table, written once per arm (``runs/<arm>/layers.txt``), not per run.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
from torch import nn

from .config import RESNET18, model_problem, vit_name
from .model import VisionTransformer, count_parameters, parse_model_name
from .record import ModelRecord


def build_model(name: str, image_size: int, num_classes: int, dropout: float = 0.0,
                device: torch.device | str | None = None) -> nn.Module:
    """A randomly initialised model (draws from the global torch RNG: seed it first)."""
    problem = model_problem(name, image_size)
    if problem:
        raise ValueError(problem)
    with torch.device(device) if device is not None else nullcontext():
        if name == RESNET18:
            from torchvision.models import resnet18

            return resnet18(weights=None, num_classes=num_classes)
        return VisionTransformer(parse_model_name(vit_name(name), image_size=image_size, num_classes=num_classes,
                                                  dropout=dropout))


def linear_head(dim: int, num_classes: int) -> nn.Linear:
    """The paper's fine-tuning head (App. B.1.1): one zero-initialised linear layer."""
    head = nn.Linear(dim, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def forward_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one image's forward pass, counted by torch's FLOP counter on the meta device.

    Matmuls, convolutions and attention are counted; elementwise work is not. ViT-B/16 at 224 px: 17.56 G,
    ResNet-18: 1.81 G (torchvision's published figures). The model is moved to the meta device.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        x = torch.empty(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.to("meta").eval()(x)
    return counter.get_total_flops() // 2


def layer_summary(model: nn.Module, image_size: int, depth: int = 3) -> str:
    """torchinfo's per-layer table of shapes and parameters, without its mult-add lines (they miss attention)."""
    import torchinfo

    with torch.random.fork_rng(devices=[]):  # torchinfo draws its input from the global random stream
        stats = torchinfo.summary(model.eval(), input_size=(1, 3, image_size, image_size), depth=depth, verbose=0,
                                  col_names=("input_size", "output_size", "num_params"), device="cpu")
    return "\n".join(line for line in str(stats).splitlines() if "mult-adds" not in line.lower())


@functools.lru_cache(maxsize=None)
def describe(name: str, image_size: int, num_classes: int, trainable: int | None = None) -> ModelRecord:
    """What the named architecture is (built afresh on the CPU, under its own random state: the trained weights
    and the caller's random stream play no part). ``trainable``: parameters that train, when not all do."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(name, image_size, num_classes)
    total = count_parameters(model)
    sizes: dict[str, int] = {}
    if isinstance(model, VisionTransformer):
        c = model.cfg
        sizes = dict(layers=c.num_layers, hidden=c.hidden_dim, mlp=c.mlp_dim, heads=c.num_heads, patch=c.patch_size)
    return ModelRecord(name=name, image_size=image_size, params_total=total,
                       params_trainable=total if trainable is None else trainable,
                       forward_gmacs=forward_macs(model, image_size) / 1e9, **sizes)
