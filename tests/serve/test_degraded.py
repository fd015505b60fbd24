"""How the server passes worker loss through: degraded answers (serve.degraded: allow), the health
threshold (serve.min_live_fraction), and retries of a failed engine call (serve.retries).

The backends here are the real single-process model with the hooks the Engine offers
(infer_with_meta, health); "losing" workers 1 means answering from branches 0-1 only, which is exactly
what the Engine does in degraded mode. Worker loss on real Ray workers: tests/serve/test_serve_worker_loss.py.

    .venv/bin/python -m pytest -q tests/serve/test_degraded.py
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch

from layerpar.serve.client import Client
from layerpar.serve.server import ServerThread
from layerpar.train.local import LocalBackend
from tests.serve.helpers import images, tiny_cfg

pytestmark = pytest.mark.unit


class TwoWorkers:
    """A LocalBackend presented as 2 workers (branches 0-1 and 2-3); `lost` drops worker 1."""

    def __init__(self, backend: LocalBackend):
        self.backend, self.lost, self.fail_next = backend, False, 0

    @torch.no_grad()
    def infer_with_meta(self, x, num_branches=None):
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("a branch worker died")
        m = self.backend.model
        ids = m.prefix_ids(num_branches)
        if self.lost:
            ids = [b for b in ids if b < 2]
        return m.head(m.branch_sum(m.embed(x), ids)), {"degraded": self.lost, "branches_used": ids}

    def health(self):
        return {"ready": True, "workers": 2, "workers_alive": 1 if self.lost else 2}

    def info(self):
        return {**self.backend.info(), "workers": 2}


def wait_for(client: Client, status: str, timeout_s: float = 60.0) -> str:  # bounds a hang only
    end = time.monotonic() + timeout_s
    while (now := client.health()) != status and time.monotonic() < end:
        time.sleep(0.05)
    return now


def test_degraded_answers_are_marked_and_equal_the_surviving_branches_sum(local_backend):
    backend = TwoWorkers(local_backend)
    x = images(3, seed=3)
    with ServerThread(tiny_cfg(degraded="allow"), backend) as srv, Client(srv.address) as client:
        healthy = client.predict(x)
        assert not healthy.degraded and healthy.num_branches == 4
        np.testing.assert_allclose(healthy.scores, local_backend.infer(x).numpy(), atol=1e-6)
        backend.lost = True
        assert wait_for(client, "NOT_SERVING") == "NOT_SERVING"  # 1 of 2 workers < min_live_fraction 1.0
        p = client.predict(x)  # still answered
        assert p.degraded and p.branches_used == [0, 1] and p.num_branches == 2
        np.testing.assert_allclose(p.scores, local_backend.infer(x, 2).numpy(), atol=1e-6)  # prefix k=2
        assert srv.server.metrics.registry.get_sample_value("layerpar_degraded_responses_total") == 1
        assert srv.server.metrics.registry.get_sample_value("layerpar_workers_alive") == 1
        backend.lost = False
        assert wait_for(client, "SERVING") == "SERVING"


def test_min_live_fraction_keeps_a_degraded_server_in_rotation(local_backend):
    backend = TwoWorkers(local_backend)
    backend.lost = True
    with ServerThread(tiny_cfg(degraded="allow", min_live_fraction=0.5), backend) as srv, \
            Client(srv.address) as client:
        assert client.health() == "SERVING"


def test_a_failed_engine_call_is_retried_and_the_client_never_sees_it(local_backend):
    backend = TwoWorkers(local_backend)
    x = images(2, seed=5)
    with ServerThread(tiny_cfg(retries=1), backend) as srv, Client(srv.address) as client:
        backend.fail_next = 1
        np.testing.assert_allclose(client.predict(x).scores, local_backend.infer(x).numpy(), atol=1e-6)
        assert srv.server.metrics.registry.get_sample_value("layerpar_backend_errors_total") == 1
        backend.fail_next = 10**6  # more failures than retries: UNAVAILABLE (retryable)
        with pytest.raises(grpc.RpcError) as info:
            client.predict(x)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "a branch worker died" in info.value.details()
        assert wait_for(client, "NOT_SERVING") == "NOT_SERVING"  # health probes the engine itself...
        backend.fail_next = 0
        assert wait_for(client, "SERVING") == "SERVING"  # ... and sees it answer again, with no traffic
        assert client.predict(x).scores.shape == (2, 4)
