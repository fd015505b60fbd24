"""Is a worker the driver waits on still there? A ping in the worker's `side` thread answers that.

A worker whose default thread is busy or blocked in a collective still answers on its side thread
(runtime/worker.py); a process that is stopped (SIGSTOP, a frozen host) or gone answers nothing at
all. So while a call waits, each worker it still waits on is pinged every `silence_s / 3`, and one
that leaves a ping unanswered for `silence_s` (parallel.heartbeat_s) is lost: the call ends within
seconds instead of at its timeout.

    beat = Heartbeat(workers, silence_s=3.0)
    while waiting:
        ...wait at most beat.interval_s for replies...
        beat.check(ranks_not_answered)   # raises WorkerSilent for a dead or stopped worker

Pings start only after a call has waited `interval_s`, so a fast call sends none.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import ray


class WorkerSilent(RuntimeError):
    """A worker died, or its process left a heartbeat unanswered for parallel.heartbeat_s."""


class Heartbeat:
    def __init__(self, workers: Sequence, silence_s: float):
        self.workers, self.silence_s = list(workers), silence_s
        self.interval_s = silence_s / 3
        self._alive_at: dict[int, float] = {}  # rank -> last time it was known alive
        self._pings: dict[int, tuple[ray.ObjectRef, float]] = {}  # rank -> (ping, sent at)
        self._start = time.monotonic()

    def check(self, ranks: Iterable[int]) -> None:
        """Send, collect and judge the pings of `ranks`; raise WorkerSilent naming a lost one."""
        now = time.monotonic()
        for rank in ranks:
            ping = self._pings.get(rank)
            if ping is None:
                if now - self._alive_at.get(rank, self._start) >= self.interval_s:
                    self._pings[rank] = (self.workers[rank].ping.remote(), now)
                continue
            ref, sent = ping
            if ray.wait([ref], timeout=0)[0]:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise WorkerSilent(f"branch worker {rank} died: {str(exc).splitlines()[0]}") from None
                del self._pings[rank]
                self._alive_at[rank] = now
            elif now - sent >= self.silence_s:
                raise WorkerSilent(
                    f"branch worker {rank} left a heartbeat unanswered for {now - sent:.1f}s (its "
                    f"process is stopped or hung; parallel.heartbeat_s={self.silence_s:g})")
