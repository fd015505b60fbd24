"""A branch worker process is killed with SIGKILL in the middle of a steady, bounded stream of
inference requests through the Engine (the gRPC half is tests/serve/test_worker_loss.py).

- serve.degraded=wait (default): zero failed requests, every answer equal to the healthy model's;
  the time from the kill to the first answer after it is measured and printed.
- serve.degraded=allow: answers during the recovery are marked degraded, list the branches used, and
  equal the surviving branches' sum through the head; afterwards the full model answers again.

    .venv/bin/python -m pytest -q -s tests/faults/test_worker_loss.py
"""

from __future__ import annotations

import time

import pytest
import torch

from layerpar.model import ParaFormer
from layerpar.runtime import Engine
from tests.faults.helpers import fault_cfg, images

pytestmark = pytest.mark.ray

REQUESTS, INTERVAL_S, TIME_LIMIT_S = 1000, 0.02, 50.0  # a steady, bounded stream


def stream(engine, x, killer_start, *, after_recovery=5):
    """Send a request every INTERVAL_S (one at a time); start the killer after 5 healthy answers; stop
    `after_recovery` full (non-degraded) answers after the kill, or at REQUESTS / TIME_LIMIT_S.
    Returns the answers as (sent, done, logits, meta), the failures and the killer."""
    answers, failures, killer = [], [], None
    start = time.monotonic()
    while len(answers) + len(failures) < REQUESTS and time.monotonic() - start < TIME_LIMIT_S:
        time.sleep(INTERVAL_S)
        if len(answers) == 5 and killer is None:
            killer = killer_start()
        sent = time.monotonic()
        try:
            logits, meta = engine.infer_with_meta(x)
            answers.append((sent, time.monotonic(), logits, meta))
        except Exception as exc:  # noqa: BLE001 - counted: the acceptance is zero of these
            failures.append(f"{type(exc).__name__}: {exc}")
        if killer is not None and killer.killed_at is not None:
            full_after = [a for a in answers if a[0] > killer.killed_at and not a[3]["degraded"]]
            if len(full_after) >= after_recovery:
                break
    if killer is not None:
        killer.join()
        assert killer.error is None, killer.error
    return answers, failures, killer


@pytest.mark.parametrize("rank", [0, 1])
def test_sigkill_mid_stream_loses_no_request(local_ray, chaos, rank):
    cfg = fault_cfg(2)
    x = images(4, seed=1)
    reference = ParaFormer(cfg.model, seed=cfg.train.seed).eval()
    with torch.no_grad():
        healthy = reference(x)
    with Engine(cfg) as engine:
        first = engine.infer(x)
        torch.testing.assert_close(first, healthy, atol=1e-5, rtol=0)
        old_pid = engine.worker_pids()[rank]
        # 20 ms into the 6th request: the worker dies with a request in flight
        answers, failures, killer = stream(engine, x, lambda: chaos.kill_later(engine, rank, 0.02))
        recoveries = list(engine.recoveries)
        new_pid = engine.worker_pids()[rank]
    assert failures == []
    assert killer.pid == old_pid != new_pid
    for _, _, logits, meta in answers:
        assert meta.pop("timings")["total"] > 0  # the call's own phases travel with its result
        assert meta == {"degraded": False, "branches_used": [0, 1, 2, 3]}
        assert torch.equal(logits, first)  # bit for bit the healthy engine's answer
    first_after = min(done for sent, done, _, _ in answers if done > killer.killed_at)
    assert len(recoveries) == 1 and recoveries[0]["restarted"] == [rank]
    print(f"\n[wait, rank {rank}] {len(answers)} answers, 0 failed; first answer "
          f"{first_after - killer.killed_at:.2f}s after SIGKILL; recovery {recoveries[0]['seconds']:.2f}s "
          f"{recoveries[0]['phases']}")


def test_degraded_answers_equal_the_surviving_branches(local_ray, chaos):
    cfg = fault_cfg(2, degraded="allow")
    x = images(4, seed=2)
    reference = ParaFormer(cfg.model, seed=cfg.train.seed).eval()
    with Engine(cfg) as engine:
        healthy = engine.infer(x)
        answers, failures, killer = stream(engine, x, lambda: chaos.kill_later(engine, 1, 0.02))
        recoveries = list(engine.recoveries)
    assert failures == []
    degraded = [a for a in answers if a[3]["degraded"]]
    assert degraded, "no answer came while the worker was being recovered"
    with torch.no_grad():
        x0 = reference.embed(x)
        survivors = reference.head(reference.branch_sum(x0, [0, 1]))  # worker 1 owns branches 2, 3
    for _, _, logits, meta in answers:
        if meta["degraded"]:
            assert meta["branches_used"] == [0, 1]
            torch.testing.assert_close(logits, survivors, atol=1e-6, rtol=0)
        else:
            assert meta["branches_used"] == [0, 1, 2, 3]
            assert torch.equal(logits, healthy)
    full_after = min(done for sent, done, _, meta in answers if sent > killer.killed_at
                     and not meta["degraded"])
    latency_ms = sorted(1e3 * (done - sent) for sent, done, _, _ in degraded)
    print(f"\n[allow] {len(degraded)} degraded answers of {len(answers)} (median "
          f"{latency_ms[len(latency_ms) // 2]:.1f} ms); full answers again "
          f"{full_after - killer.killed_at:.2f}s after SIGKILL; recovery {recoveries[0]['seconds']:.2f}s")


def test_object_store_transport_recovers_too(local_ray, chaos):
    cfg = fault_cfg(2, "parallel.transport=object_store")
    x = images(3, seed=3)
    with Engine(cfg) as engine:
        healthy = engine.infer(x, num_branches=3)
        chaos.kill_worker(engine, 1)
        torch.testing.assert_close(engine.infer(x, num_branches=3), healthy, atol=0, rtol=0)
        assert engine.recoveries[-1]["restarted"] == [1]
