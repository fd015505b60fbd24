"""The Open Inference Protocol over gRPC (inference.GRPCInferenceService, on layerpar.v1's port),
called with the standard client, tritonclient.grpc, against a real server on 127.0.0.1 serving a
small Para-Former trained on digits in one process (no Ray: the point here is the protocol).

    .venv/bin/python -m pytest -q tests/serve/test_oip_grpc.py
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as triton_pb  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from layerpar.serve import oip_pb  # noqa: E402
from layerpar.serve.client import Client  # noqa: E402
from layerpar.serve.server import ServerThread  # noqa: E402
from tests.serve.helpers import HANG_S, Gated, wait_until  # noqa: E402
from tests.serve.oip_helpers import BEARER, TOKEN, accuracy, digits_backend, digits_cfg, make_cert  # noqa: E402

INFER = f"/{oip_pb.SERVICE}/ModelInfer"
GARBAGE = b"\xff\xff\xff\xff\x00garbage"


@pytest.fixture(scope="module")
def served():
    backend, x, y = digits_backend()
    with ServerThread(digits_cfg(), backend) as srv:
        yield srv, backend, x, y


def tensor(x: np.ndarray, datatype: str = "FP32", name: str = "input"):
    t = tc.InferInput(name, list(x.shape), datatype)
    t.set_data_from_numpy(x)
    return t


def status_of(fn) -> tuple[str | None, str]:
    try:
        fn()
    except InferenceServerException as exc:
        return exc.status(), exc.message()
    return None, ""


def metric(srv, method: str, status: str) -> float:
    return srv.server.metrics.registry.get_sample_value(
        "layerpar_requests_total", {"method": method, "status": status}) or 0.0


def fields(desc) -> dict:
    """name -> (number, type, repeated, message type name) of a message and its nested messages."""
    out = {}
    for f in desc.fields:
        out[f"{desc.name}.{f.name}"] = (f.number, f.type, f.is_repeated,
                                        f.message_type and f.message_type.name)
    for nested in desc.nested_types:
        out.update({f"{desc.name}.{k}": v for k, v in fields(nested).items()})
    return out


def test_the_proto_is_wire_compatible_with_tritonclients_stubs():
    """Same service, methods, messages and field numbers as the client's own stubs; both load in one
    process (our messages live in their own descriptor pool)."""
    ours = oip_pb.DESCRIPTOR
    theirs = triton_pb.DESCRIPTOR
    assert ours.package == theirs.package == "inference"
    service = ours.services_by_name["GRPCInferenceService"]
    assert set(service.methods_by_name) == set(oip_pb.METHODS)
    for m in service.methods:
        t = theirs.services_by_name["GRPCInferenceService"].methods_by_name[m.name]
        assert (m.input_type.name, m.output_type.name) == (t.input_type.name, t.output_type.name)
    for name, message in ours.message_types_by_name.items():
        mine, triton = fields(message), fields(theirs.message_types_by_name[name])
        assert {k: v for k, v in triton.items() if k in mine} == mine, name


def test_health_and_metadata_describe_the_input_and_output_tensors(served):
    srv, *_ = served
    client = tc.InferenceServerClient(srv.address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("layerpar")
    assert not client.is_model_ready("resnet50")
    assert client.get_server_metadata(as_json=True)["name"] == "layerpar"
    meta = client.get_model_metadata("layerpar", as_json=True)
    assert meta["name"] == "layerpar" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    for model, version in (("resnet50", ""), ("layerpar", "7")):
        status, message = status_of(lambda m=model, v=version: client.get_model_metadata(m, v))
        assert status == "StatusCode.NOT_FOUND" and "'layerpar'" in message, message
    client.close()


def test_model_infer_gives_layerpar_v1s_logits_and_accuracy_on_the_digits_test_split(served):
    srv, backend, x, y = served
    client = tc.InferenceServerClient(srv.address)
    got, want = [], []
    with Client(srv.address, timeout_s=HANG_S) as v1:
        for rows in np.array_split(np.arange(len(x)), 6):  # ~60-row requests
            result = client.infer("layerpar", [tensor(x[rows])])
            got.append(result.as_numpy("logits"))
            want.append(v1.predict(x[rows]).scores)
            params = result.get_response().parameters
            assert params["num_branches"].int64_param == 4 and not params["degraded"].bool_param
            assert params["branches_used"].string_param == "0,1,2,3"
    got, want = np.concatenate(got), np.concatenate(want)
    assert got.dtype == np.float32 and got.shape == (len(x), 10)
    np.testing.assert_array_equal(got, want)  # the same rows in the same requests: the same numbers
    expected = accuracy(backend.infer(torch.from_numpy(x)).numpy(), y)
    assert accuracy(got, y) == pytest.approx(expected, abs=1e-9) and expected > 0.6
    assert metric(srv, "ModelInfer", "OK") >= 6
    client.close()


def test_num_branches_parameter_answers_with_that_prefix(served):
    srv, backend, x, _ = served
    client = tc.InferenceServerClient(srv.address)
    rows = x[:16]
    with Client(srv.address, timeout_s=HANG_S) as v1:
        for k in (1, 2, 4):
            result = client.infer("layerpar", [tensor(rows)], parameters={"num_branches": k})
            logits = result.as_numpy("logits")
            np.testing.assert_array_equal(logits, v1.predict(rows, num_branches=k).scores)
            np.testing.assert_allclose(logits, backend.infer(torch.from_numpy(rows), k).numpy(), atol=1e-6)
            params = result.get_response().parameters
            assert params["num_branches"].int64_param == k
            assert params["branches_used"].string_param == ",".join(map(str, range(k)))
    assert not np.allclose(client.infer("layerpar", [tensor(rows)], parameters={"num_branches": 1})
                           .as_numpy("logits"), client.infer("layerpar", [tensor(rows)]).as_numpy("logits"))
    client.close()


def test_fp64_fp16_and_typed_contents_are_accepted_like_layerpar_v1(served):
    srv, _, x, _ = served
    client = tc.InferenceServerClient(srv.address)
    rows = x[:5]
    with Client(srv.address, timeout_s=HANG_S) as v1:
        for dtype, datatype in ((np.float64, "FP64"), (np.float16, "FP16")):
            got = client.infer("layerpar", [tensor(rows.astype(dtype), datatype)]).as_numpy("logits")
            np.testing.assert_array_equal(got, v1.predict(rows.astype(dtype)).scores)
        want = v1.predict(rows).scores
    # typed contents (fp32_contents) instead of raw bytes: what other OIP clients send
    req = oip_pb.ModelInferRequest(model_name="layerpar")
    req.inputs.add(name="input", datatype="FP32", shape=list(rows.shape)).contents.fp32_contents.extend(
        rows.ravel().tolist())
    with grpc.insecure_channel(srv.address) as channel:
        call = channel.unary_unary(INFER, request_serializer=oip_pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=oip_pb.ModelInferResponse.FromString)
        resp = call(req, timeout=HANG_S)
    got = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(tuple(resp.outputs[0].shape))
    np.testing.assert_array_equal(got, want)
    client.close()


def raw_request(shape, data: bytes, **params) -> bytes:
    req = oip_pb.ModelInferRequest(model_name="layerpar")
    req.inputs.add(name="input", datatype="FP32", shape=shape)
    req.raw_input_contents.append(data)
    for key, value in params.items():
        req.parameters[key].int64_param = value
    return req.SerializeToString()


def test_bad_requests_get_the_protocols_status_and_the_server_keeps_answering(served):
    srv, _, x, _ = served
    client = tc.InferenceServerClient(srv.address)
    good = x[:2]
    nan = good.copy()
    nan[0, 0, 0, 0] = np.nan
    cases = {  # what is wrong -> (call, status, words the one sentence holds)
        "shape": (lambda: client.infer("layerpar", [tensor(good[..., :7].copy())]), "does not fit"),
        "dtype": (lambda: client.infer("layerpar", [tensor(good.astype(np.int32), "INT32")]), "'INT32'"),
        "name": (lambda: client.infer("layerpar", [tensor(good, name="pixels")]), "'pixels' is unknown"),
        "two inputs": (lambda: client.infer("layerpar", [tensor(good), tensor(good)]), "1 input tensor"),
        "rows": (lambda: client.infer("layerpar", [tensor(np.resize(x, (257, 1, 8, 8)))]),
                 "serve.max_request_rows"),
        "NaN": (lambda: client.infer("layerpar", [tensor(nan)]), "NaN"),
        "branches": (lambda: client.infer("layerpar", [tensor(good)], parameters={"num_branches": 5}),
                     "num_branches (5)"),
        "branch type": (lambda: client.infer("layerpar", [tensor(good)], parameters={"num_branches": "2"}),
                        "must be an integer"),
        "parameter": (lambda: client.infer("layerpar", [tensor(good)], parameters={"num_branch": 2}),
                      "'num_branch' is unknown"),
        "output": (lambda: client.infer("layerpar", [tensor(good)],
                                        outputs=[tc.InferRequestedOutput("probs")]), "'probs' is unknown"),
    }
    for what, (call, words) in cases.items():
        status, message = status_of(call)
        assert status == "StatusCode.INVALID_ARGUMENT" and words in message, (what, status, message)
    status, message = status_of(lambda: client.infer("resnet50", [tensor(good)]))
    assert status == "StatusCode.NOT_FOUND" and "resnet50" in message
    with grpc.insecure_channel(srv.address) as channel:
        raw = channel.unary_unary(INFER)  # bytes in, bytes out: no client-side checks
        for body, words in ((raw_request([2, 1, 8, 8], good.tobytes()[:100]), "holds 100 bytes"),
                            (GARBAGE, "not a valid inference.ModelInferRequest")):
            with pytest.raises(grpc.RpcError) as info:
                raw(body, timeout=HANG_S)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()
        for method in oip_pb.METHODS:  # garbage on every method: one sentence, never UNKNOWN
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(f"/{oip_pb.SERVICE}/{method}")(GARBAGE, timeout=HANG_S)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "not a valid inference." in info.value.details(), info.value.details()
    assert metric(srv, "ModelInfer", "INVALID_ARGUMENT") >= len(cases) + 2
    assert metric(srv, "ModelInfer", "NOT_FOUND") >= 1
    assert client.infer("layerpar", [tensor(good)]).as_numpy("logits").shape == (2, 10)  # still serving
    client.close()


def test_the_timeout_parameter_is_a_server_side_deadline():
    """A request whose `timeout` (microseconds) passes while it waits in the queue is dropped unseen
    with DEADLINE_EXCEEDED, as a layerpar.v1 call whose gRPC deadline passes."""
    backend, x, _ = digits_backend()
    gated = Gated(backend)
    with ServerThread(digits_cfg(), gated) as srv, Client(srv.address, timeout_s=2 * HANG_S) as v1:
        client = tc.InferenceServerClient(srv.address)
        gated.gate.clear()
        blocker = threading.Thread(target=v1.predict, args=(x[:1],))
        blocker.start()
        assert gated.entered.wait(HANG_S)  # the engine is held: the next request queues
        out = {}
        late = threading.Thread(target=lambda: out.update(r=status_of(
            lambda: client.infer("layerpar", [tensor(x[:2])], timeout=200_000))))  # 0.2 s
        late.start()
        wait_until(lambda: srv.server.batcher.depth() == 1, "the request queued")
        time.sleep(0.5)  # past its 0.2 s timeout (a lower bound only: a slow machine waits longer)
        gated.gate.set()
        blocker.join(HANG_S)
        late.join(HANG_S)
        client.close()
        status, message = out["r"]
        assert status == "StatusCode.DEADLINE_EXCEEDED", message
        assert metric(srv, "ModelInfer", "DEADLINE_EXCEEDED") == 1
        assert srv.server.metrics.expired._value.get() == 1


def test_token_and_tls_hold_on_the_grpc_protocol(tmp_path):
    backend, x, _ = digits_backend()
    cert, key = make_cert(tmp_path)
    with ServerThread(digits_cfg(tls_cert=str(cert), tls_key=str(key)), backend, token=TOKEN) as srv:
        client = tc.InferenceServerClient(srv.address, ssl=True, root_certificates=str(cert))
        with Client(srv.address, tls_ca=str(cert), token=TOKEN, timeout_s=HANG_S) as v1:
            want = v1.predict(x[:3]).scores
        got = client.infer("layerpar", [tensor(x[:3])], headers=BEARER).as_numpy("logits")
        np.testing.assert_array_equal(got, want)
        wrong = {"authorization": "Bearer no"}
        for call in (lambda: client.infer("layerpar", [tensor(x[:3])]),
                     lambda: client.infer("layerpar", [tensor(x[:3])], headers=wrong),
                     lambda: client.get_model_metadata("layerpar"),
                     lambda: client.get_server_metadata()):
            status, message = status_of(call)
            assert status == "StatusCode.UNAUTHENTICATED" and "bearer token" in message, message
        # health stays open (serve.health_auth: open), as Kubernetes probes send no token
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("layerpar")
        client.close()
        plain = tc.InferenceServerClient(srv.address)  # no TLS: the handshake fails at once
        status, _ = status_of(lambda: plain.infer("layerpar", [tensor(x[:3])], headers=BEARER,
                                                  client_timeout=HANG_S))
        assert status == "StatusCode.UNAVAILABLE"
        plain.close()
        assert metric(srv, "ModelInfer", "UNAUTHENTICATED") == 2
