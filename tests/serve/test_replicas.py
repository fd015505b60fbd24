"""Replica groups (issue 17): R = 2 groups of W = 2 branch workers on local Ray behind one real gRPC
server. Answers equal the single-process model's, both groups take traffic, and a SIGKILL of one
group's worker during a stream of requests costs nothing: 0 failed requests, no request waits for the
recovery (the killed group's restart is held open by the test while every client keeps getting
answers from the other group), health stays SERVING, and the group rejoins and answers again.

    .venv/bin/python -m pytest -q -s tests/serve/test_replicas.py
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch

from layerpar.serve.client import Client
from layerpar.serve.server import ServerThread
from layerpar.train.local import LocalBackend
from tests.serve.helpers import HANG_S, images, tiny_cfg, wait_until
from tests.serve.test_serve_worker_loss import hold_restarts, kill

pytestmark = pytest.mark.ray

CLIENTS, AFTER_KILL = 4, 5  # each client must get this many answers while the killed group is down


def replica_cfg(**serve):
    return tiny_cfg(workers=2, **serve).replace(parallel={"replicas": 2})


@pytest.fixture(scope="module")
def replicas(ray_local):
    from layerpar.runtime.replicas import ReplicaSet

    rs = ReplicaSet(replica_cfg())
    yield rs
    rs.shutdown()


def reference(x: torch.Tensor, k: int | None = None) -> np.ndarray:
    return LocalBackend(tiny_cfg()).infer(x, k).numpy()


def test_answers_equal_single_process_and_both_groups_answer(replicas):
    x = images(5, seed=3)
    calls = list(replicas.calls)
    with ServerThread(replica_cfg(), replicas) as srv, Client(srv.address) as client:
        client.wait_ready(HANG_S)
        for k in (None, 1, 3):
            for _ in range(4):  # one at a time: the idle groups take turns
                p = client.predict(x.numpy(), num_branches=k)
                np.testing.assert_allclose(p.scores, reference(x, k), atol=1e-5, rtol=0)
                assert p.num_branches == (k or 4) and not p.degraded
        assert client.model_info()["workers"] == 4
    assert all(after - before >= 4 for before, after in zip(calls, replicas.calls, strict=True)), \
        f"every group should have answered: calls {calls} -> {replicas.calls}"


def test_sigkill_of_one_groups_worker_costs_no_request_and_no_wait(replicas):
    cfg = replica_cfg()
    x = images(2, seed=5)
    want = reference(x)
    release = hold_restarts(replicas.replicas[1])
    answers: list[list[float]] = [[] for _ in range(CLIENTS)]  # per client: monotonic end times
    failures: list[str] = []
    health_seen: list[str] = []
    stop = threading.Event()

    def client_loop(i: int, address: str) -> None:
        with Client(address) as c:
            while not stop.is_set():
                try:
                    p = c.predict(x.numpy(), timeout_s=HANG_S)
                    np.testing.assert_allclose(p.scores, want, atol=1e-5, rtol=0)
                    answers[i].append(time.monotonic())
                except (grpc.RpcError, AssertionError) as exc:
                    failures.append(f"client {i}: {exc}")

    def health_loop(address: str) -> None:
        with Client(address) as c:
            while not stop.is_set():
                health_seen.append(c.health())
                time.sleep(0.05)

    with ServerThread(cfg, replicas) as srv:
        Client(srv.address).wait_ready(HANG_S)
        threads = [threading.Thread(target=client_loop, args=(i, srv.address)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=health_loop, args=(srv.address,)))
        for t in threads:
            t.start()
        try:
            wait_until(lambda: all(len(a) >= 3 for a in answers), "every client answered before the kill")
            pid = replicas.worker_pids()[1][1]
            killed_at = kill(pid)
            wait_until(lambda: not replicas.replicas[1].available, "the killed group's recovery started")
            # The killed group cannot come back until `release`: every answer now is the other group's.
            wait_until(lambda: all(sum(t > killed_at for t in a) >= AFTER_KILL for a in answers),
                       f"every client got {AFTER_KILL} answers while the killed group was down")
            assert not replicas.replicas[1].available, "the killed group should still be recovering"
            release.set()
            wait_until(lambda: replicas.replicas[1].available, "the killed group rejoined", 2 * HANG_S)
            rejoined = replicas.calls[1]
            wait_until(lambda: replicas.calls[1] > rejoined + 3, "the rejoined group takes traffic again")
        finally:
            release.set()
            stop.set()
            for t in threads:
                t.join(HANG_S)
    assert failures == [], failures[:5]
    assert "NOT_SERVING" not in health_seen[health_seen.index("SERVING"):], \
        "health must stay SERVING while the other group answers"
    rec = replicas.recoveries[-1]
    assert rec["replica"] == 1 and rec["restarted"] == [1], rec
    print(f"\nrecovery of group 1: {rec['seconds']:.2f} s (restart held by the test); answers per client: "
          f"{[len(a) for a in answers]}")
