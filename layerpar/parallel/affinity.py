"""Pinning a CPU rank to its own cores, as torchrun's --numa-binding and MPI's --bind-to core do.

On a CPU node the OS is free to move W single-thread ranks (and gloo's I/O threads) across the same
cores; each move costs the rank its warm L1/L2 caches. Measured on the 2-core development machine,
two gloo ranks of the Fashion-MNIST model: 27-28 ms a step unpinned, 22 ms pinned, without Ray
(docs/BENCHMARKS.md, "SPMD step").

    pin_rank(local_rank=1, local_world=2, threads=1)   # -> [1]: this process now runs on core 1
"""

from __future__ import annotations

import os


def cores_for(local_rank: int, local_world: int, threads: int, available: list[int]) -> list[int]:
    """The cores of one rank: consecutive slices of the allowed cores, or [] (no pinning) when the
    node's ranks need more cores than this process may use."""
    if local_world * threads > len(available) or not 0 <= local_rank < local_world:
        return []
    return available[local_rank * threads:(local_rank + 1) * threads]


def pin_rank(*, local_rank: int, local_world: int, threads: int) -> list[int]:
    """Pin every thread of this process (gloo's included, created before) to this rank's cores;
    returns them ([] if not pinned: too few cores, or no sched_setaffinity on this OS)."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    cores = cores_for(local_rank, local_world, threads, sorted(os.sched_getaffinity(0)))
    if not cores:
        return []
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended, or not ours
            continue
    return cores
