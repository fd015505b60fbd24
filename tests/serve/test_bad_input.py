"""Bad input never crashes the server: each case is INVALID_ARGUMENT with a message that says what was
expected, and the server keeps answering good requests (real Engine on local Ray).

    .venv/bin/python -m pytest -q tests/serve/test_bad_input.py -x
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerpar.serve import layerpar_v1_pb2 as pb
from layerpar.serve.client import Client
from layerpar.serve.server import ServerThread
from tests.serve.helpers import images, tiny_cfg

pytestmark = pytest.mark.ray

GOOD = np.ones((2, 1, 8, 8), np.float32)


def request(x=GOOD, *, dtype=None, shape=None, data=None, **fields) -> bytes:
    req = pb.PredictRequest(data=x.tobytes() if data is None else data,
                            shape=list(x.shape) if shape is None else shape,
                            dtype=x.dtype.name if dtype is None else dtype, **fields)
    return req.SerializeToString()


def with_value(value: float, dtype=np.float32) -> np.ndarray:
    x = GOOD.astype(dtype)
    x[1, 0, 3, 4] = value
    return x


# (case, raw request bytes, words the error message must contain)
CASES = [
    ("wrong shape (rank)", request(shape=[2, 64, 1]), "expected (B, 1, 8, 8)"),
    ("wrong shape (channels)", request(np.ones((1, 2, 8, 8), np.float32)), "expected (B, 1, 8, 8)"),
    ("wrong shape (side)", request(np.ones((1, 1, 4, 16), np.float32)), "expected (B, 1, 8, 8)"),
    ("wrong dtype", request(GOOD.astype(np.int32)), "expected one of float32, float64, float16"),
    ("unknown dtype", request(dtype="bfloat17"), "'bfloat17' is not supported"),
    ("bytes shorter than shape", request(data=GOOD.tobytes()[:-4]), "needs 512"),
    ("bytes longer than shape", request(data=GOOD.tobytes() + b"\0" * 4), "needs 512"),
    ("NaN", request(with_value(np.nan)), "NaN or Inf"),
    ("Inf", request(with_value(-np.inf)), "NaN or Inf"),
    ("float64 beyond float32", request(with_value(1e300, np.float64)), "NaN or Inf"),
    ("empty batch", request(np.ones((0, 1, 8, 8), np.float32)), "empty batch"),
    ("batch too large", request(np.ones((9, 1, 8, 8), np.float32)), "serve.max_request_rows (8)"),
    ("num_branches 0", request(num_branches=0), "num_branches (0) must be in 1..4"),
    ("num_branches 5", request(num_branches=5), "num_branches (5) must be in 1..4"),
    ("top_k too large", request(top_k=5), "top_k (5) must be in 0..4"),
    ("garbage bytes", b"\xff\xff\xff\xff\x00garbage", "not a valid layerpar.v1.PredictRequest"),
]


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(tiny_cfg(max_request_rows=8), engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def raw_predict(server):
    """Predict with hand-made bytes on the wire (the stub would refuse to serialise some cases)."""
    channel = grpc.insecure_channel(server.address)
    yield channel.unary_unary("/layerpar.v1.Inference/Predict")
    channel.close()


@pytest.mark.parametrize("case,raw,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(server, raw_predict, engine,
                                                                   case, raw, words):
    with pytest.raises(grpc.RpcError) as info:
        raw_predict(raw, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert words in info.value.details(), info.value.details()
    ok = pb.PredictResponse.FromString(raw_predict(request(), timeout=60))  # still serving
    np.testing.assert_allclose(np.asarray(ok.scores).reshape(2, 4), engine.infer(
        torch.from_numpy(GOOD)).numpy(), atol=1e-6)


def test_float64_and_float16_inputs_are_accepted(server, engine):
    x = images(2, seed=7)
    with Client(server.address) as client:
        for dtype in (np.float64, np.float16):
            xd = x.numpy().astype(dtype)
            want = engine.infer(torch.from_numpy(xd.astype(np.float32))).numpy()
            np.testing.assert_allclose(client.predict(xd).scores, want, atol=1e-6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), shape=st.lists(st.integers(-3, 70), max_size=5),
       dtype=st.sampled_from(["float32", "float16", "float64", "int8", "", "x"]),
       k=st.one_of(st.none(), st.integers(0, 9)), top_k=st.integers(0, 6))
def test_any_request_is_answered_or_refused_with_invalid_argument(raw_predict, data, shape, dtype, k,
                                                                  top_k):
    req = pb.PredictRequest(data=data, shape=shape, dtype=dtype, top_k=top_k)
    if k is not None:
        req.num_branches = k
    try:
        resp = pb.PredictResponse.FromString(raw_predict(req.SerializeToString(), timeout=60))
        assert len(resp.predicted) == shape[0]
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert exc.details() and "Traceback" not in exc.details()
