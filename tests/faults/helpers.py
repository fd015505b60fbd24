"""Helpers of the fault tests: tiny configs with short timeouts, test images, the chaos module."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (docs/CLUSTER.md)
os.environ.setdefault("RAY_AUTH_MODE", "token")

from layerpar.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 5.0  # parallel.timeout_s and call_timeout_s here: a hung worker is given up on after 5 s


def load_chaos():
    from layerpar.runtime import chaos

    return chaos


def fault_cfg(workers: int = 2, *extra: str, degraded: str = "wait"):
    """The packaged `tiny` Para-Former (4 branches, width 16, 8x8 inputs, 4 classes) on `workers`
    Ray workers, parallel.timeout_s=5 and parallel.call_timeout_s=5."""
    return load_config("tiny", [f"parallel.workers={workers}", "parallel.cpus_per_worker=0.5",
                                f"parallel.timeout_s={TIMEOUT_S}", f"parallel.call_timeout_s={TIMEOUT_S}",
                                "parallel.placement_timeout_s=60",
                                f"serve.degraded={degraded}", *extra])


def images(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def wait_dead(pid: int, timeout_s: float = 60.0) -> None:
    """Wait until process `pid` (just sent SIGKILL) has died: a zombie or gone. The bound only
    catches a hang; a SIGKILLed process dies at once."""
    stat = Path(f"/proc/{pid}/stat")
    end = time.monotonic() + timeout_s
    while True:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except OSError:  # reaped already
            return
        assert time.monotonic() < end, f"process {pid} still runs {timeout_s:g} s after SIGKILL"
        time.sleep(0.005)
