"""A branch worker process is stopped with SIGSTOP (it answers nothing, not even on its side thread)
while two client threads stream inference requests through the Engine.

With call and training timeouts of 300 s, the heartbeat (parallel.heartbeat_s=3) must find the stopped
worker within seconds: every request is answered or failed within the heartbeat's bound plus a
recovery allowance (69 s), far below the 300 s call timeout (before the heartbeat, the stopped worker held
every request for the whole timeout, the fast path waiting rank by rank). The time from SIGSTOP to
the first answer again is measured and printed.

    .venv/bin/python -m pytest -q -s tests/faults/test_stall.py
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest
import torch

from layerpar.runtime import Engine
from tests.faults.helpers import fault_cfg, images

pytestmark = pytest.mark.ray

CALL_TIMEOUT_S, HEARTBEAT_S = 300.0, 3.0
# Restarting the stopped worker (and a peer stuck in a collective with it) on the 2 shared cores takes
# 3-17 s here; allow far more. Detection: up to 4/3 heartbeat in the call, one more to classify.
RECOVERY_ALLOWANCE_S = 60.0
BOUND_S = 3 * HEARTBEAT_S + RECOVERY_ALLOWANCE_S  # 69 s, far below CALL_TIMEOUT_S
assert BOUND_S < CALL_TIMEOUT_S / 2


def client(engine, x, stop: threading.Event, log: list) -> None:
    """One request after another until told to stop; each logged as (sent, done, logits or error)."""
    while not stop.is_set():
        sent = time.monotonic()
        try:
            out = engine.infer(x)
        except Exception as exc:  # noqa: BLE001 - logged: the test judges every outcome
            out = f"{type(exc).__name__}: {exc}"
        log.append((sent, time.monotonic(), out))
        time.sleep(0.01)


@pytest.mark.parametrize("rank", [1])
def test_a_stopped_worker_is_found_by_its_heartbeat_not_the_call_timeout(local_ray, rank):
    cfg = fault_cfg(2, f"parallel.timeout_s={CALL_TIMEOUT_S}", f"parallel.call_timeout_s={CALL_TIMEOUT_S}",
                    f"parallel.heartbeat_s={HEARTBEAT_S}")
    x = images(4, seed=6)
    stop, logs = threading.Event(), [[], []]
    with Engine(cfg) as engine:
        healthy = engine.infer(x)
        pid = engine.worker_pids()[rank]
        threads = [threading.Thread(target=client, args=(engine, x, stop, log), daemon=True)
                   for log in logs]
        for t in threads:
            t.start()
        stopped_at = None
        try:
            deadline = time.monotonic() + 60
            while sum(len(log) for log in logs) < 10:  # a healthy stream first
                assert time.monotonic() < deadline, "the healthy stream did not get going"
                time.sleep(0.01)
            os.kill(pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            deadline = stopped_at + 3 * BOUND_S  # ends the test if the engine never answers again
            while time.monotonic() < deadline and not all(
                    sum(1 for sent, _, out in log if sent > stopped_at and isinstance(out, torch.Tensor)) >= 5
                    for log in logs):
                time.sleep(0.05)
        finally:
            stop.set()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # the recovery killed it, or the test failed
            for t in threads:
                t.join(CALL_TIMEOUT_S + BOUND_S)
        recoveries = list(engine.recoveries)
        new_pid = engine.worker_pids()[rank]
    requests = [r for log in logs for r in log]
    slowest = max(done - sent for sent, done, _ in requests)
    failures = [out for _, _, out in requests if not isinstance(out, torch.Tensor)]
    answers = [(sent, done, out) for sent, done, out in requests if isinstance(out, torch.Tensor)]
    assert slowest <= BOUND_S, f"a request took {slowest:.1f}s (bound {BOUND_S:g}s)"
    assert failures == []  # serve.degraded=wait: retried after the recovery
    assert all(torch.equal(out, healthy) for _, _, out in answers)
    assert new_pid != pid and any(rank in r["restarted"] for r in recoveries)
    first_after = min(done for sent, done, _ in answers if sent > stopped_at)  # blocked until recovered
    print(f"\n[stall, rank {rank}] {len(requests)} requests, 0 failed; slowest {slowest:.2f}s; "
          f"first answer {first_after - stopped_at:.2f}s after SIGSTOP; recoveries "
          f"{[(r['reason'][:60], round(r['seconds'], 2), r['phases']) for r in recoveries]}")
