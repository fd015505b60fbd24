"""The server's side of the Backend protocol: one engine call per merged batch, and health probes.

Works with any Backend (LocalBackend, the Ray Engine). Optional hooks it uses when a backend has them:

    backend.infer_with_meta(x, num_branches=None) -> (logits, {"degraded": bool, "branches_used": [..]})
        answers that may come from the surviving branches only (serve.degraded: allow)
    backend.last_timings: dict[str, float]    seconds per phase of the last call (broadcast, compute, ...)
    backend.health() -> {"ready": bool, "workers": int, "workers_alive": int}
        called from a helper thread every serve.health_interval_s; must be cheap and thread-safe;
        a replica set adds "replicas" and "replicas_ready" (SERVING while one group is whole)
    backend.concurrency: int                  batches it runs at once (a replica set: one per group)
    backend.prefix_work(k) -> float           cost units of the prefix model k (serve.latency_slo_ms)

Rows whose values overflow the model come back as they were computed (NaN/Inf logits; a backend's
InputOverflow hands them over): one merged batch may hold several requests, and only those with such
a row are refused (the server checks each request's own rows). An overflow is not an engine failure.
"""

from __future__ import annotations

import inspect
import logging
import time

import numpy as np
import torch

from layerpar.model.overflow import InputOverflow

log = logging.getLogger("layerpar.serve")


class BackendUnavailable(RuntimeError):
    """The engine failed on every try (-> UNAVAILABLE: the client may retry)."""


class BackendRunner:
    """compute(x, num_branches) for the Batcher: prefix models, degraded answers, phases, retries."""

    def __init__(self, backend, *, retries: int = 1, on_error=None):
        self.backend = backend
        self.retries = retries
        self.on_error = on_error  # called once per failed engine call (a metrics counter)
        self._with_meta = callable(getattr(backend, "infer_with_meta", None))

    def __call__(self, x: torch.Tensor, num_branches: int | None) -> tuple[np.ndarray, dict]:
        """x (R, C, H, W) -> logits (R, classes) float32 and meta {degraded, branches_used, timings}."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    if self._with_meta:
                        logits, meta = self.backend.infer_with_meta(x, num_branches=num_branches)
                    else:
                        logits, meta = self.backend.infer(x, num_branches=num_branches), {}
            except InputOverflow as exc:  # the input's fault, not the engine's: keep every row
                if exc.logits is None:
                    raise
                logits, meta = exc.logits, {}
            except Exception as exc:  # noqa: BLE001 - inference is idempotent: retry, then report
                last = exc
                if self.on_error:
                    self.on_error()
                log.warning("engine call failed (try %d of %d): %s: %s", attempt + 1, self.retries + 1,
                            type(exc).__name__, exc)
                continue
            backend_s = time.perf_counter() - t0
            meta = dict(meta or {})
            meta["timings"] = self._phases(meta.get("timings"), backend_s)
            return logits.detach().to("cpu", torch.float32).numpy(), meta
        raise BackendUnavailable(f"the engine failed {self.retries + 1} time(s); last error: "
                                 f"{type(last).__name__}: {last}")

    def _phases(self, reported: dict | None, backend_s: float) -> dict[str, float]:
        """Seconds per phase: what the backend reports (last_timings or meta) plus the call's wall time.
        A backend that reports nothing gets its whole call counted as compute."""
        reported = reported or getattr(self.backend, "last_timings", None) or {}
        phases = {k: float(v) for k, v in reported.items() if k != "total"}
        phases.setdefault("compute", backend_s)
        phases["backend"] = backend_s
        return phases


def probe(backend, default_workers: int, timeout_s: float | None = None) -> dict:
    """backend.health() when it has one (ready, workers, workers_alive, and for a replica set
    replicas, replicas_ready, replica_ready); else a live backend. timeout_s: handed to a health()
    that takes it (a replica set bounds each group's probe by it)."""
    health = getattr(backend, "health", None)
    kwargs = {}
    if timeout_s is not None and callable(health) and "timeout_s" in inspect.signature(health).parameters:
        kwargs["timeout_s"] = timeout_s
    h = dict(health(**kwargs) or {}) if callable(health) else {}
    workers = int(h.get("workers", default_workers))
    return {**h, "ready": bool(h.get("ready", True)), "workers": workers,
            "workers_alive": int(h.get("workers_alive", workers))}
