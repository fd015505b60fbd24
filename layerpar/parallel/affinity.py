"""Pinning a CPU rank to its own cores, as torchrun's --numa-binding and MPI's --bind-to core do.

On a CPU node the OS is free to move W single-thread ranks (and gloo's I/O threads) across the same
cores; each move costs the rank its warm L1/L2 caches. Measured on the 2-core development machine,
two gloo ranks of the Fashion-MNIST model: 27-28 ms a step unpinned, 22 ms pinned, without Ray
(docs/BENCHMARKS.md, "SPMD step").

    pin_rank(local_rank=1, local_world=2, threads=1)   # -> [1]: this process now runs on core 1

Ray hands out CPU counts, not core ids, so the local rank alone cannot say which cores are this job's:
two Tune trials (or two runs) on one node both have a local rank 0. A rank therefore claims its cores
in a per-node registry (one file per core in the temporary directory, holding the claimer's PID,
written under a lock) and takes only cores that this process may run on (os.sched_getaffinity: a
cgroup's or taskset's set) and that no live process holds; when too few are free it is not pinned at
all and the OS places it. A claim ends with its process.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path


def default_claims_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"layerpar-cores-{os.getuid()}"


def cores_for(local_rank: int, local_world: int, threads: int, available: list[int]) -> list[int]:
    """The cores of one rank: consecutive slices of the allowed cores, or [] (no pinning) when the
    node's ranks need more cores than this process may use."""
    if local_world * threads > len(available) or not 0 <= local_rank < local_world:
        return []
    return available[local_rank * threads:(local_rank + 1) * threads]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def claim_cores(preferred: list[int], available: list[int], *, claims_dir: Path | None = None) -> list[int]:
    """Claim len(preferred) cores of `available` for this process, `preferred` first, skipping cores a
    live process holds; [] (and nothing claimed) when too few are free. Earlier claims of this
    process are given up first."""
    claims_dir = claims_dir or default_claims_dir()
    claims_dir.mkdir(parents=True, exist_ok=True)
    me = os.getpid()
    with open(claims_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another rank of this node claims
        free = []
        for core in preferred + [c for c in available if c not in preferred]:
            path = claims_dir / f"core-{core}"
            holder = _holder(path)
            if holder == me:
                path.unlink(missing_ok=True)
                holder = None
            if holder is None or not _alive(holder):
                free.append(core)
        got = free[:len(preferred)]
        if len(got) < len(preferred):
            return []
        for core in got:
            (claims_dir / f"core-{core}").write_text(f"{me}\n")
        return got


def pin_rank(*, local_rank: int, local_world: int, threads: int,
             claims_dir: Path | None = None) -> list[int]:
    """Pin every thread of this process (gloo's included, created before) to cores of its own;
    returns them ([] if not pinned: too few free cores, or no sched_setaffinity on this OS)."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    available = sorted(os.sched_getaffinity(0))
    preferred = cores_for(local_rank, local_world, threads, available)
    try:
        cores = claim_cores(preferred, available, claims_dir=claims_dir) if preferred else []
    except OSError:  # no writable temporary directory: leave placement to the OS
        return []
    if not cores:
        return []
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended, or not ours
            continue
    return cores
