"""Recovering from a lost worker: tell dead from stuck from healthy, restart what must go, restore its
weights, re-form the process group. The Engine holds one `Faults`; docs/FAILURES.md tells the whole
story with measured times (the record and the per-worker steps: runtime/recovery.py).

A recovery, one at a time, in a background thread:

    1. classify   ping every worker in its `side` thread (never blocked by a collective):
                  an ActorDiedError or no answer within parallel.heartbeat_s -> dead
    2. drain      wait until no engine call is in flight (an inference call ends within
                  parallel.call_timeout_s, sooner when a worker it waits on misses its heartbeat;
                  a load within parallel.timeout_s)
    3. leave      every live worker leaves the old process group; one that cannot within LEAVE_S
                  (its default thread is stuck, e.g. a hung worker) is lost too
    4. restart    lost workers are killed and re-created in their own placement-group bundle, then
                  restored: from the object-store snapshot, else the checkpoint it equals, or nothing
                  for a fresh engine (every piece is seeded)
    5. rejoin     every worker joins a new group on a fresh port (the same rendezvous as at start)

`Faults.run` is the only retry loop: calls wait while a recovery runs (serve.degraded=wait), or a
fallback answers meanwhile (serve.degraded=allow: the surviving branches, runtime/degraded.py), and
idempotent calls are tried again after it.

    faults = Faults(group)
    logits = faults.run(lambda workers: ..., retry=True)    # a WorkerError recovers, then retries
    faults.run(load, retry=False)                           # raised; recovery at the next call
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray

from layerpar.runtime.errors import Recovering, WorkerError
from layerpar.runtime.group import WorkerGroup, kill
from layerpar.runtime.recovery import LEAVE_S, Recovery, RecoveryError, Restore, classify, leave_group

log = logging.getLogger("layerpar.runtime")
MAX_TRIES = 3  # tries of one idempotent call: the first, plus up to two recoveries


class Faults:
    """The engine's fault policy over its worker group: which calls are in flight, whether a recovery
    runs, what a restarted worker is restored from (`state`, a Restore; `snapshot`: per rank an
    object-store ref of (pieces incl. replicated, optim, step), None = take one before the next
    inference; `snapshot_checkpoint`: the checkpoint it equals)."""

    def __init__(self, group: WorkerGroup):
        self.group = group
        self.state = Restore.FRESH
        self.snapshot: list | None = None
        self.snapshot_checkpoint: Path | None = None
        self.records: list[dict] = []  # one per finished recovery (reason, seconds, phases, ...)
        self._lock = threading.Condition()
        self._inflight = 0
        self._closed = False
        self._recovery: Recovery | None = None
        self._broken: str | None = None  # a failure seen by a call that is not retried

    @property
    def recovering(self) -> Recovery | None:
        rec = self._recovery
        return rec if rec is not None and rec.active else None

    @property
    def available(self) -> bool:
        """No recovery runs and no failure waits for one: a call would go straight to the workers."""
        return self.recovering is None and self._broken is None and not self._closed

    # ------------------------------------------------------------------ calls

    def run(self, call: Callable[[list], object], *, retry: bool = True,
            fallback: Callable[[Recovery], object | None] | None = None, wait: bool = True):
        """call(workers) under the fault policy. retry: on a WorkerError recover and try again (up to
        MAX_TRIES in all), asking `fallback(recovery)` first while a recovery runs (None: wait for
        it). Not retried: the error is raised and the recovery starts at the next call. wait=False:
        never wait for a recovery; raise Recovering instead (a replica set moves the call on)."""
        if not retry:
            try:
                with self._dispatch(wait) as workers:
                    return call(workers)
            except WorkerError as exc:
                self._broken = str(exc)
                raise
        last: WorkerError | None = None
        for _ in range(MAX_TRIES):
            rec = self.recovering
            if rec is not None and fallback is not None:
                out = fallback(rec)
                if out is not None:
                    return out
            try:
                with self._dispatch(wait) as workers:
                    return call(workers)
            except Recovering:
                raise
            except WorkerError as exc:
                last = exc
                self.begin(str(exc))
        raise last

    @contextlib.contextmanager
    def _dispatch(self, wait: bool = True):
        """The workers for one call, counted in flight so that a recovery starts only after it
        ends; while a recovery runs (or a failure seen earlier awaits one), wait for it first, or
        with wait=False raise Recovering."""
        while True:
            if wait:
                self._await_recovery()
            elif (rec := self.recovering) is not None or self._broken is not None:
                reason = rec.reason if rec is not None else self._broken
                if rec is None:
                    with contextlib.suppress(WorkerError):
                        self.begin(self._broken)  # start it now: the next call finds it running
                raise Recovering(f"the engine is recovering ({reason}); not waiting for it")
            with self._lock:
                if self._closed:
                    raise WorkerError("the engine is shut down")
                if self.recovering is None:
                    self._inflight += 1
                    workers = list(self.group.workers)
                    break
        try:
            yield workers
        finally:
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()

    def _await_recovery(self) -> None:
        """Wait for a running recovery (or start one for a failure seen earlier); raise WorkerError
        if it fails."""
        rec = self._recovery
        if (rec is None or not rec.active) and self._broken is not None:
            rec = self.begin(self._broken)
        if rec is None:
            return
        g = self.group
        rec.done.wait(g.startup_timeout_s + 2 * g.timeout_s + LEAVE_S)  # every step is bounded
        if rec.active:
            raise WorkerError(f"recovery from '{rec.reason}' did not finish in time")
        if rec.error is not None:
            self._broken = rec.reason
            raise WorkerError(f"could not recover: {rec.error}") from None

    def close(self) -> None:
        """No new calls; let a nearly done recovery finish (a later one kills what it started)."""
        with self._lock:
            self._closed = True
            rec = self._recovery
        if rec is not None:
            rec.done.wait(5.0)
        self.snapshot = None

    # ------------------------------------------------------------------ recovery

    def begin(self, reason: str) -> Recovery:
        """Start recovering in the background, or join the recovery already running."""
        with self._lock:
            if self.recovering is not None:
                return self._recovery
            if self._closed:
                raise WorkerError("the engine is shut down")
            t0 = time.monotonic()
            live, dead = classify(self.group.workers, self.group.heartbeat_s)
            rec = self._recovery = Recovery(reason=reason, handles=live, dead=dead, started=t0)
            if self.state is Restore.LOST:
                rec.finish(RecoveryError(
                    f"{reason}; a load was interrupted, so the workers hold no consistent weights: "
                    "load the checkpoint again (restart from the last checkpoint)"))
                return rec
        log.warning("recovering: %s (dead workers %s)", reason, dead)
        threading.Thread(target=self._recover, args=(rec,), name="layerpar-recovery", daemon=True).start()
        return rec

    def _recover(self, rec: Recovery) -> None:
        """Steps 2-5 (the background thread's body)."""
        g, fresh = self.group, {}
        t = rec.mark("classify", rec.started)
        try:
            with self._lock:  # 2
                self._lock.wait_for(lambda: self._inflight == 0,
                                    timeout=max(g.timeout_s, g.call_timeout_s) + LEAVE_S)
            t = rec.mark("drain", t)
            stuck = leave_group(g, rec.handles, LEAVE_S)  # 3
            t = rec.mark("leave", t)
            lost = sorted(set(rec.dead) | set(stuck))
            fresh = g.restart(lost)  # 4
            lost = sorted(fresh)  # every rank when the group had to leave a node that is gone
            t = rec.mark("restart", t)
            self._restore(fresh)
            t = rec.mark("restore", t)
            with self._lock:
                if self._closed:
                    raise RecoveryError("the engine was shut down during recovery")
                g.install(fresh)
                fresh = {}
            g.rejoin()  # 5: a fresh port, every rank at once
            rec.mark("rejoin", t)
            rec.restarted = lost
            self._broken = None
            rec.finish()
            log.warning("recovered in %.2fs: restarted workers %s", rec.seconds, lost)
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits on the recovery
            for w in fresh.values():  # restarted but never installed
                kill(w)
            rec.finish(exc)
        finally:
            self.records.append(rec.record())

    def _restore(self, fresh: dict[int, object]) -> None:
        """Give restarted workers the weights they had."""
        if self.state is Restore.FRESH or not fresh:
            return  # nothing was loaded or trained: the seeded initial weights are the state
        g, ranks = self.group, sorted(fresh)
        workers = [fresh[r] for r in ranks]
        if self.snapshot is not None:
            try:
                g.call("restore", workers=workers, per_worker=[(self.snapshot[r],) for r in ranks],
                       timeout_s=g.startup_timeout_s)
                return
            except ray.exceptions.RayError as exc:  # the snapshot's node is gone too
                if self.snapshot_checkpoint is None:
                    raise RecoveryError(f"the object-store snapshot is lost ({exc}) and no "
                                        "checkpoint holds the same weights") from None
        from layerpar.train.checkpoint import load_checkpoint

        args = []
        for rank in ranks:
            wanted = ["embed", "head"] + [f"branch.{b}" for b in g.layout.owned(rank)]
            ckpt = load_checkpoint(self.snapshot_checkpoint, wanted)
            args.append((ckpt.tensors, ckpt.optim or None, ckpt.step))
        g.call("load", workers=workers, per_worker=args, timeout_s=g.startup_timeout_s)

    def take_snapshot(self, refs: list | None = None, checkpoint: Path | None = None) -> None:
        """Keep every worker's full state in the object store. The refs are owned by this driver, so
        the objects outlive the workers; the driver never fetches them (it holds no branch)."""
        self.snapshot = refs if refs is not None else self.group.transport.submit(
            self.group.workers, "pieces", True)
        self.snapshot_checkpoint, self.state = checkpoint, Restore.SNAPSHOT

    def lost(self) -> None:
        """The workers may disagree (a load half done): nothing consistent to restore."""
        self.state = Restore.LOST

    def health(self) -> dict:
        """For the server's health probe (thread-safe, cheap): one ping per worker in its side
        thread. A dead worker found here starts the recovery before any request needs it."""
        g, rec = self.group, self.recovering
        workers = g.layout.num_workers
        if rec is not None:
            return {"ready": False, "workers": workers, "workers_alive": len(rec.handles),
                    "recovering": True}
        live, dead = classify(list(g.workers), g.heartbeat_s)
        if dead and not self._closed:
            with contextlib.suppress(WorkerError):
                self.begin(f"the health probe found workers {dead} dead")
        return {"ready": not dead and self._broken is None, "workers": workers,
                "workers_alive": len(live), "recovering": bool(dead)}
