"""How a batch and an inference request reach the workers, and how their timings come back.

    transport = Transport(cfg.parallel, tag=engine_id, timeout_s=cfg.parallel.call_timeout_s,
                          startup_timeout_s=150)
    with transport.broadcast(x.numpy(), placement) as ref:   # array, shm slot or object-store ref
        replies = transport.fast_call(workers, placement, ranks, ("infer", ref, k, reduce))
        # None: not every worker shares this node (or the fast path is off): use Ray calls
    refs = transport.submit(workers, "branch_outputs", ref)  # any other call on the default threads
    transport.close()

The default-thread rule lives here and nowhere else: the fast path's loop occupies each worker's
default thread, so `submit` ends it before any Ray call that needs those threads, and fast calls and
submissions share one lock, so every worker sees calls in the same order (collectives match up).

- Small batches (<= INLINE_BYTES) ride inside the request.
- Larger ones go into a shared-memory slot (runtime/shm.py) when every worker shares the driver's
  node, else into the object store once (`ray.put`) for every worker.
- Requests go through the same-node fast path (runtime/fastpath.py) when every worker shares the
  driver's node and parallel.shared_memory is on; otherwise the engine makes one Ray call per worker.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

import ray

from layerpar.runtime import shm
from layerpar.runtime.errors import WorkerError
from layerpar.runtime.fastpath import MAX_REPLY_BYTES, FastPath, FastPathError, PeerLost

log = logging.getLogger("layerpar.runtime")

# Below this size a batch travels inside each request (Ray inlines small task arguments too),
# which is cheaper than a trip through the object store or a slot.
INLINE_BYTES = 64 * 1024


def broadcast_ref(value):
    """The one copy of `value` every worker reads: an object-store reference, or the value itself
    when it is small enough to ride in the task arguments."""
    size = sum(a.nbytes for a in value) if isinstance(value, tuple) else value.nbytes
    return value if size <= INLINE_BYTES else ray.put(value)


def driver_node() -> str | None:
    """This process's Ray node id; None where it has none (a Ray Client driver): then no worker
    counts as local and everything goes through Ray."""
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - Ray Client raises here
        return None


class FastLane:
    """The engine's fast path over its life: started for the current workers on first use,
    restarted when they change (a recovery replaced one), ended before any other call needs the
    workers' default threads, and switched off for good (with a warning) if it cannot start.

    After a call fails, the same workers get no new fast path until `reset()` (Transport.
    workers_changed, once a recovery has drained every call): a call queued behind the failed one
    fails at once instead of waiting for a stopped worker to connect."""

    def __init__(self, *, enabled: bool, timeout_s: float, startup_timeout_s: float,
                 heartbeat_s: float, tag: str):
        self.enabled, self.tag = enabled, tag
        self.timeout_s, self.startup_timeout_s, self.heartbeat_s = timeout_s, startup_timeout_s, heartbeat_s
        self._fast: FastPath | None = None
        self._failed: list | None = None  # the workers whose fast path failed, until reset()
        self.lock = threading.RLock()  # one call at a time: every worker sees the same order

    def call(self, workers: list, ranks: int, msg: tuple) -> list[tuple] | None:
        """Replies of ranks 0..ranks-1 to msg; None when the fast path is off."""
        with self.lock:
            try:
                fast = self._for(workers)
                return None if fast is None else fast.call(range(ranks), msg)
            except FastPathError:
                self.end()  # a late reply must never be read as the next call's
                self._failed = list(workers)
                raise

    def _for(self, workers: list) -> FastPath | None:
        if not self.enabled:
            return None
        if self._failed is not None and _same(self._failed, workers):
            raise PeerLost("the fast path to these workers failed; they are being recovered")
        if self._fast is not None and _same(self._fast.workers, workers):
            return self._fast
        self.end()
        try:
            self._fast = FastPath(workers, timeout_s=self.timeout_s, heartbeat_s=self.heartbeat_s,
                                  startup_timeout_s=self.startup_timeout_s, tag=self.tag)
        except PeerLost:
            raise
        except FastPathError as exc:
            log.warning("inference goes through Ray actor calls: %s", exc)
            self.enabled = False
        return self._fast

    @property
    def running(self) -> bool:
        return self._fast is not None

    def end(self) -> None:
        with self.lock:
            if self._fast is not None:
                self._fast.close()
                self._fast = None

    def reset(self) -> None:
        """End the fast path and allow a new one for the same workers (after a recovery)."""
        with self.lock:
            self.end()
            self._failed = None


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class Transport:
    def __init__(self, pcfg, *, tag: str, timeout_s: float, startup_timeout_s: float):
        self.node_id = driver_node()
        self.slots = shm.InputSlots(f"layerpar-{tag}") if pcfg.shared_memory and shm.available() \
            else None
        self.lane = FastLane(enabled=self.slots is not None, timeout_s=timeout_s,
                             startup_timeout_s=startup_timeout_s, heartbeat_s=pcfg.heartbeat_s, tag=tag)

    def same_node(self, placement: list[dict]) -> bool:
        return self.node_id is not None and all(p.get("node_id") == self.node_id for p in placement)

    @contextmanager
    def broadcast(self, array, placement: list[dict]):
        """The one copy of a batch every worker reads during a call (every retry included)."""
        if self.slots is None or array.nbytes <= INLINE_BYTES or not self.same_node(placement):
            yield broadcast_ref(array)
            return
        with self.slots.hold(array) as ref:
            yield ref

    def fast_call(self, workers: list, placement: list[dict], ranks: int, msg: tuple,
                  reply_bytes: int = 0) -> list[tuple] | None:
        """msg to ranks 0..ranks-1 over the fast path; the replies as (out, timings), like a Ray
        call's results; None when the fast path cannot serve these workers (or a reply of about
        `reply_bytes` would exceed its bound). A lost or failing peer is a WorkerError (the engine
        recovers), any other error is raised as the worker saw it."""
        if isinstance(msg[1], ray.ObjectRef) or not self.same_node(placement) \
                or reply_bytes > MAX_REPLY_BYTES // 2:
            return None
        try:
            replies = self.lane.call(workers, ranks, msg)
        except FastPathError as exc:
            raise WorkerError(str(exc)) from None
        if replies is None:
            return None
        for reply in replies:
            if reply[0] == "error":
                if reply[2]:  # the worker's exception was a failed collective (parallel/comm.py)
                    raise WorkerError(f"a collective failed (a peer died or hung): {reply[1][:300]}")
                raise RuntimeError(reply[1])
        return [reply[1:] for reply in replies]

    def submit(self, workers: list, method: str, *args, per_worker: list[tuple] | None = None) -> list:
        """One Ray call of a default-thread worker method per worker (per_worker: each its own
        arguments), all submitted before any reply is awaited. The fast path's loop, which holds
        those threads, ends first; no other thread's calls interleave."""
        with self.lane.lock:
            self.lane.end()
            return [getattr(w, method).remote(*(per_worker[i] if per_worker is not None else args))
                    for i, w in enumerate(workers)]

    def workers_changed(self) -> None:
        """A recovery is about to re-form the group: the fast path may start again, to whichever
        workers it then has, once the next call asks for it."""
        self.lane.reset()

    @property
    def fast_path_running(self) -> bool:
        return self.lane.running

    def slot_paths(self) -> list:
        return [] if self.slots is None else self.slots.paths()

    def close(self) -> None:
        self.lane.end()
        if self.slots is not None:
            self.slots.close()


def merge_timings(per_worker: list[dict[str, float]]) -> dict[str, float]:
    """One phase split from every worker's own: embed and compute of the slowest worker; the reduce
    of the last worker to reach it (the collective itself; earlier arrivals only wait, and that
    wait is the slower workers' compute or a later start, counted there or in dispatch); the head
    of rank 0, the only one that runs it."""
    out = {p: max(t[p] for t in per_worker) for p in ("embed", "compute")}
    reduces = [t["reduce"] for t in per_worker if "reduce" in t]
    if reduces:
        out["reduce"] = min(reduces)
    heads = [t["head"] for t in per_worker if "head" in t]
    if heads:
        out["head"] = heads[0]
    return out
