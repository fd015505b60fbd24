"""A worker that stops answering (test-only BranchWorker.debug_stall: its default thread sleeps, as a
hung process or a collective that never completes would) never hangs the driver: after
parallel.timeout_s the engine gives up on it, restarts it and answers (inference), or raises a clear
WorkerError (a training step, which is not retried).

    .venv/bin/python -m pytest -q -s tests/faults/test_hang.py
"""

from __future__ import annotations

import time

import pytest
import ray
import torch

from layerpar.runtime import Engine, WorkerError
from tests.faults.helpers import TIMEOUT_S, fault_cfg, images

pytestmark = pytest.mark.ray

# Restarting a worker (a new process importing torch) takes 2-8 s on the 2 shared cores here.
MARGIN_S = 25.0


def test_hung_worker_is_restarted_and_the_call_answers(local_ray):
    x = images(4, seed=4)
    with Engine(fault_cfg(2)) as engine:
        healthy = engine.infer(x)
        ray.get(engine.workers[1].debug_stall.remote(600))  # rank 1 hangs from its next call
        t0 = time.monotonic()
        out = engine.infer(x)
        elapsed = time.monotonic() - t0
        rec = engine.recoveries[-1]
        assert torch.equal(engine.infer(x), healthy)
    assert torch.equal(out, healthy)
    assert 1 in rec["restarted"] and rec["dead"] == []  # alive (its side thread answers) but stuck
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + MARGIN_S
    print(f"\n[hang, infer] answered {elapsed:.2f}s after the call (parallel.timeout_s={TIMEOUT_S:g}); "
          f"recovery {rec['seconds']:.2f}s {rec['phases']}")


def test_hung_worker_in_a_training_step_raises_then_refuses_clearly(local_ray):
    x, y = images(8, seed=5), torch.arange(8) % 4
    with Engine(fault_cfg(2), total_steps=10) as engine:
        engine.train_step(x, y)
        ray.get(engine.workers[0].debug_stall.remote(600))
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"parallel.timeout_s=5s|collective failed"):
            engine.train_step(x, y)
        elapsed = time.monotonic() - t0
        assert elapsed < TIMEOUT_S + MARGIN_S
        # The trained weights are not in any snapshot or checkpoint: a clear refusal, at once.
        t1 = time.monotonic()
        with pytest.raises(WorkerError, match="restart from the last checkpoint"):
            engine.infer(x)
        assert time.monotonic() - t1 < TIMEOUT_S
    print(f"\n[hang, train_step] WorkerError {elapsed:.2f}s after the call "
          f"(parallel.timeout_s={TIMEOUT_S:g})")
