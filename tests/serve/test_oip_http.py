"""The Open Inference Protocol over HTTP/REST (/v2/... on serve.http_port), called with the standard
client, tritonclient.http (binary tensors, its default, and JSON tensors), and with plain HTTP for what
a client library would never send; a real server on 127.0.0.1, one process (no Ray).

    .venv/bin/python -m pytest -q tests/serve/test_oip_http.py
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

th = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from layerpar.serve.client import Client  # noqa: E402
from layerpar.serve.server import ServerThread  # noqa: E402
from tests.serve.helpers import HANG_S  # noqa: E402
from tests.serve.oip_helpers import BEARER, TOKEN, accuracy, digits_backend, digits_cfg, make_cert  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served():
    backend, x, y = digits_backend()
    with ServerThread(digits_cfg(max_message_bytes=1 << 20), backend) as srv:
        yield srv, backend, x, y


def rest(srv, **kwargs):
    return th.InferenceServerClient(srv.server.http_url.split("://")[1], network_timeout=HANG_S, **kwargs)


def tensor(x: np.ndarray, datatype: str = "FP32", name: str = "input", binary: bool = True):
    t = th.InferInput(name, list(x.shape), datatype)
    t.set_data_from_numpy(x, binary_data=binary)
    return t


def http(srv, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a plain HTTP call."""
    req = urllib.request.Request(srv.server.http_url + path, data=body, headers=headers or {},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=HANG_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metric(srv, method: str, status: str) -> float:
    return srv.server.metrics.registry.get_sample_value(
        "layerpar_requests_total", {"method": method, "status": status}) or 0.0


def test_health_and_metadata(served):
    srv, *_ = served
    client = rest(srv)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("layerpar")
    assert not client.is_model_ready("resnet50")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    meta = client.get_model_metadata("layerpar")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("layerpar", "1") == meta
    assert http(srv, "/v2/health/live") == (200, {"live": True})
    for path in ("/v2/models/resnet50", "/v2/models/layerpar/versions/7", "/v2/no/such/path"):
        status, body = http(srv, path)
        assert status == 404 and isinstance(body["error"], str), (path, body)
    client.close()


def test_infer_gives_layerpar_v1s_logits_and_accuracy_on_the_digits_test_split(served):
    srv, backend, x, y = served
    client = rest(srv)
    for binary in (True, False):  # binary tensor extension (tritonclient's default) and JSON `data`
        got, want = [], []
        with Client(srv.address, timeout_s=HANG_S) as v1:
            for rows in np.array_split(np.arange(len(x)), 6):
                outputs = None if binary else [th.InferRequestedOutput("logits", binary_data=False)]
                result = client.infer("layerpar", [tensor(x[rows], binary=binary)], outputs=outputs)
                got.append(result.as_numpy("logits"))
                want.append(v1.predict(x[rows]).scores)
                params = result.get_response()["parameters"]
                assert params["num_branches"] == 4 and params["degraded"] is False
        got = np.concatenate(got).astype(np.float32)
        np.testing.assert_array_equal(got, np.concatenate(want))
        expected = accuracy(backend.infer(torch.from_numpy(x)).numpy(), y)
        assert accuracy(got, y) == pytest.approx(expected, abs=1e-9) and expected > 0.6
    assert metric(srv, "http:ModelInfer", "OK") >= 12
    client.close()


def test_num_branches_parameter_and_curl_style_json(served):
    srv, backend, x, _ = served
    rows = x[:4]
    client = rest(srv)
    result = client.infer("layerpar", [tensor(rows)], parameters={"num_branches": 2})
    np.testing.assert_allclose(result.as_numpy("logits"), backend.infer(torch.from_numpy(rows), 2).numpy(),
                               atol=1e-6)
    assert result.get_response()["parameters"]["branches_used"] == "0,1"
    body = {"id": "r1", "parameters": {"num_branches": 3},
            "inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                        "data": rows.tolist()}]}  # nested lists, as curl users write them
    status, answer = http(srv, "/v2/models/layerpar/infer", json.dumps(body).encode())
    assert status == 200 and answer["id"] == "r1" and answer["parameters"]["num_branches"] == 3
    (out,) = answer["outputs"]
    assert out["name"] == "logits" and out["shape"] == [4, 10]
    with Client(srv.address, timeout_s=HANG_S) as v1:
        np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(4, 10),
                                      v1.predict(rows, num_branches=3).scores)
    client.close()


def test_bad_requests_get_400_or_404_with_one_sentence_and_the_server_keeps_answering(served):
    srv, _, x, _ = served
    client = rest(srv)
    good = x[:2]
    cases = {
        "shape": (lambda: client.infer("layerpar", [tensor(good[..., :7].copy())]), "does not fit"),
        "dtype": (lambda: client.infer("layerpar", [tensor(good.astype(np.int32), "INT32")]), "'INT32'"),
        "name": (lambda: client.infer("layerpar", [tensor(good, name="pixels")]), "'pixels' is unknown"),
        "branches": (lambda: client.infer("layerpar", [tensor(good)], parameters={"num_branches": 0}),
                     "num_branches (0)"),
        "output": (lambda: client.infer("layerpar", [tensor(good)],
                                        outputs=[th.InferRequestedOutput("probs")]), "'probs' is unknown"),
    }
    for what, (call, words) in cases.items():
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "400" and words in info.value.message(), (what, info.value)
    with pytest.raises(InferenceServerException) as info:
        client.infer("resnet50", [tensor(good)])
    assert info.value.status() == "404"
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8],
                                   "parameters": {"binary_data_size": 100}}]}).encode()
    json_input = {"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8], "data": [0.5] * 100}
    plain = {  # what a client library would never send: body, headers -> words of the answer
        "garbage": (b"\xff\xff\x00garbage", {}, "not a JSON inference request"),
        "not an object": (b"[1, 2]", {}, "JSON object"),
        "values": (json.dumps({"inputs": [json_input]}).encode(), {}, "holds 100 values"),
        "strings": (json.dumps({"inputs": [{**json_input, "data": ["a"] * 128}]}).encode(), {},
                    "must be numbers"),
        "negative": (json.dumps({"inputs": [{**json_input, "shape": [-1, 1, 8, 8]}]}).encode(), {},
                     "does not fit"),
        "header": (head + good.tobytes(), {"Inference-Header-Content-Length": "9999"}, "must be in"),
        "bytes": (head + good.tobytes(), {"Inference-Header-Content-Length": str(len(head))},
                  "binary bytes that no input"),
        "short": (head + good.tobytes()[:50], {"Inference-Header-Content-Length": str(len(head))},
                  "binary_data_size (100)"),
        "gzip": (head, {"Content-Encoding": "gzip"}, "not supported"),
    }
    for what, (body, headers, words) in plain.items():
        status, answer = http(srv, "/v2/models/layerpar/infer", body, headers)
        assert status == 400 and words in answer["error"], (what, status, answer)
    status, answer = http(srv, "/v2/models/layerpar/infer", b"0" * (1 << 20) + b"0")  # over 1 MiB
    assert status == 413 and "serve.max_message_bytes" in answer["error"]
    assert metric(srv, "http:ModelInfer", "INVALID_ARGUMENT") >= len(cases) + len(plain)
    assert client.infer("layerpar", [tensor(good)]).as_numpy("logits").shape == (2, 10)  # still serving
    client.close()


def test_token_tls_and_model_name_hold_on_the_rest_protocol(tmp_path):
    import gevent.ssl

    backend, x, _ = digits_backend()
    cert, key = make_cert(tmp_path)
    cfg = digits_cfg(tls_cert=str(cert), tls_key=str(key), model_name="digits")
    with ServerThread(cfg, backend, token=TOKEN) as srv:
        assert srv.server.http_url.startswith("https://127.0.0.1:")
        client = rest(srv, ssl=True,
                      ssl_context_factory=lambda **_: gevent.ssl.create_default_context(cafile=str(cert)))
        with Client(srv.address, tls_ca=str(cert), token=TOKEN, timeout_s=HANG_S) as v1:
            want = v1.predict(x[:3]).scores
        got = client.infer("digits", [tensor(x[:3])], headers=BEARER).as_numpy("logits")
        np.testing.assert_array_equal(got, want)
        for call in (lambda: client.infer("digits", [tensor(x[:3])]),
                     lambda: client.infer("digits", [tensor(x[:3])], headers={"authorization": "Bearer no"}),
                     lambda: client.get_model_metadata("digits")):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "401" and "bearer token" in info.value.message()
        with pytest.raises(InferenceServerException) as info:  # serve.model_name renames the model
            client.infer("layerpar", [tensor(x[:3])], headers=BEARER)
        assert info.value.status() == "404" and "'digits'" in info.value.message()
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
        client.close()
        context = ssl.create_default_context(cafile=str(cert))
        plain = srv.server.http_url.replace("https://", "http://") + "/v2/health/live"
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no TLS: refused, never answered
            urllib.request.urlopen(plain, timeout=HANG_S)
        with urllib.request.urlopen(srv.server.http_url + "/v2/health/live", timeout=HANG_S,
                                    context=context) as resp:
            assert resp.status == 200
        assert metric(srv, "http:ModelInfer", "UNAUTHENTICATED") == 2


def test_a_taken_rest_port_is_exit_2_in_one_sentence_before_any_engine_starts():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cmd = [sys.executable, str(ROOT / "launch/serve.py"), "--config", "tiny", "--port", "0",
               "--http-port", str(port)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=2 * HANG_S)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: cannot serve REST on 127.0.0.1:{port}: Address already in use; stop whatever holds the "
        "port or choose another (--http-port, 0 for a free one)"), out.stderr
    assert "error" in json.loads(out.stdout.strip().splitlines()[-1])


def test_serve_script_takes_http_port_and_reports_rest_calls():
    """launch/serve.py --http-port: both protocols from one process; SIGTERM drains; the JSON summary
    counts the REST calls."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch/serve.py"), "--config", "tiny", "--port", "0", "--http-port", "0",
         "--set", "serve.health_interval_s=0.2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"serving layerpar.v1.Inference on (127\.0\.0\.1:\d+).*REST http://(127\.0\.0\.1:\d+)/v2",
                          line)
        assert match, line + proc.stderr.read()
        client = th.InferenceServerClient(match.group(2), network_timeout=HANG_S)
        with Client(match.group(1)) as v1:
            v1.wait_ready(HANG_S)
        x = np.zeros((1, 1, 8, 8), np.float32)
        assert client.infer("layerpar", [tensor(x)]).as_numpy("logits").shape == (1, 4)
        client.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["http"] == f"http://{match.group(2)}" and last["requests"]["http:ModelInfer:OK"] == 1
