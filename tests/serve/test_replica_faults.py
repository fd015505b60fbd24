"""Replica groups under faults, on local Ray: health with one replica group stopped, a call routed
with wait=False never waits for a recovery, each call's own timings, and a group whose pinned node is
gone placed on any node with room.

    .venv/bin/python -m pytest -q tests/serve/test_replica_faults.py
"""

from __future__ import annotations

import os
import re
import signal
import threading
import urllib.request

import pytest

from layerpar.serve.client import Client
from layerpar.serve.server import ServerThread
from tests.serve.helpers import HANG_S, images, tiny_cfg, wait_until
from tests.serve.test_serve_worker_loss import hold_restarts, kill

pytestmark = pytest.mark.ray


def metric(url: str, name: str) -> float | None:
    """One sample of the server's Prometheus text (None when absent)."""
    text = urllib.request.urlopen(url, timeout=HANG_S).read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_a_stopped_worker_in_one_group_keeps_health_serving_on_the_whole_one(ray_local):
    """2 groups x 1 worker; SIGSTOP group 1's worker. Its health probe waits parallel.heartbeat_s
    (30 s here), far beyond the server's probe bound (5 s): health must stay SERVING on group 0 and
    count its worker alive, probe after probe, until group 1 is seen not ready."""
    from layerpar.runtime.replicas import ReplicaSet

    cfg = tiny_cfg(workers=1).replace(parallel={"replicas": 2})
    rs = ReplicaSet(cfg)
    try:
        with ServerThread(cfg, rs) as srv, Client(srv.address) as client:
            client.wait_ready(HANG_S)
            ready1 = 'layerpar_replica_ready{replica="1"}'
            wait_until(lambda: metric(srv.metrics_url, ready1) == 1.0, "group 1 whole at first")
            pid = rs.worker_pids()[1][0]
            os.kill(pid, signal.SIGSTOP)
            try:
                seen = []

                def group1_out() -> bool:  # every poll: the server must be SERVING
                    seen.append(client.health(timeout_s=HANG_S))
                    assert seen[-1] == "SERVING", f"health turned {seen[-1]} with group 0 whole"
                    return metric(srv.metrics_url, ready1) == 0.0

                wait_until(group1_out, "group 1 reported not ready", timeout_s=3 * HANG_S)
                for _ in range(3):  # a few more probes (0.2 s apart) while group 1 is still stopped
                    group1_out()
                    assert metric(srv.metrics_url, "layerpar_workers_alive") >= 1.0
                    assert metric(srv.metrics_url, "layerpar_serving") == 1.0
                p = client.predict(images(2, seed=4).numpy(), timeout_s=HANG_S)
                assert p.scores.shape == (2, 4)
            finally:
                os.kill(pid, signal.SIGCONT)
    finally:
        rs.shutdown()


def test_wait_false_never_waits_for_a_recovery_and_timings_come_with_the_result(ray_local):
    from layerpar.runtime import Engine
    from layerpar.runtime.errors import Recovering, WorkerError

    x = images(2, seed=8)
    engine = Engine(tiny_cfg(workers=2))
    release = hold_restarts(engine)
    try:
        logits, meta = engine.infer_with_meta(x)
        assert {"broadcast", "total"} <= set(meta["timings"]), "the call's own timings, in its meta"
        kill(engine.worker_pids()[1])
        # a call that is not retried sees the loss: the recovery starts at the next call (held open)
        with pytest.raises(WorkerError):
            engine.faults.run(lambda workers: engine.group.call("stats", workers=workers), retry=False)
        outcome = []
        caller = threading.Thread(target=lambda: outcome.append(_try(engine.infer_with_meta, x, wait=False)))
        caller.start()
        caller.join(HANG_S)
        assert not caller.is_alive(), "infer_with_meta(wait=False) waited for the recovery"
        assert isinstance(outcome[0], Recovering), outcome
        assert engine.faults.recovering is not None  # still held: the call did not wait for it
    finally:
        release.set()
    wait_until(lambda: engine.faults.recovering is None, "the recovery finished", timeout_s=3 * HANG_S)
    try:
        assert engine.infer_with_meta(x)[0].shape == (2, 4)
    finally:
        engine.shutdown()


def _try(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc


def test_a_group_pinned_to_a_node_that_is_gone_is_placed_on_any_node_with_room(ray_local):
    from layerpar.runtime import Engine

    gone = "ab" * 28  # a node id the cluster does not have (alive): as after its node left
    cfg = tiny_cfg(workers=1).replace(parallel={"placement_timeout_s": 30.0})
    engine = Engine(cfg, node_id=gone)
    try:
        assert engine.group.placement_fallbacks == 1 and engine.group.node_id is None
        assert engine.health()["placement_fallbacks"] == 1
        with ServerThread(cfg, engine) as srv:
            wait_until(lambda: metric(srv.metrics_url, "layerpar_placement_fallbacks") == 1.0,
                       "the fallback counted in the metrics")
            with Client(srv.address) as client:
                client.wait_ready(HANG_S)
                assert client.predict(images(1, seed=2).numpy(), timeout_s=HANG_S).scores.shape == (1, 4)
    finally:
        engine.shutdown()
