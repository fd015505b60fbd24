"""Forming and tearing down the worker group from the standard torchrun variables.

Under torchrun the variables are already set; under Ray the engine sets them in every actor
(rank 0 reports an address and a free port, Ray Train's recipe) and all ranks join at once.

What listens where (docs/NETWORK.md):
- a group whose workers share one node (the embedded default: local Ray) meets through a file
  (`file://` rendezvous, a FileStore in a private temporary directory named by LAYERPAR_INIT_FILE)
  and gloo's pair sockets are bound to the loopback interface: no listener beyond 127.0.0.1;
- a multi-node group keeps torch.distributed's TCP rendezvous: rank 0's TCPStore listens on
  MASTER_PORT on every interface, and gloo (or NCCL) opens its pair sockets on the interface of the
  node's hostname (or GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from layerpar.parallel.comm import CollectiveError

ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
INIT_FILE = "LAYERPAR_INIT_FILE"  # set: a same-node group, rendezvous through this file
LOOPBACK = "lo"
_IFNAMES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_USER_IFNAMES = {v: os.environ.get(v) for v in _IFNAMES}  # what this process was started with


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (rank 0 offers it to the others)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_made_dirs: list[Path] = []  # rendezvous directories this process made (rank 0)


def new_init_file() -> str:
    """A path for a same-node group's file rendezvous: in a fresh private directory (0700), not yet
    created (a FileStore must start from no file; a re-formed group gets a new one). The directories
    of earlier groups, which every rank has left by now, are removed."""
    while _made_dirs:
        shutil.rmtree(_made_dirs.pop(), ignore_errors=True)
    _made_dirs.append(Path(tempfile.mkdtemp(prefix="layerpar-pg-")))
    return str(_made_dirs[-1] / "store")


def set_env(*, master_addr: str, master_port: int, rank: int, world_size: int,
            init_file: str | None = None) -> None:
    """Export the torchrun variables in this process; with `init_file` (every rank on one node), the
    group meets through that file and binds its sockets to loopback instead."""
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    if init_file is None:
        os.environ.pop(INIT_FILE, None)
        for var, value in _USER_IFNAMES.items():  # undo a loopback binding of an earlier group
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    else:
        os.environ[INIT_FILE] = init_file
        os.environ.update({var: LOOPBACK for var in _IFNAMES})


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
    init_file = os.environ.get(INIT_FILE)
    init_method = f"file://{init_file}" if init_file else "env://"
    try:
        dist.init_process_group(backend_for(device), init_method=init_method, rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs)
    except RuntimeError as exc:  # a peer never came, or its connection broke
        raise CollectiveError(f"forming the worker group failed: {exc}") from exc
    return rank, world


def new_prefix_groups(world_size: int, *, timeout_s: float) -> dict[int, object]:
    """One sub-group per participant count r >= 2, holding ranks 0..r-1: a prefix model only
    involves the workers that own its branches. Every rank must call this, in the same order.
    Each sub-group waits for a peer at most `timeout_s` (torch's default would be 30 min on gloo)."""
    timeout = timedelta(seconds=timeout_s)
    try:
        groups: dict[int, object] = {r: dist.new_group(ranks=list(range(r)), timeout=timeout)
                                     for r in range(2, world_size)}
    except RuntimeError as exc:
        raise CollectiveError(f"forming the prefix sub-groups failed: {exc}") from exc
    groups[world_size] = None  # the whole group
    return groups


def new_mesh(replicas: int, workers: int, device: torch.device, *, timeout_s: float) -> tuple[object, object]:
    """The training mesh over the default group's R x W ranks, shaped (replica, branch) like a torch
    device mesh -- rank g is replica g // W, branch rank g % W. Returns (branch group, replica
    group): the W ranks of this rank's replica, and the R ranks that own the same branches. Every
    rank must call this, in the same order. The groups are made with dist.new_group rather than
    init_device_mesh so that each one waits for a peer at most `timeout_s` (init_device_mesh passes
    no timeout: torch's default, 30 min on gloo, 10 on NCCL). `device` is the ranks' device type
    (the default group's backend serves it)."""
    world = dist.get_world_size()
    if world != replicas * workers:
        raise RuntimeError(f"the process group has {world} ranks but the mesh is parallel.replicas "
                           f"x parallel.workers = {replicas} x {workers}")
    rows = [[r * workers + w for w in range(workers)] for r in range(replicas)]  # a replica's ranks
    columns = [[r * workers + w for r in range(replicas)] for w in range(workers)]  # a branch rank's
    timeout = timedelta(seconds=timeout_s)
    try:
        return _member_of(rows, timeout), _member_of(columns, timeout)
    except RuntimeError as exc:
        raise CollectiveError(f"forming the training mesh on {device.type} failed: {exc}") from exc


def _member_of(rank_lists: list[list[int]], timeout: timedelta) -> object:
    """Make one group per rank list (every rank makes every group, in order: new_group's rule) and
    return the one holding this rank."""
    me, mine = dist.get_rank(), None
    for ranks in rank_lists:
        group = dist.new_group(ranks=ranks, timeout=timeout)
        if me in ranks:
            mine = group
    return mine


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
