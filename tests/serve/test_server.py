"""The gRPC server on 127.0.0.1 in front of the real Engine (2 Ray branch workers on local Ray).

    .venv/bin/python -m pytest -q tests/serve/test_server.py -x
"""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from layerpar.model import ParaFormer
from layerpar.serve.client import Client
from layerpar.serve.server import ServerThread
from tests.serve.helpers import HANG_S, Gated, images, tiny_cfg, wait_until

pytestmark = pytest.mark.ray


def metric(srv: ServerThread, name: str, **labels) -> float:
    return srv.server.metrics.registry.get_sample_value(name, labels) or 0.0


def codes_of(fn) -> grpc.StatusCode | None:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return None


def test_predictions_equal_engine_infer(engine):
    x = images(5, seed=1)
    with ServerThread(tiny_cfg(), engine) as srv, Client(srv.address) as client:
        client.wait_ready(HANG_S)
        p = client.predict(x, top_k=2)
        want = engine.infer(x)
        np.testing.assert_allclose(p.scores, want.numpy(), atol=1e-6, rtol=0)
        assert p.predicted.tolist() == want.argmax(-1).tolist()
        assert p.num_branches == 4 and p.branches_used == [0, 1, 2, 3] and not p.degraded
        assert len(p.top_k) == 5 and p.top_k[0][0][0] == p.predicted[0] and len(p.top_k[0][0]) == 2
        probs = client.predict(x, probabilities=True).scores
        np.testing.assert_allclose(probs, torch.softmax(want, -1).numpy(), atol=1e-6)
        info = client.model_info()
        assert info["workers"] == 2 and info["num_branches"] == 4 and info["input_shape"] == (1, 8, 8)
        assert info["transport"] == "collective" and info["config"]["serve"]["token"] is None
        # the engine reports its phases; the server passes them through
        assert {"queue", "broadcast", "compute", "reduce", "total"} <= set(p.timings_ms)


def test_num_branches_k_is_the_prefix_model(engine):
    x = images(3, seed=2)
    single = ParaFormer(engine.cfg.model, seed=engine.cfg.train.seed).eval()  # the same seeded weights
    with ServerThread(tiny_cfg(), engine) as srv, Client(srv.address) as client:
        for k in range(1, 5):
            p = client.predict(x, num_branches=k)
            assert p.num_branches == k and p.branches_used == list(range(k))
            np.testing.assert_allclose(p.scores, engine.infer(x, k).numpy(), atol=1e-6, rtol=0)
            with torch.no_grad():
                np.testing.assert_allclose(p.scores, single(x, k).numpy(), atol=1e-5, rtol=0)


def test_concurrent_clients_get_their_own_rows_in_merged_batches(engine):
    # One request holds the engine at a gate while twelve clients queue theirs; only once all twelve
    # provably wait does the gate open, so the batcher must merge them: one engine call per prefix
    # key (two keys), each caller getting exactly its own rows. No arrival window is timed.
    n = 12
    xs = [images(1 + i % 3, seed=100 + i) for i in range(n)]
    ks = [None if i % 4 else 2 for i in range(n)]  # two prefix keys: merged only with their own kind
    rows_of = {k: sum(x.shape[0] for x, kk in zip(xs, ks, strict=True) if kk == k) for k in set(ks)}
    gated = Gated(engine)
    with ServerThread(tiny_cfg(), gated) as srv, ThreadPoolExecutor(n + 1) as pool:
        clients = [Client(srv.address, timeout_s=2 * HANG_S) for _ in range(n + 1)]
        gated.gate.clear()
        gated.entered.clear()
        blocker = pool.submit(clients[n].predict, images(1, seed=99))
        assert gated.entered.wait(HANG_S)  # the blocker is in the engine, held at the gate
        futures = [pool.submit(clients[i].predict, xs[i], num_branches=ks[i]) for i in range(n)]
        wait_until(lambda: srv.server.batcher.depth() == n, "all twelve requests queued")
        gated.gate.set()
        assert blocker.result(HANG_S).batch_rows == 1
        preds = [f.result(HANG_S) for f in futures]
        for c in clients:
            c.close()
    for x, k, p in zip(xs, ks, preds, strict=True):
        assert p.scores.shape == (x.shape[0], 4)
        np.testing.assert_allclose(p.scores, engine.infer(x, k).numpy(), atol=1e-5, rtol=0)
        assert p.batch_rows == rows_of[k]  # merged with every queued request of its key, no other
    assert gated.calls == 3  # the blocker, then one merged call per key
    assert metric(srv, "layerpar_batch_requests_sum") == n + 1
    assert metric(srv, "layerpar_batch_requests_count") == 3
    assert metric(srv, "layerpar_requests_total", method="Predict", status="OK") == n + 1


def test_overload_is_refused_at_once_and_accepted_requests_are_answered(engine):
    gated = Gated(engine)
    with ServerThread(tiny_cfg(max_queue=3), gated) as srv, ThreadPoolExecutor(4) as pool:
        gated.gate.clear()
        gated.entered.clear()
        xs = [images(i + 1, seed=200 + i) for i in range(4)]
        clients = [Client(srv.address) for _ in range(5)]
        futures = [pool.submit(clients[0].predict, xs[0])]
        assert gated.entered.wait(HANG_S)  # request 0 is in the engine, held at the gate
        futures += [pool.submit(clients[i].predict, xs[i]) for i in (1, 2, 3)]
        wait_until(lambda: srv.server.batcher.depth() == 3, "the queue filled")
        # "At once" without a stopwatch: the refusal comes back while the gate is still shut, so the
        # server cannot have waited for a place in the queue (none frees until the gate opens; a
        # server that queued the call would answer only after it, or DEADLINE_EXCEEDED).
        code = codes_of(lambda: clients[4].predict(images(1, seed=9), timeout_s=2 * HANG_S))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not gated.gate.is_set() and gated.calls == 0 and srv.server.batcher.depth() == 3
        assert not any(f.done() for f in futures)
        gated.gate.set()
        answers = [f.result(HANG_S).scores for f in futures]
        # (only now: the Engine takes one caller at a time, and the server is its caller until here)
        for x, scores in zip(xs, answers, strict=True):  # nothing accepted was lost
            np.testing.assert_allclose(scores, engine.infer(x).numpy(), atol=1e-5, rtol=0)
        assert metric(srv, "layerpar_requests_total", method="Predict", status="RESOURCE_EXHAUSTED") == 1
        for c in clients:
            c.close()


def test_a_request_whose_deadline_passes_in_the_queue_is_never_computed(engine):
    gated = Gated(engine)
    with ServerThread(tiny_cfg(), gated) as srv, Client(srv.address) as client:
        gated.gate.clear()
        gated.entered.clear()
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(client.predict, images(1, seed=1))
            assert gated.entered.wait(HANG_S)
            # the gate stays shut until the late request's 0.3 s deadline has passed: it expires in
            # the queue however slow the machine is
            late = pool.submit(client.predict, images(5, seed=2), timeout_s=0.3)  # 5 rows: recognisable
            after = pool.submit(client.predict, images(2, seed=3))
            assert codes_of(lambda: late.result(HANG_S)) == grpc.StatusCode.DEADLINE_EXCEEDED
            gated.gate.set()
            first.result(HANG_S), after.result(HANG_S)
        assert gated.rows == 1 + 2  # the 5 rows of the expired request never reached the engine
        assert srv.server.batcher.rows_computed == 3


def test_health_serving_then_not_serving_on_drain_and_in_flight_requests_finish(engine):
    gated = Gated(engine)
    srv = ServerThread(tiny_cfg(), gated).start()
    try:
        client = Client(srv.address)
        client.wait_ready(HANG_S)
        assert client.health() == "SERVING" and client.health("layerpar.v1.Inference") == "SERVING"
        assert metric(srv, "layerpar_workers_alive") == 2 and metric(srv, "layerpar_serving") == 1
        gated.gate.clear()
        gated.entered.clear()
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.predict, images(2, seed=4))
            assert gated.entered.wait(HANG_S)
            srv.begin_drain()
            assert client.health() == "NOT_SERVING"
            assert codes_of(lambda: client.predict(images(1, seed=5))) == grpc.StatusCode.UNAVAILABLE
            gated.gate.set()
            assert in_flight.result(HANG_S).scores.shape == (2, 4)  # finished, not cut off
        client.close()
    finally:
        gated.gate.set()
        assert srv.stop(grace_s=HANG_S)


def test_token_is_required_on_every_call(engine):
    with ServerThread(tiny_cfg(health_auth="token"), engine, token="s3cret") as srv:
        for token in (None, "wrong"):
            with Client(srv.address, token=token) as client:
                assert codes_of(lambda c=client: c.predict(images(1, 0))) == grpc.StatusCode.UNAUTHENTICATED
                assert codes_of(client.health) == grpc.StatusCode.UNAUTHENTICATED
                assert codes_of(client.model_info) == grpc.StatusCode.UNAUTHENTICATED
        with Client(srv.address, token="s3cret") as client:
            assert client.health() == "SERVING"
            assert client.predict(images(1, 0)).scores.shape == (1, 4)
            assert client.model_info()["config"]["serve"]["token"] == "<set>"  # never echoed


def test_metrics_endpoint_has_phases_batches_queue_and_workers(engine):
    with ServerThread(tiny_cfg(), engine) as srv, Client(srv.address) as client:
        client.predict(images(3, 0))
        text = urllib.request.urlopen(srv.metrics_url, timeout=HANG_S).read().decode()
    assert srv.metrics_url.startswith("http://127.0.0.1:")
    for needle in ('layerpar_requests_total{method="Predict",status="OK"} 1.0',
                   "layerpar_batch_rows_count 1.0",
                   "layerpar_queue_depth 0.0", "layerpar_workers 2.0", "layerpar_workers_alive 2.0",
                   *(f'layerpar_phase_seconds_count{{phase="{p}"}}' for p in
                     ("queue", "broadcast", "compute", "reduce", "total"))):
        assert needle in text, needle
