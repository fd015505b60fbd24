"""Dynamic batching: merge requests that arrive close together into one engine call, split back.

    batcher = Batcher(compute, max_batch=64, max_wait_ms=0, max_queue=256, slots=2)
    future = batcher.submit(x, num_branches=None, deadline=time.monotonic() + 1.0)  # x: (B, C, H, W)
    out = future.result()                                   # out.logits: exactly this caller's B rows

`slots` threads (one per replica group the backend can run at once) each take the oldest waiting
request together with every queued request of the same `num_branches` (a prefix model is a different
computation, so only equal keys merge), up to ``max_batch`` rows, run ``compute`` once and hand each
caller its slice. Dispatch on idle: a free thread takes whatever is queued at once; while every thread
is busy, requests accumulate, which is where batches come from. ``max_wait_ms`` (default 0) lets a
free thread wait that long after the oldest request's arrival for a fuller batch; a full batch goes at
once. With a LatencyPlanner (serve.latency_slo_ms) a batch of requests that asked for no particular
prefix gets the largest prefix that meets the target (serve/slo.py), never fewer branches than a
request's min_branches. The queue is bounded: beyond ``max_queue`` waiting requests ``submit`` raises
``QueueFull`` at once. A request whose deadline has passed, or whose caller went away, is dropped before
it is computed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from layerpar.serve.slo import LatencyPlanner

log = logging.getLogger("layerpar.serve")

# compute(x (R, C, H, W), num_branches) -> (logits (R, classes) float32 numpy, meta dict)
Compute = Callable[[torch.Tensor, int | None], tuple[np.ndarray, dict]]


class QueueFull(Exception):
    """The bounded queue is full (-> RESOURCE_EXHAUSTED)."""


class Draining(Exception):
    """The batcher is shutting down and takes no new requests (-> UNAVAILABLE)."""


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited; it was never computed (-> DEADLINE_EXCEEDED)."""


@dataclass
class Pending:
    x: np.ndarray  # (B, C, H, W) float32
    key: int | None  # num_branches; None = all (or, under a latency target, the planner's choice)
    deadline: float | None  # time.monotonic() seconds
    enqueued: float
    least: int = 0  # min_branches: the fewest a latency target may answer with
    future: Future = field(default_factory=Future)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def dead(self, now: float) -> bool:
        return self.future.cancelled() or (self.deadline is not None and now >= self.deadline)


@dataclass
class BatchOutput:
    """What one caller gets back."""

    logits: np.ndarray  # (B, classes): this caller's rows only
    meta: dict  # from compute: degraded, branches_used, timings (seconds per phase)
    queue_s: float  # time from submit to the start of the engine call
    batch_rows: int  # rows in the merged engine call
    batch_requests: int  # requests merged into it
    num_branches: int | None = None  # the prefix that answered (None: all branches)


class Batcher:
    def __init__(self, compute: Compute, *, max_batch: int, max_wait_ms: float, max_queue: int,
                 slots: int = 1, planner: LatencyPlanner | None = None,
                 on_batch: Callable[[int, int], None] | None = None,
                 on_expired: Callable[[int], None] | None = None):
        self.compute = compute
        self.planner = planner
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch  # (rows, requests) per engine call
        self.on_expired = on_expired  # (count) of requests dropped unseen because their deadline passed
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._closing = False
        # What was actually computed, for metrics and for tests that check nothing expired ran.
        self.calls = 0
        self.rows_computed = 0
        self.requests_computed = 0
        self.expired = 0
        self.slots = max(1, slots)
        self._threads = [threading.Thread(target=self._loop, name=f"layerpar-batcher-{i}", daemon=True)
                         for i in range(self.slots)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ callers (any thread)

    def submit(self, x: np.ndarray, num_branches: int | None = None,
               deadline: float | None = None, min_branches: int = 0) -> Future:
        """Queue one request; the future resolves to a BatchOutput or raises DeadlineExpired or the
        engine's exception. Raises QueueFull or Draining at once instead of queueing."""
        p = Pending(x=x, key=num_branches, deadline=deadline, enqueued=time.monotonic(), least=min_branches)
        with self._cond:
            if self._closing:
                raise Draining("the server is draining and takes no new requests")
            if len(self._queue) >= self.max_queue:
                self._drop_dead_locked(p.enqueued)  # callers that left should not hold places
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} requests waiting); "
                                "retry later or lower the request rate")
            self._queue.append(p)
            self._cond.notify()
        return p.future

    def depth(self) -> int:
        """Requests waiting (not yet in an engine call)."""
        return len(self._queue)

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop taking requests, finish every queued one, stop the threads; True if they finished in time."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        end = None if timeout_s is None else time.monotonic() + timeout_s
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    # ------------------------------------------------------------------ the engine thread

    def _drop_dead_locked(self, now: float) -> None:
        keep: deque[Pending] = deque()
        expired = 0
        for p in self._queue:
            if not p.dead(now):
                keep.append(p)
            elif p.future.set_running_or_notify_cancel():  # False: the caller cancelled; nothing to say
                p.future.set_exception(DeadlineExpired("the deadline passed while the request waited "
                                                       "in the queue; it was not computed"))
                expired += 1
        self._queue = keep
        if expired:
            self.expired += expired
            if self.on_expired:
                try:
                    self.on_expired(expired)
                except Exception:  # noqa: BLE001 - a metrics fault must not end the slot's thread
                    log.exception("counting expired requests failed")

    def _take(self) -> tuple[list[Pending], int | None] | None:
        """Block until a batch is due; return it and the prefix to run (None when closing with an
        empty queue)."""
        with self._cond:
            while True:
                now = time.monotonic()
                self._drop_dead_locked(now)
                if not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                head = self._queue[0]
                rows = sum(p.rows for p in self._queue if p.key == head.key)
                due = head.enqueued + self.max_wait_s
                if rows >= self.max_batch or now >= due or self._closing:
                    break
                self._cond.wait(due - now)  # woken early by submit(): maybe the batch is full now
            batch: list[Pending] = []
            rest: deque[Pending] = deque()
            total, full = 0, False
            for p in self._queue:
                # FIFO within a key: stop at the first request that does not fit (a request larger
                # than max_batch still runs, alone).
                if p.key == head.key and not full and (not batch or total + p.rows <= self.max_batch):
                    batch.append(p)
                    total += p.rows
                else:
                    full = full or p.key == head.key
                    rest.append(p)
            self._queue = rest
            key = head.key
            if head.key is None and self.planner:
                try:
                    key = self._prefix(batch, total, now)
                except Exception:  # noqa: BLE001 - a planner fault must not strand the batch: full model
                    log.exception("the latency planner failed; answering this batch with every branch")
        # From here on a caller can no longer cancel: the request will be computed and answered.
        return [p for p in batch if p.future.set_running_or_notify_cancel()], key

    def _prefix(self, batch: list[Pending], rows: int, now: float) -> int | None:
        """The latency target's prefix for a batch of requests that asked for none (None: all)."""
        plan, behind, open_rows, open_due = self.planner, [], 0, None
        for p in self._queue:  # the batches queued behind this one: (oldest deadline, rows)
            if p.key is not None:
                continue
            if open_rows and open_rows + p.rows > self.max_batch:
                behind.append((open_due, open_rows))
                open_rows, open_due = 0, None
            open_rows += p.rows
            open_due = open_due or p.enqueued + plan.slo_s
        if open_rows:
            behind.append((open_due, open_rows))
        k = plan.choose(now=now, deadline=batch[0].enqueued + plan.slo_s, rows=rows,
                        least=max(p.least for p in batch), behind=behind, slots=self.slots)
        return None if k >= plan.n else k

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            if taken[0]:
                self._run(*taken)

    def _run(self, batch: list[Pending], key: int | None) -> None:
        """One engine call for `batch`; every caller's future is resolved, whatever fails (the
        `finally`): a fault in the bookkeeping after `compute` must not leave callers hanging nor end
        this slot's thread."""
        start = time.monotonic()
        try:
            x = torch.from_numpy(np.concatenate([p.x for p in batch]))  # (R, C, H, W)
            rows = x.shape[0]
            logits, meta = self.compute(x, key)  # (R, classes)
            self._account(key, rows, len(batch), time.monotonic() - start)
            offset = 0
            for p in batch:  # each caller gets exactly its own rows, in the order it sent them
                out = BatchOutput(logits=logits[offset: offset + p.rows], meta=meta,
                                  queue_s=start - p.enqueued, batch_rows=rows, batch_requests=len(batch),
                                  num_branches=key)
                offset += p.rows
                p.future.set_result(out)
        except BaseException as exc:  # noqa: BLE001 - every caller must get an answer
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        finally:
            for p in batch:  # the last net: nothing above may leave a caller waiting
                if not p.future.done():
                    p.future.set_exception(RuntimeError("the batcher failed before answering this request"))

    def _account(self, key: int | None, rows: int, requests: int, seconds: float) -> None:
        """Planner and metrics once the engine call returned; a failure here is logged, not raised
        (the callers still get their rows)."""
        try:
            if self.planner is not None:
                self.planner.observe(key or self.planner.n, rows, seconds)
            with self._cond:
                self.calls += 1
                self.rows_computed += rows
                self.requests_computed += requests
            if self.on_batch:
                self.on_batch(rows, requests)
        except Exception:  # noqa: BLE001 - bookkeeping must not take the slot's thread down
            log.exception("recording a finished batch failed (the callers were answered)")



class LoopBridge:
    """The batcher's futures awaited on one asyncio loop, with one loop wake-up per burst of answers
    instead of one per request (asyncio.wrap_future calls call_soon_threadsafe, a write to the loop's
    self-pipe and a wake-up, for every future; a batch resolves its callers' futures back to back, so
    they share one). Cancelling the awaiting task cancels the batcher's future, as wrap_future does
    (a request not yet taken into a batch is then dropped unseen)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._done: list[tuple[asyncio.Future, Future]] = []
        self._lock = threading.Lock()

    def wrap(self, future: Future) -> asyncio.Future:
        waiter = self.loop.create_future()
        waiter.add_done_callback(lambda w: future.cancel() if w.cancelled() else None)
        future.add_done_callback(lambda f: self._resolved(waiter, f))
        return waiter

    def _resolved(self, waiter: asyncio.Future, future: Future) -> None:  # any thread
        with self._lock:
            first = not self._done
            self._done.append((waiter, future))
        if first:
            try:
                self.loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _flush(self) -> None:  # on the loop
        with self._lock:
            done, self._done = self._done, []
        for waiter, future in done:
            if waiter.done():
                continue
            if future.cancelled():
                waiter.cancel()
            elif (exc := future.exception()) is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(future.result())
