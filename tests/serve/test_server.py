"""The gRPC server on 127.0.0.1 in front of the real Engine (2 Ray branch workers on local Ray).

    .venv/bin/python -m pytest -q tests/serve/test_server.py -x
"""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from layerpar.model import ParaFormer
from layerpar.serve.client import Client
from layerpar.serve.server import ServerThread
from tests.serve.helpers import Gated, images, tiny_cfg

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
        client.wait_ready(10)
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
    n = 12
    xs = [images(1 + i % 3, seed=100 + i) for i in range(n)]
    ks = [None if i % 4 else 2 for i in range(n)]  # two prefix keys: merged only with their own kind
    barrier = threading.Barrier(n)
    with ServerThread(tiny_cfg(max_wait_ms=150), engine) as srv:
        def call(i):
            with Client(srv.address) as client:
                barrier.wait()
                return client.predict(xs[i], num_branches=ks[i])

        with ThreadPoolExecutor(n) as pool:
            preds = list(pool.map(call, range(n)))
        for x, k, p in zip(xs, ks, preds, strict=True):
            assert p.scores.shape == (x.shape[0], 4)
            np.testing.assert_allclose(p.scores, engine.infer(x, k).numpy(), atol=1e-5, rtol=0)
        merged = metric(srv, "layerpar_batch_requests_sum") / metric(srv, "layerpar_batch_requests_count")
        assert merged > 1, "the batcher never merged two requests"
        assert max(p.batch_rows for p in preds) > 3
        assert metric(srv, "layerpar_requests_total", method="Predict", status="OK") == n


def test_overload_is_refused_at_once_and_accepted_requests_are_answered(engine):
    gated = Gated(engine)
    with ServerThread(tiny_cfg(max_queue=3), gated) as srv, ThreadPoolExecutor(4) as pool:
        gated.gate.clear()
        gated.entered.clear()
        xs = [images(i + 1, seed=200 + i) for i in range(4)]
        clients = [Client(srv.address) for _ in range(5)]
        futures = [pool.submit(clients[0].predict, xs[0])]
        assert gated.entered.wait(10)  # request 0 is in the engine, held at the gate
        futures += [pool.submit(clients[i].predict, xs[i]) for i in (1, 2, 3)]
        deadline = time.monotonic() + 10
        while srv.server.batcher.depth() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.server.batcher.depth() == 3  # the queue is full
        t0 = time.monotonic()
        code = codes_of(lambda: clients[4].predict(images(1, seed=9)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 1.0
        gated.gate.set()
        answers = [f.result(30).scores for f in futures]
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
            assert gated.entered.wait(10)
            late = pool.submit(client.predict, images(5, seed=2), timeout_s=0.3)  # 5 rows: recognisable
            after = pool.submit(client.predict, images(2, seed=3))
            assert codes_of(lambda: late.result(10)) == grpc.StatusCode.DEADLINE_EXCEEDED
            gated.gate.set()
            first.result(10), after.result(10)
        assert gated.rows == 1 + 2  # the 5 rows of the expired request never reached the engine
        assert srv.server.batcher.rows_computed == 3


def test_health_serving_then_not_serving_on_drain_and_in_flight_requests_finish(engine):
    gated = Gated(engine)
    srv = ServerThread(tiny_cfg(), gated).start()
    try:
        client = Client(srv.address)
        client.wait_ready(10)
        assert client.health() == "SERVING" and client.health("layerpar.v1.Inference") == "SERVING"
        assert metric(srv, "layerpar_workers_alive") == 2 and metric(srv, "layerpar_serving") == 1
        gated.gate.clear()
        gated.entered.clear()
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.predict, images(2, seed=4))
            assert gated.entered.wait(10)
            srv.begin_drain()
            assert client.health() == "NOT_SERVING"
            assert codes_of(lambda: client.predict(images(1, seed=5))) == grpc.StatusCode.UNAVAILABLE
            gated.gate.set()
            assert in_flight.result(10).scores.shape == (2, 4)  # finished, not cut off
        client.close()
    finally:
        gated.gate.set()
        assert srv.stop(grace_s=5)


def test_token_is_required_on_every_call(engine):
    with ServerThread(tiny_cfg(token="s3cret"), engine) as srv:
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
        text = urllib.request.urlopen(srv.metrics_url, timeout=5).read().decode()
    assert srv.metrics_url.startswith("http://127.0.0.1:")
    for needle in ('layerpar_requests_total{method="Predict",status="OK"} 1.0',
                   "layerpar_batch_rows_count 1.0",
                   "layerpar_queue_depth 0.0", "layerpar_workers 2.0", "layerpar_workers_alive 2.0",
                   *(f'layerpar_phase_seconds_count{{phase="{p}"}}' for p in
                     ("queue", "broadcast", "compute", "reduce", "total"))):
        assert needle in text, needle
