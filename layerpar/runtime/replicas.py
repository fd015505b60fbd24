"""Replica groups: R independent engines of W branch workers each, behind the Backend protocol.

    with ReplicaSet(cfg) as backend:              # cfg.parallel.replicas = R, cfg.parallel.workers = W
        logits, meta = backend.infer_with_meta(x)  # meta["replica"]: which group answered
        backend.health()["replicas_ready"]

A cluster with more devices than branches serves with more groups, not larger ones: each group is a
whole model (R x W bundles; every group placed by parallel.placement, the groups pinned to different
nodes when the cluster has several that fit one, through Ray's node-id label: runtime/placement.py
`replica_nodes`). A call goes
to the least-busy group that is whole (no recovery running), and fails over to the next one when its
group loses a worker mid-call: a group that recovers is out of rotation while the others answer, so a
SIGKILL costs the requests no wait for the recovery. Only when no group is whole does a call take its
first group's own policy (serve.degraded: wait for the recovery, or the surviving branches' answer).
The server runs `concurrency` (= R) batches at once, one per group.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import TypeVar

import ray
import torch

from layerpar.config import Config
from layerpar.model.overflow import check_finite_logits
from layerpar.parallel.cluster import connect
from layerpar.runtime.engine import Engine
from layerpar.runtime.errors import WorkerError
from layerpar.runtime.placement import replica_nodes

log = logging.getLogger("layerpar.runtime")
T = TypeVar("T")
# Longest a health probe waits for any one group: under the server's probe bound (at least 5 s), so a
# stopped group never times the whole probe out.
HEALTH_BOUND_S = 4.0


class ReplicaSet:
    def __init__(self, cfg: Config, *, total_steps: int = 0, checkpoint: str | None = None):
        r = cfg.parallel.replicas
        if r < 1 or cfg.parallel.workers < 1:
            raise ValueError("a ReplicaSet needs parallel.replicas >= 1 and parallel.workers >= 1")
        self.cfg, self.concurrency = cfg, r
        self._owns_ray = connect(cfg)
        self._lock = threading.Lock()
        self.busy = [0] * r  # calls in flight per group
        self.calls = [0] * r  # calls answered per group
        self._health_pool: ThreadPoolExecutor | None = None  # one health probe per group at once
        self._health_pending: list[Future | None] = [None] * r
        self.replicas: list[Engine] = []
        try:
            nodes = replica_nodes(cfg.parallel, r)
            self.replicas = self._each(lambda i: Engine(cfg, total_steps=total_steps, node_id=nodes[i]),
                                       range(r), keep=True)
            if checkpoint is not None:
                self.load(checkpoint)
        except BaseException:
            self.shutdown()
            raise

    def _each(self, fn: Callable[[object], T], items, keep: bool = False) -> list[T]:
        """fn over items, all at once (starting, loading and stopping groups in parallel); keep: on a
        failure shut down whatever did start before raising."""
        items = list(items)
        with ThreadPoolExecutor(max(1, len(items))) as pool:
            futures = [pool.submit(fn, i) for i in items]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            if keep:
                for f in futures:
                    if f.exception() is None:
                        f.result().shutdown()
            raise errors[0]
        return [f.result() for f in futures]

    # ------------------------------------------------------------------ routing

    def _pick(self, skip: set[int]) -> int | None:
        """The whole group with the fewest calls in flight (then the fewest answered), not in skip."""
        with self._lock:
            whole = [i for i, e in enumerate(self.replicas) if i not in skip and e.available]
            if not whole:
                return None
            i = min(whole, key=lambda j: (self.busy[j], self.calls[j]))
            self.busy[i] += 1
            return i

    def _on(self, i: int, fn: Callable[[Engine, bool], T], wait: bool) -> tuple[T, int]:
        """fn(engine i, wait), counted in flight (the caller counted it in) and answered."""
        answered = False
        try:
            out = fn(self.replicas[i], wait)
            answered = True
            return out, i
        finally:
            with self._lock:
                self.busy[i] -= 1
                self.calls[i] += answered

    def _route(self, fn: Callable[[Engine, bool], T]) -> tuple[T, int]:
        """fn(engine, wait) on a whole group (wait=False: a recovering group raises, the call moves
        on); when none is whole, on the first group with wait=True (its own policy)."""
        tried: set[int] = set()
        while (i := self._pick(tried)) is not None:
            try:
                return self._on(i, fn, wait=False)
            except WorkerError as exc:
                log.warning("replica %d failed a call, trying another: %s", i, exc)
                tried.add(i)
        with self._lock:
            self.busy[0] += 1
        return self._on(0, fn, wait=True)

    # ------------------------------------------------------------------ Backend protocol

    def infer(self, x: torch.Tensor, num_branches: int | None = None) -> torch.Tensor:
        return check_finite_logits(self.infer_with_meta(x, num_branches)[0])

    def infer_with_meta(self, x: torch.Tensor, num_branches: int | None = None
                        ) -> tuple[torch.Tensor, dict]:
        """(logits, {"degraded", "branches_used", "replica", "timings"}) from one group."""

        def call(engine: Engine, wait: bool):
            # the call's own timings, in its meta: two slots may share one engine (no group whole)
            return engine.infer_with_meta(x, num_branches, wait=wait)

        (logits, meta), i = self._route(call)
        meta["replica"] = i
        return logits, meta

    def prefix_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._route(lambda e, wait: e.prefix_logits(x))[0]

    def evaluate(self, split, batch_size: int = 256) -> dict:
        from layerpar.train.evaluate import evaluate

        return evaluate(self, split, batch_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._route(lambda e, wait: e.state_dict())[0]

    def save(self, path, *, epoch: int, extra: dict | None = None):
        return self._route(lambda e, wait: e.save(path, epoch=epoch, extra=extra))[0]

    def load(self, path, *, weights_only: bool = False) -> dict:
        """The same checkpoint into every group (in parallel)."""
        return self._each(lambda e: e.load(path, weights_only=weights_only), self.replicas)[0]

    def prefix_work(self, k: int | None) -> int:
        return self.replicas[0].prefix_work(k)

    def info(self) -> dict:
        first = self.replicas[0].info()
        w = first["workers"]
        return {**first, "workers": w * len(self.replicas), "workers_per_replica": w,
                "replicas": len(self.replicas), "nodes": [n for e in self.replicas for n in e.worker_nodes()],
                "recoveries": len(self.recoveries)}

    def health(self, timeout_s: float | None = None) -> dict:
        """Ready while at least one group is whole; per group its own engine's health, asked of every
        group at once and each bounded by `timeout_s` (default HEALTH_BOUND_S): a group that does not
        answer in time (a stopped worker: its ping waits parallel.heartbeat_s) counts as not ready
        with no worker known alive, and the others still answer. A group's probe still running from
        an earlier call is waited on, not asked again."""
        bound = HEALTH_BOUND_S if timeout_s is None else timeout_s
        with self._lock:
            if self._health_pool is None:
                self._health_pool = ThreadPoolExecutor(len(self.replicas),
                                                       thread_name_prefix="layerpar-health")
            for i, e in enumerate(self.replicas):
                if self._health_pending[i] is None or self._health_pending[i].done():
                    self._health_pending[i] = self._health_pool.submit(e.health)
            pending = list(self._health_pending)
        futures_wait(pending, timeout=bound)
        each, late = [], []
        for i, (e, f) in enumerate(zip(self.replicas, pending, strict=True)):
            workers = e.layout.num_workers
            if not f.done():
                late.append(i)
                each.append({"ready": False, "workers": workers, "workers_alive": 0})
            elif f.exception() is not None:
                log.warning("health of replica group %d failed: %s: %s", i, type(f.exception()).__name__,
                            f.exception())
                each.append({"ready": False, "workers": workers, "workers_alive": 0})
            else:
                each.append(f.result())
        if late:
            log.warning("health of replica group(s) %s did not answer within %.1fs (a worker stopped or "
                        "hung?); counted not ready", late, bound)
        ready = [bool(h.get("ready")) for h in each]
        return {"ready": any(ready), "workers": sum(h["workers"] for h in each),
                "workers_alive": sum(h["workers_alive"] for h in each), "replicas": len(each),
                "replicas_ready": sum(ready), "replica_ready": ready, "replicas_late": late,
                "placement_fallbacks": sum(e.group.placement_fallbacks for e in self.replicas),
                "recovering": any(h.get("recovering") for h in each)}

    @property
    def recoveries(self) -> list[dict]:
        return [{**rec, "replica": i} for i, e in enumerate(self.replicas) for rec in e.recoveries]

    def stats(self) -> list[list[dict]]:
        return [e.stats() for e in self.replicas]

    def worker_pids(self) -> list[list[int]]:
        """Per group, the process id of each worker by rank."""
        return [e.worker_pids() for e in self.replicas]

    def shutdown(self) -> None:
        if self._health_pool is not None:
            self._health_pool.shutdown(wait=False, cancel_futures=True)
            self._health_pool = None
        if self.replicas:
            self._each(lambda e: e.shutdown(), self.replicas)
            self.replicas = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
