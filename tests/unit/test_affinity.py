"""Core pinning of concurrent jobs on one node: two processes that are both local rank 0 of their own
job (two Tune trials, two runs) get different cores, not the same one; a finished process's cores are
free again. Real processes, each pinning itself; no timing."""

import multiprocessing as mp
import os

import pytest

from layerpar.parallel.affinity import pin_rank

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs sched_setaffinity and at least 2 allowed cores")


def _job_rank(results, release) -> None:
    """Local rank 0 of a one-rank job: pin, say where it runs, stay alive until released."""
    cores = pin_rank(local_rank=0, local_world=1, threads=1)
    results.put((os.getpid(), cores, sorted(os.sched_getaffinity(0))))
    release.wait(120)


def _run_jobs(ctx, count: int, release):
    results = ctx.Queue()
    procs = [ctx.Process(target=_job_rank, args=(results, release)) for _ in range(count)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    return procs, got


def test_concurrent_jobs_get_different_cores(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the children's claim registry: this test's own
    ctx = mp.get_context("spawn")
    release = ctx.Event()
    procs, got = _run_jobs(ctx, 2, release)
    try:
        (_, a, a_allowed), (_, b, b_allowed) = got
        assert len(a) == 1 and len(b) == 1 and a != b, got  # before: both pinned to the first core
        assert a_allowed == a and b_allowed == b
    finally:
        release.set()
        for p in procs:
            p.join(60)
    # both have ended: their claims are stale, the next job's rank 0 gets its preferred core again
    release2 = ctx.Event()
    procs, [(_, c, _)] = _run_jobs(ctx, 1, release2)
    release2.set()
    procs[0].join(60)
    assert c == [sorted(os.sched_getaffinity(0))[0]]
