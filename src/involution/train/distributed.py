"""Processes of a training job: this rank's place, its device, the process group, seeding.

Under ``torchrun`` the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_*``)
describes the job; a plain ``python`` process is rank 0 of a world of size 1. The engine and
the tasks both import these helpers, so they live apart from either.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """This process's place in the job (a single process has rank 0 of world size 1)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this rank's CUDA device when available, else the CPU."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available")
    return device


def launched_world_size() -> int:
    """The number of processes torchrun started for this job (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group described by torchrun's environment (if any).

    Uses NCCL on CUDA and Gloo on the CPU, ``env://`` rendezvous. The group's keys in the
    rendezvous store are those of this attempt (``TORCHELASTIC_RESTART_COUNT``): torchrun keeps
    its store when it restarts a failed worker group, and a restarted group reading the last
    attempt's keys would connect to ranks that are gone (and time out, or hang).
    """
    world_size = launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size == 1:
        return DistInfo(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store, rank, size = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"involution/attempt_{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=size)
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    if not info.distributed:
        return values
    backend_device = info.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_from_main(value: Any, info: DistInfo) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object; as is in a single process)."""
    if not info.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
