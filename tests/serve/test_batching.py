"""The dynamic batcher alone (no gRPC, no Ray), computing with a real single-process Para-Former.

    .venv/bin/python -m pytest -q tests/serve/test_batching.py
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from layerpar.model import ParaFormer
from layerpar.serve.batching import Batcher, DeadlineExpired, Draining, QueueFull
from tests.serve.helpers import HANG_S, images, tiny_cfg

pytestmark = pytest.mark.unit


class Model:
    """compute() for the batcher: the real model, with a gate and a record of each call's rows."""

    def __init__(self):
        cfg = tiny_cfg()
        self.model = ParaFormer(cfg.model, seed=0).eval()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[tuple[int, int | None]] = []

    @torch.no_grad()
    def __call__(self, x, k):
        self.entered.set()
        assert self.gate.wait(2 * HANG_S), "test forgot to open the gate"
        self.batches.append((x.shape[0], k))
        return self.model(x, k).numpy(), {"timings": {}}

    @torch.no_grad()
    def want(self, x, k=None):
        return self.model(torch.as_tensor(x), k).numpy()


def test_requests_that_arrive_together_merge_and_each_gets_its_rows():
    # A first request holds the engine at the gate while four more queue; they are all waiting when
    # the gate opens, so they merge into one call whatever the machine's speed (no arrival window).
    m = Model()
    m.gate.clear()
    b = Batcher(m, max_batch=64, max_wait_ms=5, max_queue=16)
    first = b.submit(images(1, seed=0).numpy())
    assert m.entered.wait(HANG_S)
    xs = [images(r, seed=r).numpy() for r in (1, 3, 2, 4)]
    futures = [b.submit(x) for x in xs]
    assert b.depth() == 4
    m.gate.set()
    assert first.result(HANG_S).batch_requests == 1
    outs = [f.result(HANG_S) for f in futures]
    assert m.batches == [(1, None), (10, None)]  # one engine call for all four
    for x, out in zip(xs, outs, strict=True):
        assert out.batch_rows == 10 and out.batch_requests == 4
        np.testing.assert_allclose(out.logits, m.want(x), atol=1e-5)
    b.close(HANG_S)


def test_only_equal_num_branches_merge_and_max_batch_splits():
    m = Model()
    m.gate.clear()
    b = Batcher(m, max_batch=4, max_wait_ms=50, max_queue=16)
    first = b.submit(images(1, 0).numpy(), 2)
    assert m.entered.wait(HANG_S)  # held in the engine while the rest queue up
    rest = [(x := images(2, i).numpy(), k, b.submit(x, k)) for i, k in enumerate([None, 2, None, None, 2])]
    m.gate.set()
    first.result(HANG_S)
    for x, k, f in rest:
        np.testing.assert_allclose(f.result(HANG_S).logits, m.want(x, k), atol=1e-5)
    # FIFO by oldest request; only equal keys merge; at most 4 rows per call
    assert m.batches == [(1, 2), (4, None), (4, 2), (2, None)]
    b.close(HANG_S)


def test_queue_bound_deadlines_and_drain():
    m = Model()
    m.gate.clear()
    b = Batcher(m, max_batch=8, max_wait_ms=0, max_queue=2)
    running = b.submit(images(1, 0).numpy())
    assert m.entered.wait(HANG_S)  # the engine is held: nothing leaves the queue until the gate opens
    kept = b.submit(images(2, 2).numpy())
    deadline = time.monotonic() + 0.05
    expiring = b.submit(images(3, 1).numpy(), deadline=deadline)
    while time.monotonic() <= deadline:  # let the deadline pass (a wait, not a measurement)
        time.sleep(0.01)
    late = b.submit(images(1, 4).numpy())  # the queue is full, but `expiring` is dead: late takes its place
    with pytest.raises(QueueFull):  # full of live requests now: refused at once
        b.submit(images(1, 3).numpy())
    m.gate.set()
    with pytest.raises(DeadlineExpired):
        expiring.result(HANG_S)
    for f in (running, kept, late):
        f.result(HANG_S)
    assert b.rows_computed == 1 + 2 + 1 and b.expired == 1  # the 3 expired rows never ran
    m.gate.clear()
    m.entered.clear()
    blocker = b.submit(images(1, 5).numpy())
    assert m.entered.wait(HANG_S)
    cancelled = b.submit(images(5, 6).numpy())
    assert cancelled.cancel()  # a caller that left before its batch started
    queued = b.submit(images(2, 7).numpy())
    m.gate.set()
    assert b.close(HANG_S)  # finishes what was queued, then stops
    assert blocker.done() and queued.result(0).logits.shape == (2, 4)
    assert b.rows_computed == 4 + 1 + 2
    with pytest.raises(Draining):
        b.submit(images(1, 8).numpy())


def test_an_engine_error_reaches_every_caller_of_the_batch():
    def broken(x, k):
        raise RuntimeError("worker 1 is gone")

    b = Batcher(broken, max_batch=8, max_wait_ms=50, max_queue=8)
    futures = [b.submit(images(1, i).numpy()) for i in range(3)]
    for f in futures:  # whether or not they merged: each batch's callers get the error
        with pytest.raises(RuntimeError, match="worker 1 is gone"):
            f.result(HANG_S)
    ok = Model()
    b.compute = ok
    np.testing.assert_allclose(b.submit(images(1, 9).numpy()).result(HANG_S).logits,
                               ok.want(images(1, 9)), atol=1e-5)  # the thread survived
    b.close(HANG_S)
