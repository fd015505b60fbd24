"""Serving hardening found by outside checks (issue 14), against a real gRPC server on 127.0.0.1.
Most tests serve a LocalBackend (no Ray); the `ray` ones check the same rules on the real Engine.

    .venv/bin/python -m pytest -q tests/serve/test_hardening.py -m "not ray"
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from layerpar.serve import predict
from layerpar.serve.client import Client
from layerpar.serve.server import METHOD_LABELS, ServerThread
from layerpar.train.local import LocalBackend
from tests.serve.helpers import HANG_S, Gated, images, tiny_cfg, wait_until

ROOT = Path(__file__).resolve().parents[2]
GARBAGE = b"\xff\xff\xff\xff\x00garbage"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def metric(srv: ServerThread, name: str, **labels) -> float:
    return srv.server.metrics.registry.get_sample_value(name, labels) or 0.0


def code_of(fn) -> tuple[grpc.StatusCode | None, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return None, ""


def overflowing(rows: int = 2) -> np.ndarray:
    """Finite values that overflow the model: one pixel at 3e38 (row 0), every pixel at 1e30 (row 1)."""
    x = images(rows, seed=3).numpy()
    x[0, 0, 2, 3] = 3e38
    x[1:] = 1e30
    return x


def raw_call(channel: grpc.Channel, method: str, kind: str = "unary_unary", metadata=()):
    """Send GARBAGE as the request of `method`, bypassing every serializer."""
    call = getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)
    if kind == "unary_unary":
        return lambda: call(GARBAGE, timeout=HANG_S, metadata=metadata)
    if kind == "unary_stream":
        return lambda: list(call(GARBAGE, timeout=HANG_S, metadata=metadata))
    return lambda: list(call(iter([GARBAGE]), timeout=HANG_S, metadata=metadata))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A checkpoint with optimizer state (two training steps) in a run directory."""
    backend = LocalBackend(tiny_cfg(), total_steps=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        backend.train_step(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
    run_dir = tmp_path_factory.mktemp("run")
    return backend.save(run_dir, epoch=1), run_dir, backend


# ----------------------------------------------------------------------------- 2: overflow


def test_inputs_that_overflow_the_model_are_invalid_argument(local_backend):
    with ServerThread(tiny_cfg(), local_backend) as srv, Client(srv.address, timeout_s=HANG_S) as client:
        for x in (overflowing()[:1], overflowing()[1:]):  # one pixel at 3e38; all at 1e30
            for probabilities in (False, True):
                code, details = code_of(lambda x=x, p=probabilities: client.predict(x, probabilities=p,
                                                                                    top_k=2))
                assert code == INVALID and "the input's values overflow the model" in details, details
        assert client.predict(images(2, seed=1)).scores.shape == (2, 4)  # still serving
        assert metric(srv, "layerpar_requests_total", method="Predict", status="INVALID_ARGUMENT") == 4
        assert metric(srv, "layerpar_requests_total", method="Predict", status="OK") == 1


def test_an_overflowing_request_does_not_poison_its_batch_mates(local_backend):
    """Requests merged into one engine call are judged one by one: only the overflowing one fails."""
    gated = Gated(local_backend)
    good = images(2, seed=7).numpy()
    with ServerThread(tiny_cfg(), gated) as srv, ThreadPoolExecutor(3) as pool:
        clients = [Client(srv.address, timeout_s=2 * HANG_S) for _ in range(3)]
        gated.gate.clear()
        blocker = pool.submit(clients[0].predict, images(1, seed=9))
        assert gated.entered.wait(HANG_S)  # the engine is held: the next two requests queue together
        bad_f = pool.submit(code_of, lambda: clients[1].predict(overflowing(1)))
        good_f = pool.submit(clients[2].predict, good)
        wait_until(lambda: srv.server.batcher.depth() == 2, "both requests queued")
        gated.gate.set()
        blocker.result(HANG_S)
        code, details = bad_f.result(HANG_S)
        answer = good_f.result(HANG_S)
        for c in clients:
            c.close()
    assert code == INVALID and "overflow the model" in details
    assert answer.batch_rows == 3  # it shared the engine call with the overflowing row
    np.testing.assert_allclose(answer.scores, local_backend.infer(torch.from_numpy(good)).numpy(), atol=1e-6)
    assert gated.calls == 2 and srv.server.metrics.backend_errors._value.get() == 0


@pytest.mark.ray
def test_engine_infer_and_its_server_refuse_overflowing_inputs(engine):
    from layerpar.model.overflow import InputOverflow

    x = torch.from_numpy(overflowing(3))
    with pytest.raises(InputOverflow, match="row\\(s\\) 0, 1, 2 of 3"):
        engine.infer(x)
    with ServerThread(tiny_cfg(), engine) as srv, Client(srv.address, timeout_s=HANG_S) as client:
        code, details = code_of(lambda: client.predict(x.numpy()))
        assert code == INVALID and "overflow the model" in details
        assert client.health() == "SERVING"  # an input's fault is not an engine failure


def test_predict_cli_exits_2_in_one_sentence_when_the_model_overflows(capsys):
    backend = LocalBackend(tiny_cfg())
    with torch.no_grad():
        backend.model.embed.proj.weight.mul_(1e30)  # every ordinary image now overflows this model
    with ServerThread(tiny_cfg(), backend) as srv:
        assert predict.cli_main(["--address", srv.address, "--batch-size", "10"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert re.search(r"the server refused rows 0\.\.9 of the test split: the input's values overflow",
                     captured.err), captured.err
    assert "error" in json.loads(captured.out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- 3: undecodable bytes


def test_undecodable_requests_are_invalid_argument_on_every_method(local_backend):
    methods = [("/layerpar.v1.Inference/Predict", "unary_unary"),
               ("/layerpar.v1.Inference/ModelInfo", "unary_unary"),
               ("/grpc.health.v1.Health/Check", "unary_unary"),
               ("/grpc.health.v1.Health/Watch", "unary_stream"),
               ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream")]
    with ServerThread(tiny_cfg(), local_backend) as srv, grpc.insecure_channel(srv.address) as channel:
        for method, kind in methods:
            code, details = code_of(raw_call(channel, method, kind))
            assert code == INVALID, (method, code, details)
            assert "not a valid" in details  # one sentence, no Python exception class
            assert not re.search(r"<class|DecodeError|Unexpected|Traceback", details), details
        with Client(srv.address, timeout_s=HANG_S) as client:  # unharmed
            assert client.health() == "SERVING" and client.model_info()["num_classes"] == 4
        assert metric(srv, "layerpar_requests_total", method="ModelInfo", status="INVALID_ARGUMENT") == 1


# ----------------------------------------------------------------------------- 4: metrics labels


def test_made_up_methods_share_one_metrics_label(local_backend):
    with ServerThread(tiny_cfg(), local_backend, token="s3cret") as srv, \
            grpc.insecure_channel(srv.address) as channel:
        for i in range(20):
            code, _ = code_of(raw_call(channel, f"/made.up.Service{i}/Method{i}"))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = code_of(raw_call(channel, "/layerpar.v1.Inference/Predict"))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        methods = {s.labels["method"] for m in srv.server.metrics.requests.collect() for s in m.samples}
    assert methods == {"unknown", "Predict"}
    assert metric(srv, "layerpar_requests_total", method="unknown", status="UNAUTHENTICATED") == 20
    assert set(METHOD_LABELS.values()) >= {"Predict", "ModelInfo", "Check"}


# ----------------------------------------------------------------------------- 6: token, metrics host


def test_token_from_the_environment_or_a_file_never_in_the_config(local_backend, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPAR_SERVE_TOKEN", "from-env")
    file = tmp_path / "token"
    file.write_text("from-file\n")
    for cfg, token in ((tiny_cfg(), "from-env"), (tiny_cfg(token_file=str(file)), "from-file")):
        with ServerThread(cfg, local_backend) as srv:
            with Client(srv.address, timeout_s=HANG_S) as anonymous:
                code, _ = code_of(lambda c=anonymous: c.predict(images(1, 0)))
                assert code == grpc.StatusCode.UNAUTHENTICATED
            with Client(srv.address, token=token, timeout_s=HANG_S) as client:
                assert client.predict(images(1, 0)).scores.shape == (1, 4)
                info = client.model_info()
        text = json.dumps(info["config"]) + cfg.to_yaml() + json.dumps(cfg.to_dict())
        assert token not in text and info["config"]["serve"]["token"] == "<set>"


def test_checkpoints_never_hold_the_token(trained_run, monkeypatch):
    monkeypatch.setenv("LAYERPAR_SERVE_TOKEN", "s3cret-in-env")
    ckpt, _, backend = trained_run
    again = backend.save(ckpt.parent / "again", epoch=1)
    assert "s3cret-in-env" not in (again / "manifest.json").read_text()
    assert "token" not in json.loads((again / "manifest.json").read_text())["config"]["serve"]


def test_metrics_bind_127_0_0_1_when_the_server_binds_elsewhere(local_backend):
    with ServerThread(tiny_cfg(host="127.0.0.2"), local_backend) as srv:
        assert srv.address.startswith("127.0.0.2:")
        assert srv.metrics_url.startswith("http://127.0.0.1:")
        assert srv.server.metrics._http.server_address[0] == "127.0.0.1"


# ----------------------------------------------------------------------------- 7: health_auth


def test_health_and_reflection_are_open_by_default_the_model_is_guarded(local_backend):
    list_services = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    with ServerThread(tiny_cfg(), local_backend, token="s3cret") as srv, \
            grpc.insecure_channel(srv.address) as channel:
        wait_until(lambda: Client(srv.address).health() == "SERVING", "health SERVING")
        check = channel.unary_unary("/grpc.health.v1.Health/Check")  # no metadata: a Kubernetes probe
        reply = health_pb2.HealthCheckResponse.FromString(
            check(health_pb2.HealthCheckRequest().SerializeToString(), timeout=HANG_S))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        info = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        services = [s.name for r in info(iter([list_services]), timeout=HANG_S)
                    for s in reflection_pb2.ServerReflectionResponse.FromString(r)
                    .list_services_response.service]
        assert "layerpar.v1.Inference" in services
        with Client(srv.address, timeout_s=HANG_S) as anonymous:
            assert code_of(lambda: anonymous.predict(images(1, 0)))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(anonymous.model_info)[0] == grpc.StatusCode.UNAUTHENTICATED
    with ServerThread(tiny_cfg(health_auth="token"), local_backend, token="s3cret") as srv, \
            Client(srv.address, timeout_s=HANG_S) as anonymous:
        assert code_of(anonymous.health)[0] == grpc.StatusCode.UNAUTHENTICATED


# ----------------------------------------------------------------------------- 8: start-up


def serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launch/serve.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_taken_port_is_exit_2_before_any_engine_starts():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # 2 Ray workers on an address where no Ray runs: reaching the engine would fail otherwise
        proc = serve("--config", "tiny", "--port", str(port), "--set", "parallel.workers=2",
                     "--set", "parallel.address=ray://127.0.0.1:1")
        out, err = proc.communicate(timeout=2 * HANG_S)
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1] == (
        f"error: cannot serve gRPC on 127.0.0.1:{port}: Address already in use; stop whatever holds "
        "the port or choose another (--port / --metrics-port, 0 for a free one)"), err
    assert "Traceback" not in err and "ray" not in err.lower()
    assert "error" in json.loads(out.strip().splitlines()[-1])


def test_a_damaged_optimizer_state_does_not_stop_serving(trained_run):
    ckpt, run_dir, backend = trained_run
    damaged = sorted(ckpt.glob("optim.*.safetensors"))[0]
    damaged.write_bytes(b"\0" * 64)
    proc = serve("--checkpoint", str(run_dir), "--port", "0", "--set", "serve.health_interval_s=0.2")
    try:
        line = proc.stdout.readline()
        match = re.search(r"serving layerpar.v1.Inference on (127\.0\.0\.1:\d+)", line)
        assert match, line + proc.stderr.read()
        x = images(3, seed=4)
        with Client(match.group(1), timeout_s=HANG_S) as client:
            np.testing.assert_allclose(client.predict(x).scores, backend.infer(x).numpy(), atol=1e-6)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    (ckpt / "head.safetensors").write_bytes(b"\0" * 64)  # damaged weights still stop it, in one line
    proc = serve("--checkpoint", str(run_dir), "--port", "0")
    out, err = proc.communicate(timeout=2 * HANG_S)
    assert proc.returncode == 2 and "head.safetensors: sha256 does not match" in err
    assert "Traceback" not in err


@pytest.mark.ray
def test_engine_serves_weights_only_from_a_damaged_optimizer_state(ray_local, tmp_path):
    from layerpar.runtime import Engine
    from layerpar.train.checkpoint import CheckpointError

    source = LocalBackend(tiny_cfg(), total_steps=4)
    g = torch.Generator().manual_seed(1)
    source.train_step(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
    ckpt = source.save(tmp_path, epoch=1)
    sorted(ckpt.glob("optim.*.safetensors"))[0].write_bytes(b"\0" * 64)
    with Engine(tiny_cfg(workers=2)) as eng:
        with pytest.raises(CheckpointError, match="sha256 does not match"):
            eng.load(ckpt)  # training's full load still refuses the damage
        eng.load(ckpt, weights_only=True)
        x = images(3, seed=5)
        torch.testing.assert_close(eng.infer(x), source.infer(x), rtol=0, atol=1e-5)
