"""Forming and tearing down the worker group from the standard torchrun variables.

Under torchrun the variables are already set; under Ray the engine sets them in every actor
(rank 0 reports an address and a free port, Ray Train's recipe) and all ranks join at once.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (rank 0 offers it to the others)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def set_env(*, master_addr: str, master_port: int, rank: int, world_size: int) -> None:
    """Export the torchrun variables in this process."""
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(*, timeout_s: float, device: torch.device | None = None) -> tuple[int, int]:
    """Join the group described by MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE; return (rank, world).
    Blocks until every rank joins or `timeout_s` passes."""
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"cannot form the worker group: {', '.join(missing)} not set "
                           "(run under torchrun, or let the layerpar engine set them)")
    device = device or torch.device("cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kwargs = {}
    if device.type == "cuda":  # NCCL binds the group to one indexed device
        index = device.index if device.index is not None else torch.cuda.current_device()
        kwargs["device_id"] = torch.device("cuda", index)
    dist.init_process_group(backend_for(device), init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return rank, world


def new_prefix_groups(world_size: int) -> dict[int, object]:
    """One sub-group per participant count r >= 2, holding ranks 0..r-1: a prefix model only
    involves the workers that own its branches. Every rank must call this, in the same order."""
    groups: dict[int, object] = {r: dist.new_group(ranks=list(range(r))) for r in range(2, world_size)}
    groups[world_size] = None  # the whole group
    return groups


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
