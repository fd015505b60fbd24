"""What the Open Inference Protocol shares with layerpar.v1 on one server: the batcher (requests of
both protocols merge into one engine call), the queue bound, draining, and the Ray engine. Real servers
on 127.0.0.1, called with tritonclient (gRPC and HTTP) and layerpar's own client.

    .venv/bin/python -m pytest -q tests/serve/test_oip_shared.py -m "not ray"
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

tc = pytest.importorskip("tritonclient.grpc")
th = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from layerpar.serve.client import Client  # noqa: E402
from layerpar.serve.server import ServerThread  # noqa: E402
from tests.serve.helpers import HANG_S, Gated, images, tiny_cfg, wait_until  # noqa: E402
from tests.serve.oip_helpers import digits_backend, digits_cfg  # noqa: E402


def grpc_input(x: np.ndarray):
    t = tc.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return t


def http_input(x: np.ndarray):
    t = th.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return t


def rest(srv):
    return th.InferenceServerClient(srv.server.http_url.split("://")[1], network_timeout=HANG_S)


def test_both_protocols_share_one_batcher_and_its_queue_bound():
    """While the engine is held, a layerpar.v1 and an OIP request queue together and leave as one
    engine call; with the queue full (serve.max_queue) an OIP request is RESOURCE_EXHAUSTED / 429."""
    backend, x, _ = digits_backend()
    gated = Gated(backend)
    with ServerThread(digits_cfg(max_queue=2), gated) as srv, ThreadPoolExecutor(3) as pool:
        v1s = [Client(srv.address, timeout_s=2 * HANG_S) for _ in range(2)]
        client, http = tc.InferenceServerClient(srv.address), rest(srv)
        gated.gate.clear()
        blocker = pool.submit(v1s[0].predict, x[:1])
        assert gated.entered.wait(HANG_S)  # the engine is held: what follows queues
        queued_v1 = pool.submit(v1s[1].predict, x[1:3])  # 2 rows
        queued_oip = pool.submit(client.infer, "layerpar", [grpc_input(x[3:6])])  # 3 rows
        wait_until(lambda: srv.server.batcher.depth() == 2, "both requests queued")
        with pytest.raises(InferenceServerException) as info:
            client.infer("layerpar", [grpc_input(x[:1])])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue is full" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            http.infer("layerpar", [http_input(x[:1])])
        assert info.value.status() == "429" and "queue is full" in info.value.message()
        gated.gate.set()
        blocker.result(HANG_S)
        v1_answer, oip_answer = queued_v1.result(HANG_S), queued_oip.result(HANG_S)
        for c in (*v1s, client, http):
            c.close()
    assert gated.calls == 2  # the blocker, then both queued requests in one call
    assert v1_answer.batch_rows == 5 and oip_answer.get_response().parameters["batch_rows"].int64_param == 5
    np.testing.assert_allclose(oip_answer.as_numpy("logits"),
                               backend.infer(torch.from_numpy(x[3:6])).numpy(), atol=1e-6)


def test_draining_turns_both_protocols_not_ready_and_refuses_new_requests():
    backend, x, _ = digits_backend()
    with ServerThread(digits_cfg(), backend) as srv:
        client, http = tc.InferenceServerClient(srv.address), rest(srv)
        wait_until(lambda: client.is_server_ready() and http.is_server_ready(), "ready")
        srv.begin_drain()
        assert client.is_server_live() and not client.is_server_ready()
        assert not client.is_model_ready("layerpar")
        assert http.is_server_live() and not http.is_server_ready() and not http.is_model_ready("layerpar")
        with pytest.raises(InferenceServerException) as info:
            client.infer("layerpar", [grpc_input(x[:2])])
        assert info.value.status() == "StatusCode.UNAVAILABLE" and "draining" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            http.infer("layerpar", [http_input(x[:2])])
        assert info.value.status() == "503" and "draining" in info.value.message()
        client.close()
        http.close()


@pytest.mark.ray
def test_the_ray_engine_answers_the_same_over_both_protocols(engine):
    """2 Ray branch workers behind the server: OIP answers equal layerpar.v1's, prefixes included."""
    x = images(5, seed=4).numpy()
    with ServerThread(tiny_cfg(http_port=0), engine) as srv, Client(srv.address, timeout_s=HANG_S) as v1:
        v1.wait_ready(HANG_S)
        client, http = tc.InferenceServerClient(srv.address), rest(srv)
        for k in (None, 2):
            want = v1.predict(x, num_branches=k).scores
            params = {"num_branches": k} if k else None
            got_grpc = client.infer("layerpar", [grpc_input(x)], parameters=params)
            got_http = http.infer("layerpar", [http_input(x)], parameters=params)
            np.testing.assert_array_equal(got_grpc.as_numpy("logits"), want)
            np.testing.assert_array_equal(got_http.as_numpy("logits"), want)
            assert got_http.get_response()["parameters"]["branches_used"] == ("0,1" if k else "0,1,2,3")
        client.close()
        http.close()
