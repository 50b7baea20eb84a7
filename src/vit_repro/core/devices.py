"""Where the work runs: the device, its name, and the numeric precision it runs in."""

from __future__ import annotations

import os
import platform

import torch

from .errors import UserError

DEVICE_ENV = "VIT_REPRO_DEVICE"  # overrides `train.device`


class DeviceError(UserError):
    """The requested device or precision is not available on this machine."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then the CPU. ``$VIT_REPRO_DEVICE`` overrides ``name``."""
    name = os.environ.get(DEVICE_ENV) or name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    fix = f"set train.device (or ${DEVICE_ENV}) to auto or cpu"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available on this machine; {fix}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s); {fix}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r} requested but Apple MPS is not available on this machine; {fix}")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast can run on ``device`` (every CPU; GPUs that support bf16)."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "bf16" and not bf16_supported(device):
        raise DeviceError(f"bf16 autocast is not supported on {device_name(device)}; set train.precision: fp32")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The context a model runs in for ``precision``: bfloat16 autocast for ``bf16``, nothing for ``fp32``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def device_name(device: torch.device) -> str:
    """A readable name: the GPU model, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type
