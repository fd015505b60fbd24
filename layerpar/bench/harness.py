"""Timing: warm-up, repetitions, percentiles and spread.

Every latency in a report comes from `measure` (or from `summarize` over samples a system timed
itself, e.g. inside a pipeline's processes), so every point is treated the same way: `warmup` calls
thrown away, then at least `min_reps` timed calls and at most `reps`, stopping early once
`max_seconds` of timed calls have passed (a slow point gets fewer repetitions, never none).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class Timing:
    """Summary of one point's latencies, in milliseconds."""

    reps: int
    warmup: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float
    phases_ms: dict[str, float] = field(default_factory=dict)  # median per phase, if recorded

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median: 0.1 means the middle half of the
        repetitions lies within 10% of the median's size."""
        return self.iqr_ms / self.p50_ms if self.p50_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "spread": self.spread}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_s: list[float], *, warmup: int,
              phases: list[dict[str, float]] | None = None) -> Timing:
    """Timing of latency samples given in seconds (warm-up already dropped)."""
    ms = [s * 1e3 for s in samples_s]
    per_phase: dict[str, float] = {}
    for name in sorted({k for p in phases or [] for k in p}):
        per_phase[name] = statistics.median(p.get(name, 0.0) for p in phases) * 1e3
    return Timing(reps=len(ms), warmup=warmup, p50_ms=percentile(ms, 50), p95_ms=percentile(ms, 95),
                  mean_ms=statistics.fmean(ms), min_ms=min(ms), max_ms=max(ms),
                  iqr_ms=percentile(ms, 75) - percentile(ms, 25), phases_ms=per_phase)


def measure(fn: Callable[[], object], *, warmup: int = 2, reps: int = 20, min_reps: int = 5,
            max_seconds: float = 10.0, cuda: bool = False,
            phases: Callable[[], dict[str, float]] | None = None) -> tuple[Timing, object]:
    """Time `fn()`; returns its Timing and the last result. `cuda`: time with CUDA events around
    each call (and synchronise), so queued kernels are counted. `phases`: read after each timed
    call (e.g. the engine's last_timings, in seconds); their medians land in Timing.phases_ms.
    Warm-up: `warmup` calls, but after the first only while they took under max_seconds / 4."""
    return measure_interleaved({"": fn}, warmup=warmup, reps=reps, min_reps=min_reps,
                               max_seconds=max_seconds, cuda=cuda,
                               phases={"": phases} if phases else None)[""]


def _timed_call(fn: Callable[[], object], cuda: bool) -> tuple[object, float, float]:
    """fn's result, its latency and the wall time it took, in seconds (the two differ with CUDA
    events: the latency is the GPU's, the wall time includes waiting for it)."""
    t0 = time.perf_counter()
    if not cuda:
        out = fn()
        dt = time.perf_counter() - t0
        return out, dt, dt
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()  # blocks until every kernel of this call has run
    return out, start.elapsed_time(end) / 1e3, time.perf_counter() - t0


def measure_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, reps: int = 20,
                        min_reps: int = 5, max_seconds: float = 10.0, cuda: bool = False,
                        phases: dict[str, Callable[[], dict[str, float]]] | None = None
                        ) -> dict[str, tuple[Timing, object]]:
    """Time several systems at one point in round-robin (the first one rotating each round), so
    that a load that comes and goes on a shared machine hits all of them alike and their ratios
    stay fair. Each gets `measure`'s warm-up and repetition rules; max_seconds is per system."""
    names = list(fns)
    out: dict[str, object] = {}
    done: dict[str, int] = {}
    for name in names:
        began, done[name] = time.perf_counter(), 0
        while done[name] < warmup and (done[name] < 1 or
                                       time.perf_counter() - began < max_seconds / 4):
            out[name] = fns[name]()
            done[name] += 1
    if cuda:
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {n: [] for n in names}
    recorded: dict[str, list[dict]] = {n: [] for n in names}
    spent = 0.0
    rnd = 0
    while True:
        active = [n for n in names if len(samples[n]) < reps and
                  (len(samples[n]) < min_reps or spent < max_seconds * len(names))]
        if not active:
            break
        k = rnd % len(active)
        for name in active[k:] + active[:k]:
            out[name], latency, wall = _timed_call(fns[name], cuda)
            spent += wall
            samples[name].append(latency)
            if phases and name in phases:
                recorded[name].append(dict(phases[name]()))
        rnd += 1
    return {n: (summarize(samples[n], warmup=done[n], phases=recorded[n] or None), out.get(n))
            for n in names}
