"""Recovering from a lost worker: tell dead from stuck from healthy, restart what must go, restore its
weights, re-form the process group. The Engine inherits `FaultHandling`; docs/FAILURES.md tells the
whole story with measured times.

A recovery, one at a time, in a background thread:

    1. classify   ping every worker in its `side` thread (never blocked by a collective):
                  an ActorDiedError or no answer within parallel.heartbeat_s -> dead
    2. drain      wait until no engine call is in flight (an inference call ends within
                  parallel.call_timeout_s, sooner when a worker it waits on misses its heartbeat;
                  a training call within parallel.timeout_s, the gloo timeout)
    3. leave      every live worker leaves the old process group; one that cannot within LEAVE_S
                  (its default thread is stuck, e.g. a hung worker) is lost too
    4. restart    lost workers are killed and re-created in their own placement-group bundle, then
                  restored: from the object-store snapshot, else the checkpoint it equals, or nothing
                  for a fresh engine (every piece is seeded)
    5. rejoin     every worker joins a new group on a fresh port (the same rendezvous as at start)

Calls wait while a recovery runs (serve.degraded=wait), or infer_with_meta answers from the surviving
workers' branches meanwhile (serve.degraded=allow). Idempotent calls are retried after it.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from layerpar.model.paraformer import ordered_sum
from layerpar.runtime.worker import as_tensor

log = logging.getLogger("layerpar.runtime")
LEAVE_S = 2.0  # longest wait for a live worker to leave the old process group
MAX_TRIES = 3  # tries of one idempotent call: the first, plus up to two recoveries


class WorkerError(RuntimeError):
    """A worker died or did not answer in time."""


class Restore(enum.Enum):
    """What a restarted worker is restored from."""

    FRESH = "fresh"  # nothing loaded or trained: the seeded initial weights are the state
    SNAPSHOT = "snapshot"  # the object-store snapshot (None: take one before the next inference)
    LOST = "lost"  # nothing consistent exists (a failed training step, a load half done)


class RecoveryError(RuntimeError):
    """The lost workers could not be brought back (the message says why and what to do)."""


@dataclass
class Recovery:
    """One recovery, from the failure that started it to a healthy worker group (or an error)."""

    reason: str
    handles: dict[int, object]
    """Workers that answered the ping (rank -> the handle then): the degraded path asks them."""
    dead: list[int]
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    restarted: list[int] = field(default_factory=list)
    seconds: float | None = None
    degraded_answers: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds spent in each step: drain, leave, restart, restore, rejoin."""

    def mark(self, phase: str, since: float) -> float:
        now = time.monotonic()
        self.phases[phase] = round(now - since, 3)
        return now

    @property
    def active(self) -> bool:
        return not self.done.is_set()

    def finish(self, error: BaseException | None = None) -> None:
        self.error, self.seconds = error, time.monotonic() - self.started
        self.done.set()

    def record(self) -> dict:
        return {"reason": self.reason, "dead": self.dead, "restarted": self.restarted,
                "seconds": self.seconds, "degraded_answers": self.degraded_answers,
                "phases": dict(self.phases),
                "error": None if self.error is None else str(self.error)}


def classify(workers: list, timeout_s: float) -> tuple[dict[int, object], list[int]]:
    """(live workers by rank, dead ranks): one ping in each side thread, all at once."""
    refs = [w.ping.remote() for w in workers]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    live, dead = {}, []
    for rank, (w, ref) in enumerate(zip(workers, refs, strict=True)):
        try:
            ray.get(ref, timeout=0)
            live[rank] = w
        except (ray.exceptions.RayError, TimeoutError):  # died, or no answer in time
            dead.append(rank)
    return live, dead


def leave_group(handles: dict[int, object], timeout_s: float) -> list[int]:
    """Ask every live worker to leave the process group; return the ranks that could not (stuck)."""
    refs = {rank: w.leave_group.remote() for rank, w in list(handles.items())}
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    stuck = []
    for rank, ref in refs.items():
        try:
            ray.get(ref, timeout=0)
        except (ray.exceptions.RayError, TimeoutError):
            stuck.append(rank)
    return stuck


def kill(handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


class FaultHandling:
    """The Engine's fault policy. Expects from the engine: workers, layout, timeout_s,
    call_timeout_s, heartbeat_s, startup_timeout_s, collective, allow_degraded, _get, _new_worker,
    _form_group, _make_head, _end_fast, and the state initialised by _init_faults()."""

    def _init_faults(self) -> None:
        # What a restarted worker is restored from (Restore); the snapshot is, per rank, an
        # object-store ref of (pieces incl. replicated, optim, step).
        self._state = Restore.FRESH
        self._snapshot: list | None = None
        self._snapshot_checkpoint: Path | None = None  # the checkpoint the snapshot equals
        self._lock = threading.Condition()
        self._inflight = 0
        self._closed = False
        self._recovery: Recovery | None = None
        self._broken: str | None = None  # a failure seen by a call that is not retried
        self.recoveries: list[dict] = []  # one record per finished recovery (reason, seconds, ...)

    # ------------------------------------------------------------------ calls

    @contextlib.contextmanager
    def _dispatch(self):
        """The workers for one call, counted in flight so that a recovery starts only after it
        ends; while a recovery runs, wait for it first."""
        while True:
            self._await_recovery()
            with self._lock:
                if self._closed:
                    raise WorkerError("the engine is shut down")
                if self._recovery is None or not self._recovery.active:
                    self._inflight += 1
                    workers = list(self.workers)
                    break
        try:
            yield workers
        finally:
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()

    def _idempotent(self, call):
        """Run call(workers) with the fault policy: on a WorkerError, recover and try again."""
        last: WorkerError | None = None
        for _ in range(MAX_TRIES):
            try:
                with self._dispatch() as workers:
                    self._end_fast()  # the call needs the workers' default threads
                    return call(workers)
            except WorkerError as exc:
                last = exc
                self._begin_recovery(str(exc))
        raise last

    def _not_retried(self, call):
        """Run call(workers) once; a WorkerError leaves the engine to recover at its next call."""
        try:
            with self._dispatch() as workers:
                self._end_fast()
                return call(workers)
        except WorkerError as exc:
            self._broken = str(exc)
            raise

    def _await_recovery(self) -> None:
        """Wait for a running recovery (or start one for a failure seen earlier); raise WorkerError
        if it fails."""
        rec = self._recovery
        if (rec is None or not rec.active) and self._broken is not None:
            rec = self._begin_recovery(self._broken)
        if rec is None:
            return
        rec.done.wait(self.startup_timeout_s + 2 * self.timeout_s + LEAVE_S)  # every step is bounded
        if rec.active:
            raise WorkerError(f"recovery from '{rec.reason}' did not finish in time")
        if rec.error is not None:
            self._broken = rec.reason
            raise WorkerError(f"could not recover: {rec.error}") from None

    def _drain(self, timeout_s: float) -> None:
        with self._lock:
            self._lock.wait_for(lambda: self._inflight == 0, timeout=timeout_s)

    # ------------------------------------------------------------------ recovery

    def _begin_recovery(self, reason: str) -> Recovery:
        """Start recovering in the background, or join the recovery already running."""
        with self._lock:
            if self._recovery is not None and self._recovery.active:
                return self._recovery
            if self._closed:
                raise WorkerError("the engine is shut down")
            t0 = time.monotonic()
            live, dead = classify(self.workers, self.heartbeat_s)
            rec = self._recovery = Recovery(reason=reason, handles=live, dead=dead, started=t0)
            if self._state is Restore.LOST or (self._state is Restore.SNAPSHOT and self._snapshot is None
                                         and self._snapshot_checkpoint is None):
                rec.finish(RecoveryError(
                    f"{reason}; the weights trained since the last save or load are lost with it: "
                    "restart from the last checkpoint (a training run does so by itself up to "
                    "train.max_failures)"))
                return rec
        log.warning("recovering: %s (dead workers %s)", reason, dead)
        threading.Thread(target=self._recover, args=(rec,), name="layerpar-recovery", daemon=True).start()
        return rec

    def _recover(self, rec: Recovery) -> None:
        """Steps 2-5 (the background thread's body)."""
        fresh: dict[int, object] = {}
        t = rec.mark("classify", rec.started)
        try:
            self._drain(max(self.timeout_s, self.call_timeout_s) + LEAVE_S)  # 2
            t = rec.mark("drain", t)
            self._end_fast(reset=True)  # the fast path's loops hold the default threads leave_group needs
            stuck = leave_group(rec.handles, LEAVE_S)  # 3
            t = rec.mark("leave", t)
            lost = sorted(set(rec.dead) | set(stuck))
            for rank in lost:  # 4: a stuck worker's collective would only end at the gloo timeout
                kill(self.workers[rank])
                fresh[rank] = self._new_worker(rank)
            self._get([w.ping.remote() for w in fresh.values()], self.startup_timeout_s)
            t = rec.mark("restart", t)
            self._restore(fresh)
            t = rec.mark("restore", t)
            with self._lock:
                if self._closed:
                    raise RecoveryError("the engine was shut down during recovery")
                for rank, w in fresh.items():
                    self.workers[rank] = w
                fresh = {}
            self.placement = self._get([w.where.remote() for w in self.workers], self.startup_timeout_s)
            if self.collective and len(self.workers) > 1:
                self._form_group()  # 5: a fresh port, every rank at once
            rec.mark("rejoin", t)
            rec.restarted = lost
            self._broken = None
            rec.finish()
            log.warning("recovered in %.2fs: restarted workers %s", rec.seconds, lost)
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits on the recovery
            for w in fresh.values():
                kill(w)
            rec.finish(exc)
        finally:
            self.recoveries.append(rec.record())

    def _restore(self, fresh: dict[int, object]) -> None:
        """Give restarted workers the weights they had."""
        if self._state is Restore.FRESH or not fresh:
            return  # nothing was loaded or trained: the seeded initial weights are the state
        if self._snapshot is not None:
            try:
                self._get([w.restore.remote(self._snapshot[r]) for r, w in fresh.items()],
                          self.startup_timeout_s)
                return
            except ray.exceptions.RayError as exc:  # the snapshot's node is gone too
                if self._snapshot_checkpoint is None:
                    raise RecoveryError(f"the object-store snapshot is lost ({exc}) and no "
                                        "checkpoint holds the same weights") from None
        from layerpar.train.checkpoint import load_checkpoint

        refs = []
        for rank, w in fresh.items():
            wanted = ["embed", "head"] + [f"branch.{b}" for b in self.layout.owned(rank)]
            ckpt = load_checkpoint(self._snapshot_checkpoint, wanted)
            refs.append(w.load.remote(ckpt.tensors, ckpt.optim or None, ckpt.step))
        self._get(refs, self.startup_timeout_s)

    def _take_snapshot(self, refs: list | None = None, checkpoint: Path | None = None) -> None:
        """Keep every worker's full state in the object store. The refs are owned by this driver, so
        the objects outlive the workers; the driver never fetches them (it holds no branch)."""
        self._snapshot = refs if refs is not None else [w.pieces.remote(True) for w in self.workers]
        self._snapshot_checkpoint, self._state = checkpoint, Restore.SNAPSHOT

    def health(self) -> dict:
        """For the server's health probe (thread-safe, cheap): one ping per worker in its side
        thread. A dead worker found here starts the recovery before any request needs it."""
        rec, workers = self._recovery, self.layout.num_workers
        if rec is not None and rec.active:
            return {"ready": False, "workers": workers, "workers_alive": len(rec.handles),
                    "recovering": True}
        live, dead = classify(list(self.workers), self.heartbeat_s)
        if dead and not self._closed:
            with contextlib.suppress(WorkerError):
                self._begin_recovery(f"the health probe found workers {dead} dead")
        return {"ready": not dead and self._broken is None, "workers": workers,
                "workers_alive": len(live), "recovering": bool(dead)}

    # ------------------------------------------------------------------ degraded answers

    @torch.no_grad()
    def _degraded(self, rec: Recovery, ref, k: int) -> tuple | None:
        """The surviving workers' branches below k, added on the driver in branch order, through a
        copy of the head; None when no survivor owns such a branch (the caller then waits)."""
        t0 = time.perf_counter()
        while rec.active:
            handles = {r: w for r, w in sorted(rec.handles.items()) if self.layout.owned(r).start < k}
            if not handles:
                return None
            refs = {r: w.partial.remote(ref, k) for r, w in handles.items()}  # side threads
            outs = {}
            for r, out_ref in refs.items():
                try:
                    outs[r] = ray.get(out_ref, timeout=self.call_timeout_s)
                except (ray.exceptions.RayError, TimeoutError):
                    rec.handles.pop(r, None)  # killed by the recovery meanwhile: ask the others
            head = self._head_from(handles) if len(outs) == len(refs) else None
            if head is None:
                continue
            rows = torch.cat([as_tensor(outs[r][0]) for r in sorted(outs)])  # (K, B, D) in branch order
            logits = head(ordered_sum(rows))
            rec.degraded_answers += 1
            self.last_timings = {"compute": time.perf_counter() - t0, "total": time.perf_counter() - t0}
            return logits, {"degraded": True, "branches_used": [b for r in sorted(outs) for b in outs[r][1]]}
        return None

    def _head_from(self, handles: dict) -> torch.nn.Module | None:
        """The driver's head copy; fetched from a survivor's side thread when stale."""
        if self._head is None:
            for w in handles.values():
                try:
                    self._head = self._make_head(ray.get(w.head_piece.remote(),
                                                         timeout=self.call_timeout_s))
                    break
                except (ray.exceptions.RayError, TimeoutError):
                    continue
        return self._head
