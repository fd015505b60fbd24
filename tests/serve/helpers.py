"""Helpers of the serving tests: a tiny config, test images, and `Gated`, a real backend whose calls
wait at a gate so that tests can fill the queue or let a deadline pass deterministically."""

from __future__ import annotations

import os
import threading

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (NOTES.md)
os.environ.setdefault("RAY_AUTH_MODE", "token")

from layerpar.config import load_config  # noqa: E402


def tiny_cfg(workers: int = 0, **serve):
    """The packaged `tiny` model (4 branches, 8x8 inputs, 4 classes) on free ports, quick health probes."""
    serve = {"port": 0, "metrics_port": 0, "health_interval_s": 0.2, "drain_timeout_s": 5.0, **serve}
    cfg = load_config("tiny", [f"parallel.workers={workers}", "parallel.cpus_per_worker=0.5",
                               "parallel.timeout_s=30"])
    return cfg.replace(serve=serve)


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
        assert self.gate.wait(30), "test forgot to open the gate"
        self.calls += 1
        self.rows += x.shape[0]
        out = self.backend.infer(x, num_branches)
        self.last_timings = dict(getattr(self.backend, "last_timings", {}) or {})
        return out

    def info(self):
        return self.backend.info()

    def shutdown(self):
        pass
