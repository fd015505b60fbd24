"""A worker that stops answering (test-only BranchWorker.debug_stall: its default thread sleeps for
600 s, as a hung call or a collective that never completes would, while its side thread still answers
heartbeats) never hangs the driver: after parallel.call_timeout_s the engine gives up on it, restarts
it and answers. A stopped process (SIGSTOP) is tests/faults/test_stall.py. The engine does not
train; a rank that hangs in a training step is tests/distributed/test_mesh_timeout.py (the collective
gives up after parallel.timeout_s) and Ray Train's restart tests/raytrain/test_raytrain_restart.py.

No wall-clock window here is tight: the upper bounds are the longest the engine's own bounded steps
may take (derived from the configured timeouts, >= 30 s) and only catch a hang of the 600 s stall.

    .venv/bin/python -m pytest -q -s tests/faults/test_hang.py
"""

from __future__ import annotations

import time

import pytest
import ray
import torch

from layerpar.runtime import Engine
from layerpar.runtime.recovery import LEAVE_S
from tests.faults.helpers import TIMEOUT_S, fault_cfg, images

pytestmark = pytest.mark.ray

STALL_S = 600.0


def hang_bound(engine) -> float:
    """The longest a call may take with a hung worker: its own timeout, then a recovery whose every
    step is bounded (classify by the heartbeat, drain and leave by the timeouts, restart and rejoin by
    startup_timeout_s), as FaultHandling._await_recovery allows. ~90 s here, far below STALL_S."""
    g = engine.group
    bound = g.call_timeout_s + g.heartbeat_s + g.startup_timeout_s + 2 * g.timeout_s + LEAVE_S
    assert 30 <= bound < STALL_S / 2
    return bound


def test_hung_worker_is_restarted_and_the_call_answers(local_ray):
    x = images(4, seed=4)
    with Engine(fault_cfg(2)) as engine:
        healthy = engine.infer(x)
        ray.get(engine.group.workers[1].debug_stall.remote(STALL_S))  # rank 1 hangs from its next call
        t0 = time.monotonic()
        out = engine.infer(x)
        elapsed = time.monotonic() - t0
        rec = engine.recoveries[-1]
        bound = hang_bound(engine)
        assert torch.equal(engine.infer(x), healthy)
    assert torch.equal(out, healthy)
    assert len(engine.recoveries) == 1 and "call_timeout_s" in rec["reason"]  # the call gave up
    assert 1 in rec["restarted"] and rec["dead"] == []  # alive (its side thread answers) but stuck
    assert TIMEOUT_S <= elapsed < bound  # it waited out the call timeout, and no hang after it
    print(f"\n[hang, infer] answered {elapsed:.2f}s after the call (parallel.call_timeout_s={TIMEOUT_S:g}); "
          f"recovery {rec['seconds']:.2f}s {rec['phases']}")
