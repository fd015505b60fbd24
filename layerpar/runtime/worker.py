"""The branch-worker actor: a thin shell around a BranchShard. Each method is a few lines that
wire the shard to Ray and return plain tensors, dicts or None.

Two concurrency groups, one thread each. The default group runs everything that touches the process
group or the weights (infer, join/leave, load), strictly in submission order. The `side`
group answers `ping`, `where`, `partial` and `head_piece` even while the default thread is blocked in a
collective whose peer died (until the gloo timeout): that is how the engine tells a dead worker from a
busy one, and how it answers from the surviving branches while it recovers (docs/FAILURES.md).
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import ray
import torch

from layerpar.config import from_dict
from layerpar.parallel import process_group
from layerpar.runtime import fastpath, shm
from layerpar.runtime.shm import SharedInput
from layerpar.train.shard import BranchShard


def as_tensor(x) -> torch.Tensor:
    """Object-store arrays arrive read-only and zero-copy; nothing here writes to them, so they are
    wrapped without a copy (torch warns about read-only memory; the warning is moot here). A
    SharedInput is read in place from its shared-memory slot."""
    if isinstance(x, SharedInput):
        return shm.read(x)
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(x)
    return torch.as_tensor(x)


def to_wire(t: torch.Tensor | None) -> np.ndarray | None:
    """Results travel as NumPy arrays: Ray serialises them zero-copy, while a torch tensor costs
    about 0.7 ms more per call (measured here); the engine wraps them back with as_tensor."""
    return None if t is None else t.detach().cpu().numpy()


class BranchWorker:
    def __init__(self, cfg_dict: dict, worker_rank: int, total_steps: int):
        cfg = from_dict(cfg_dict)
        torch.set_num_threads(cfg.parallel.threads_per_worker)
        self.shard = BranchShard(cfg, worker_rank=worker_rank, total_steps=total_steps)
        self._stall_until = 0.0  # debug_stall (tests only)

    @ray.method(concurrency_group="side")
    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "gpu_ids": ray.get_gpu_ids(),
                "layout": self.shard.layout.describe(self.shard.worker_rank)}

    def offer_rendezvous(self, same_node: bool = False) -> tuple[str, int, str | None]:
        """Rank 0 offers its address and a free port to the group, and with same_node (every rank on
        this node) a file to meet through instead, so that no store listens on the network."""
        ip = ray.util.get_node_ip_address()
        init_file = process_group.new_init_file() if same_node else None
        return ip, process_group.free_port(ip), init_file

    def join_group(self, master_addr: str, master_port: int, world_size: int,
                   init_file: str | None = None) -> None:
        process_group.set_env(master_addr=master_addr, master_port=master_port,
                              rank=self.shard.worker_rank, world_size=world_size, init_file=init_file)
        self.shard.join_group()  # blocks until every rank joins

    def leave_group(self) -> None:
        self.shard.leave_group()

    def infer(self, x, num_branches: int, reduce: bool) -> tuple[np.ndarray | None, dict]:
        self._stall()
        out, timings = self.shard.infer(as_tensor(x), num_branches, reduce=reduce)
        return to_wire(out), timings

    def serve_fast(self, path: str, rank: int, key: bytes) -> int:
        """Answer `infer` requests from the driver's socket on this (default) thread until the
        driver stops the fast path (runtime/fastpath.py; `key` proves each side to the other);
        returns how many were answered."""
        return fastpath.serve(path, rank, key, self.infer)

    def branch_outputs(self, x) -> np.ndarray:
        self._stall()
        return to_wire(self.shard.branch_outputs(as_tensor(x)))

    def pieces(self, replicated: bool) -> tuple[dict, dict, int]:
        return (self.shard.pieces(replicated=replicated),
                self.shard.optim_pieces(replicated=replicated), self.shard.step)

    def load(self, pieces: dict, optim: dict | None, step: int) -> None:
        self.shard.load(pieces, optim, step)

    def stats(self) -> dict:
        return {"calls": dict(self.shard.calls), "step": self.shard.step, **self.shard.param_counts()}

    def restore(self, snapshot: tuple[dict, dict, int]) -> int:
        """Load a snapshot taken with pieces(replicated=True) (the engine passes its object-store
        reference; Ray resolves it here). Returns the step restored."""
        pieces, optim, step = snapshot
        self.shard.load(pieces, optim or None, step)
        return step

    # ------------------------------------------------------------------ side group (never blocked)

    @ray.method(concurrency_group="side")
    def ping(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="side")
    def partial(self, x, num_branches: int) -> tuple[np.ndarray, list[int]]:
        """Pooled rows (K, B, D) of this worker's branches below `num_branches`, and their ids, with no
        collective: the degraded path while a peer is lost. Runs beside a blocked default thread; the
        weights are not being trained then (the engine serves degraded answers only while recovering)."""
        rows, _ = self.shard.infer(as_tensor(x), num_branches, reduce=False)
        return to_wire(rows), [b for b in self.shard.model.branch_ids if b < num_branches]

    @ray.method(concurrency_group="side")
    def head_piece(self) -> dict:
        """The replicated head's weights (any worker's copy is the same)."""
        return {k: v.detach().cpu().clone() for k, v in self.shard.model.piece_state("head").items()}

    # ------------------------------------------------------------------ test-only fault injection

    @ray.method(concurrency_group="side")
    def debug_stall(self, seconds: float) -> float:
        """TEST ONLY: make this worker's default thread hang for `seconds` from its next call, as a
        hung process would: that call (on the Ray path or the fast path, runtime/fastpath.py) and
        every call behind it, and its peers' collectives, get no answer. Used by tests/faults to check
        that the driver raises or recovers after parallel.call_timeout_s (inference) or
        parallel.timeout_s (training) instead of hanging. Its side thread still answers pings: a
        stopped process (SIGSTOP) is the heartbeat's case, tests/faults/test_stall.py."""
        self._stall_until = time.monotonic() + seconds
        return seconds

    def _stall(self) -> None:
        while time.monotonic() < self._stall_until:
            time.sleep(min(1.0, self._stall_until - time.monotonic()))


# The side group has its own thread; the default group keeps one thread and submission order.
RemoteBranchWorker = ray.remote(concurrency_groups={"side": 1})(BranchWorker)
