"""Helpers of the serving tests: a tiny config, test images, and `Gated`, a real backend whose calls
wait at a gate so that tests can fill the queue or let a deadline pass deterministically.

Tests never time the machine: every wait below is on an event or a polled condition, bounded by
HANG_S, which only catches a hang (a loaded 2-core box may be slow, never that slow)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback only (docs/CLUSTER.md)
os.environ.setdefault("RAY_AUTH_MODE", "token")

from layerpar.config import load_config  # noqa: E402

HANG_S = 60.0  # the longest any single wait in these tests may take before it counts as a hang


def tiny_cfg(workers: int = 0, **serve):
    """The packaged `tiny` model (4 branches, 8x8 inputs, 4 classes) on free ports, quick health probes."""
    serve = {"port": 0, "metrics_port": 0, "health_interval_s": 0.2, "drain_timeout_s": 5.0, **serve}
    # Generous bounds, for a loaded 2-core box: start-up (placement + timeout; actors that import
    # torch there were seen to need over 60 s) and the heartbeat (a busy worker's side thread may
    # answer a ping late; a SIGKILLed worker is noticed by its dead connection, not by the heartbeat).
    cfg = load_config("tiny", [f"parallel.workers={workers}", "parallel.cpus_per_worker=0.5",
                               "parallel.timeout_s=30", "parallel.placement_timeout_s=120",
                               "parallel.heartbeat_s=30"])
    return cfg.replace(serve=serve)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = HANG_S) -> None:
    """Poll `condition` until it holds; fail naming `what` if it still does not after timeout_s."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"{what}: still not true after {timeout_s:g} s"
        time.sleep(0.005)


def images(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


class Gated:
    """A real backend whose calls wait at a gate (open by default); counts what was computed."""

    def __init__(self, backend):
        self.backend = backend
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a call is waiting at (or went through) the gate
        self.calls = 0
        self.rows = 0
        self.last_timings = {}

    def infer(self, x, num_branches=None):
        self.entered.set()
        assert self.gate.wait(2 * HANG_S), "test forgot to open the gate"
        self.calls += 1
        self.rows += x.shape[0]
        out = self.backend.infer(x, num_branches)
        self.last_timings = dict(getattr(self.backend, "last_timings", {}) or {})
        return out

    def info(self):
        return self.backend.info()

    def shutdown(self):
        pass
