"""One recovery's record and the steps that look at workers: classify (who answers a ping), leave
(who can leave the old process group). The policy that runs them is runtime/faults.py.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

import ray

from layerpar.runtime.errors import WorkerError
from layerpar.runtime.group import WorkerGroup

LEAVE_S = 2.0  # longest wait for a live worker to leave the old process group

__all__ = ["LEAVE_S", "Recovery", "RecoveryError", "Restore", "WorkerError", "classify", "leave_group"]


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


def leave_group(group: WorkerGroup, handles: dict[int, object], timeout_s: float) -> list[int]:
    """Ask every live worker to leave the process group; return the ranks that could not (stuck)."""
    ranks = sorted(handles)
    refs = dict(zip(ranks, group.transport.submit([handles[r] for r in ranks], "leave_group"), strict=True))
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    stuck = []
    for rank, ref in refs.items():
        try:
            ray.get(ref, timeout=0)
        except (ray.exceptions.RayError, TimeoutError):
            stuck.append(rank)
    return stuck
