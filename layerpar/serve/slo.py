"""A latency target for the batcher: which prefix of the branches answers a batch so that its requests
meet serve.latency_slo_ms.

    planner = LatencyPlanner(slo_ms=6.0, num_branches=8, work=lambda k: k)
    k = planner.choose(now=t, deadline=oldest.enqueued + planner.slo_s, rows=40, least=1)
    planner.observe(k, rows=40, seconds=0.0031)          # after every engine call

Every prefix of a Para-Former's branches is a model (progressive training makes each one good), and a
prefix of k branches costs less than all N: under overload the server can answer cheaper instead of
late or not at all. The planner learns the engine's cost from the server's own recent calls,

    seconds(k, rows) = a + rows * (c + b * work(k))

(a: a call's fixed cost, c: the per-row cost every prefix pays (embedding, head, transfers), b: the
per-row cost of one unit of branch work; work(k): the branches the busiest worker runs for prefix k,
from the backend), fitted by least squares over the last WINDOW calls. Until a smaller prefix has
been tried the fit cannot tell c from b and assumes the optimistic c = 0; the first call of a smaller
prefix shows the truth. A batch gets the largest k whose estimate, plus the server's own measured
time around the engine call (decoding, encoding), ends before its oldest request's target; when no
prefix fits, the cheapest allowed one answers (never a refusal for lack of time); the margin is the
95th percentile of how far recent calls overran their estimate. A request's min_branches and the
operator's (`min_branches`: serve.min_branches / serve.min_prefix_accuracy) are floors that are
always honoured. The target is the server's own time (from receiving a request to answering
it); the network and the client add theirs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import numpy as np

WINDOW = 256  # engine calls the fit looks at
MIN_CALLS = 8  # before this many calls the planner keeps the full model (it knows nothing yet)
EWMA = 0.05  # weight of the newest sample in the overhead average
MISS_QUANTILE = 95  # the margin covers this percentile of how much calls overran their estimate


class LatencyPlanner:
    def __init__(self, *, slo_ms: float, num_branches: int, work: Callable[[int], float] | None = None,
                 min_branches: int = 1):
        self.slo_s = slo_ms / 1000.0
        self.n = num_branches
        self.min_branches = max(1, min(min_branches, num_branches))  # the operator floor: serve/prefixes.py
        self.work = work or (lambda k: float(k))
        self.overhead_s = 0.0  # server time outside the engine call: decode, queue hand-off, encode
        self.miss_s = 0.0  # MISS_QUANTILE-th percentile of (seconds - estimate) over recent calls
        self._calls: deque[tuple[float, float, float]] = deque(maxlen=WINDOW)  # (rows, rows*work, s)
        self._misses: deque[float] = deque(maxlen=WINDOW)
        self._coef = (0.0, 0.0, 0.0)  # a, c, b
        self._lock = threading.Lock()
        self._since_fit = 0

    # ------------------------------------------------------------------ learning

    def observe(self, k: int, rows: int, seconds: float) -> None:
        """One engine call's prefix size, rows and wall seconds."""
        with self._lock:
            if len(self._calls) >= MIN_CALLS:
                self._misses.append(seconds - self._estimate(k, rows))
            self._calls.append((float(rows), float(rows) * self.work(k), float(seconds)))
            self._since_fit += 1
            if self._since_fit >= 8 or len(self._calls) <= MIN_CALLS:
                self._fit()

    def observe_overhead(self, seconds: float) -> None:
        """Server-side seconds of one request spent outside the queue and the engine call."""
        self.overhead_s += EWMA * (max(0.0, seconds) - self.overhead_s)

    def _fit(self) -> None:
        self._since_fit = 0
        data = np.asarray(self._calls)  # (n, 3)
        rows, work, t = data[:, 0], data[:, 1], data[:, 2]
        kinds = len({round(w / r, 6) for r, w in zip(rows, work, strict=True)})  # distinct work(k)
        if kinds >= 2 and len(set(rows)) >= 2:
            features = np.stack([np.ones_like(rows), rows, work], axis=1)
        elif len(set(work)) >= 2:
            features = np.stack([np.ones_like(rows), np.zeros_like(rows), work], axis=1)
        else:  # one shape of call only: all of it per unit of work (optimistic for smaller k)
            features = np.stack([np.zeros_like(rows), np.zeros_like(rows), work], axis=1)
        coef, *_ = np.linalg.lstsq(features, t, rcond=None)
        self._coef = tuple(float(max(0.0, v)) for v in coef)
        if self._misses:
            self.miss_s = max(0.0, float(np.percentile(self._misses, MISS_QUANTILE)))

    # ------------------------------------------------------------------ deciding

    def _estimate(self, k: int, rows: float) -> float:
        a, c, b = self._coef
        return a + rows * (c + b * self.work(k))

    def estimate(self, k: int, rows: float) -> float:
        """Estimated seconds of one engine call of prefix k over `rows` rows."""
        with self._lock:
            return self._estimate(k, rows)

    def choose(self, *, now: float, deadline: float, rows: int, least: int = 0,
               behind: list[tuple[float, int]] = (), slots: int = 1) -> int:
        """The largest prefix k >= least whose call ends before `deadline` (time.monotonic seconds:
        the batch's oldest request's arrival plus the target) and after which the batches queued
        behind it (`behind`: their (deadline, rows), oldest first), run `slots` at a time at the same
        k, end before theirs too. No k fits: the cheapest allowed one."""
        least = max(self.min_branches, least)
        with self._lock:
            if len(self._calls) < MIN_CALLS:
                return self.n
            margin = self.overhead_s + self.miss_s
            for k in range(self.n, least - 1, -1):
                end = now + self._estimate(k, rows) + margin
                if end > deadline:
                    continue
                free = [end] * max(1, slots)  # every slot busy until this batch ends: conservative
                for due, n in behind:
                    i = free.index(min(free))
                    free[i] += self._estimate(k, n)
                    if free[i] > due:
                        break
                else:
                    return k
            return least
