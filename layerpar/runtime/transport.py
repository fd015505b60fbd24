"""How a batch and an inference request reach the workers, and how their timings come back.

    transport = Transport(cfg.parallel, tag=engine_id, timeout_s=120, startup_timeout_s=150)
    with transport.broadcast(x.numpy(), placement) as ref:   # array, shm slot or object-store ref
        replies = transport.fast_call(workers, placement, ranks, ("infer", ref, k, reduce))
        # None: not every worker shares this node (or the fast path is off): use Ray calls
    transport.close()

- Small batches (<= INLINE_BYTES) ride inside the request.
- Larger ones go into a shared-memory slot (runtime/shm.py) when every worker shares the driver's
  node, else into the object store once (`ray.put`) for every worker.
- Requests go through the same-node fast path (runtime/fastpath.py) when every worker shares the
  driver's node and parallel.shared_memory is on; otherwise the engine makes one Ray call per worker.
"""

from __future__ import annotations

from contextlib import contextmanager

import ray

from layerpar.runtime import shm
from layerpar.runtime.fastpath import FastLane, FastPathError
from layerpar.runtime.recovery import WorkerError, is_comm_failure

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


class Transport:
    def __init__(self, pcfg, *, tag: str, timeout_s: float, startup_timeout_s: float):
        self.node_id = driver_node()
        self.slots = shm.InputSlots(f"layerpar-{tag}") if pcfg.shared_memory and shm.available() \
            else None
        self.lane = FastLane(enabled=self.slots is not None, timeout_s=timeout_s,
                             startup_timeout_s=startup_timeout_s, tag=tag)

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

    def fast_call(self, workers: list, placement: list[dict], ranks: int, msg: tuple
                  ) -> list[tuple] | None:
        """msg to ranks 0..ranks-1 over the fast path; the replies as (out, timings), like a Ray
        call's results; None when the fast path cannot serve these workers. A lost or failing peer
        is a WorkerError (the engine recovers), any other error is raised as the worker saw it."""
        if isinstance(msg[1], ray.ObjectRef) or not self.same_node(placement):
            return None
        try:
            replies = self.lane.call(workers, ranks, msg)
        except FastPathError as exc:
            raise WorkerError(str(exc)) from None
        if replies is None:
            return None
        for reply in replies:
            if reply[0] == "error":
                cause = RuntimeError(reply[1])
                if is_comm_failure(cause):
                    raise WorkerError(f"a collective failed (a peer died or hung): {reply[1][:300]}")
                raise cause
        return [reply[1:] for reply in replies]

    def end_fast(self) -> None:
        """Give the workers' default threads back (before any other call that needs them)."""
        self.lane.end()

    def close(self) -> None:
        self.end_fast()
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
