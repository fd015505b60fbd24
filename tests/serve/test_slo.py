"""Dispatch on idle and the latency target (issue 17).

The planner is checked on given measurements (its choices are arithmetic). The server under a
target is checked on a real server whose backend costs more per branch (a real LocalBackend behind
a gate that holds each call COST_S per branch: a cost the planner must learn from its own calls):
flooded by more clients than it can answer in time, it answers every request, from a prefix where the
full model would be late (the reply says which, and its scores are that prefix model's), and a
request with min_branches = N always gets the full model. No assertion here times the machine.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from layerpar.config import ServeConfig
from layerpar.serve.batching import Batcher
from layerpar.serve.client import Client
from layerpar.serve.server import ServerThread
from layerpar.serve.slo import MIN_CALLS, LatencyPlanner
from layerpar.train.local import LocalBackend
from tests.serve.helpers import HANG_S, images, tiny_cfg

COST_S = 0.004  # per branch per call: the full tiny model (4 branches) takes >= 16 ms a call


def trained_planner(slo_ms: float, per_call: float, per_row_branch: float) -> LatencyPlanner:
    planner = LatencyPlanner(slo_ms=slo_ms, num_branches=8)
    for i in range(4 * MIN_CALLS):
        k, rows = 8 - i % 4, 4 + 8 * (i % 3)
        planner.observe(k, rows, per_call + rows * k * per_row_branch)
    return planner


def test_planner_picks_the_largest_prefix_that_meets_the_target():
    p = trained_planner(slo_ms=10.0, per_call=0.001, per_row_branch=0.0001)  # 8 branches x 10 rows: 9 ms
    assert p.estimate(8, 10) == pytest.approx(0.009, rel=1e-6)
    assert p.choose(now=0.0, deadline=0.010, rows=10) == 8
    assert p.choose(now=0.004, deadline=0.0105, rows=10) == 5  # 6.5 ms left: 1 + 5 x 1 ms fits
    assert p.choose(now=0.004, deadline=0.0105, rows=10, least=7) == 7  # the floor wins over the target
    assert p.choose(now=0.0099, deadline=0.010, rows=10) == 1  # nothing fits: the cheapest answers
    # the batches queued behind must fit after this one too (one slot: one after the other)
    assert p.choose(now=0.0, deadline=0.010, rows=10, behind=[(0.0125, 10)]) == 5
    assert p.choose(now=0.0, deadline=0.010, rows=10, behind=[(0.0125, 10), (0.0185, 10)]) == 5
    assert p.choose(now=0.0, deadline=0.010, rows=10, behind=[(0.0125, 10), (0.0175, 10)]) == 4
    # two slots: the two batches behind run side by side after this one
    assert p.choose(now=0.0, deadline=0.010, rows=10, behind=[(0.0185, 10), (0.0185, 10)], slots=2) == 8


def test_planner_keeps_the_full_model_until_it_has_measured_calls():
    p = LatencyPlanner(slo_ms=1.0, num_branches=8)
    for _ in range(MIN_CALLS - 1):
        p.observe(8, 4, 0.5)
        assert p.choose(now=0.0, deadline=0.001, rows=4) == 8


def test_dispatch_on_idle_is_the_default_and_batches_form_while_busy():
    assert ServeConfig().max_wait_ms == 0
    gate, entered, sizes = threading.Event(), threading.Event(), []

    def compute(x, key):
        entered.set()
        assert gate.wait(HANG_S)
        sizes.append(x.shape[0])
        return np.zeros((x.shape[0], 2), np.float32), {}

    b = Batcher(compute, max_batch=8, max_wait_ms=0, max_queue=16)
    first = b.submit(np.zeros((1, 1, 2, 2), np.float32))
    assert entered.wait(HANG_S)  # taken at once by the idle slot, although alone
    rest = [b.submit(np.zeros((1, 1, 2, 2), np.float32)) for _ in range(3)]
    gate.set()
    for f in [first, *rest]:
        f.result(HANG_S)
    assert sizes == [1, 3], sizes  # the three that arrived while it was busy went together
    assert b.close(HANG_S)


def test_two_slots_run_two_batches_at_once():
    both = threading.Event()
    count = [0]
    lock = threading.Lock()

    def compute(x, key):
        with lock:
            count[0] += 1
            if count[0] == 2:
                both.set()
        assert both.wait(HANG_S), "the second slot never started a batch beside the first"
        return np.zeros((x.shape[0], 2), np.float32), {}

    b = Batcher(compute, max_batch=1, max_wait_ms=0, max_queue=16, slots=2)
    futures = [b.submit(np.zeros((1, 1, 2, 2), np.float32)) for _ in range(2)]
    for f in futures:
        f.result(HANG_S)
    assert b.close(HANG_S)


class CostlyBackend:
    """A real LocalBackend whose every call also takes COST_S per branch it computes."""

    def __init__(self, backend):
        self.backend = backend

    def infer_with_meta(self, x, num_branches=None):
        time.sleep(COST_S * (num_branches or 4))
        return self.backend.infer_with_meta(x, num_branches)

    def prefix_work(self, k):
        return k or 4

    def info(self):
        return self.backend.info()

    def shutdown(self):
        pass


def test_latency_target_answers_every_request_from_a_prefix_that_fits():
    local = LocalBackend(tiny_cfg())
    cfg = tiny_cfg(latency_slo_ms=30.0, max_batch=4)
    x = images(1, seed=11)
    want = {k: local.infer(x, k).numpy() for k in range(1, 5)}
    with ServerThread(cfg, CostlyBackend(local)) as srv, Client(srv.address) as first:
        first.wait_ready(HANG_S)

        def send(i: int):  # one channel for every thread (gRPC channels are thread-safe)
            return i, first.predict(x.numpy(), min_branches=4 if i % 10 == 0 else None, timeout_s=HANG_S)

        with ThreadPoolExecutor(16) as pool:  # 16 clients, 4 rows a call: >= 4 calls deep
            replies = list(pool.map(send, range(400)))
    used = [p.num_branches for _, p in replies]
    assert len(replies) == 400  # every request answered (a refusal would have raised)
    assert min(used) < 4, "the full model misses the target under this load: a prefix should answer"
    for i, p in replies:
        assert p.branches_used == list(range(p.num_branches)) and not p.degraded
        np.testing.assert_allclose(p.scores, want[p.num_branches], atol=1e-5, rtol=0)
        if i % 10 == 0:
            assert p.num_branches == 4, "min_branches = N must get the full model"
    print(f"\nbranches used: mean {np.mean(used):.2f}, {sum(u < 4 for u in used)} of 400 from a prefix")


def test_bad_settings_and_requests_get_one_clear_error():
    from layerpar.config import ConfigError, load_config
    from layerpar.serve.client import make_request
    from layerpar.serve.codec import BadRequest, InputSpec, decode_request

    with pytest.raises(ConfigError, match="parallel.replicas .* needs parallel.workers >= 1"):
        load_config("tiny", ["parallel.replicas=2", "parallel.workers=0"])
    with pytest.raises(ConfigError, match="serve.latency_slo_ms"):
        load_config("tiny", ["serve.latency_slo_ms=-1"])
    # (training with replicas is the mesh: tests/raytrain, tests/distributed/test_mesh.py)
    with pytest.raises(ConfigError, match=r"parallel.replicas \(32\) must be <= train.batch_size"):
        load_config("tiny", ["parallel.replicas=32", "parallel.workers=1", "train.batch_size=16"])
    spec = InputSpec.from_config(tiny_cfg())
    x = images(1, seed=0).numpy()
    assert decode_request(make_request(x, min_branches=4), spec).min_branches == 4
    for kwargs, message in (({"min_branches": 5}, r"min_branches \(5\) must be in 1..4"),
                            ({"min_branches": 0}, r"min_branches \(0\) must be in 1..4"),
                            ({"num_branches": 2, "min_branches": 3}, "below min_branches")):
        with pytest.raises(BadRequest, match=message):
            decode_request(make_request(x, **kwargs), spec)
