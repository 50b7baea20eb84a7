"""Several training processes under ``torchrun``: the process group and the collectives a run needs.

In a plain process every helper here is a no-op, so the training loop reads the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError


def torchrun_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) in a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


@contextmanager
def distributed(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group for the duration (gloo on CPU, nccl on CUDA); yield this process's device."""
    _, local_rank, world_size = torchrun_env()
    if world_size == 1:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"train.device {device.type!r}: several processes need cpu (gloo) or cuda (nccl)")
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes, in place (nothing to do in a single process)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` in every process."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, by rank, in every process."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def per_process_batch(batch_size: int, world_size: int) -> int:
    """``train.batch_size`` is the global batch; each process takes an equal share of it."""
    if batch_size % world_size:
        raise ConfigError(
            f"train.batch_size {batch_size} is the global batch of all {world_size} processes and must divide "
            f"evenly among them: use a multiple of {world_size} or another number of processes"
        )
    return batch_size // world_size
