"""launch/serve.py as a real process (checkpoint in, address out, SIGTERM drains, JSON last line),
launch/predict.py against it, and TLS. Single-process backend: no Ray needed here.

    .venv/bin/python -m pytest -q tests/serve/test_serve_cli.py
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from layerpar.data import load_dataset
from layerpar.serve import predict
from layerpar.serve.client import Client
from layerpar.serve.server import ServerThread
from layerpar.train.local import LocalBackend
from tests.serve.helpers import HANG_S, images, tiny_cfg

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = tiny_cfg()
    backend = LocalBackend(cfg)
    with torch.no_grad():  # weights that differ from a fresh init, so loading really matters
        for p in backend.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    run_dir = tmp_path_factory.mktemp("run")
    return backend.save(run_dir / "checkpoints" / "step_0000000", epoch=0), run_dir, backend


def test_serve_script_loads_a_run_dir_serves_predict_and_drains_on_sigterm(checkpoint, capsys):
    ckpt, run_dir, backend = checkpoint
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch/serve.py"), "--checkpoint", str(run_dir), "--port", "0",
         "--set", "serve.health_interval_s=0.2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"serving layerpar.v1.Inference on (127\.0\.0\.1:\d+)", line)
        assert match, line + proc.stderr.read()
        address = match.group(1)
        with Client(address) as client:
            client.wait_ready(HANG_S)
            assert client.model_info()["checkpoint_id"] == "step_0000000@step0"

        # launch/predict.py's logic: the test split of the server's dataset, accuracy as JSON
        assert predict.cli_main(["--address", address, "--batch-size", "10"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        test = load_dataset(backend.cfg).test
        want = (backend.infer(test.x).argmax(-1) == test.y).float().mean().item()
        assert summary["rows"] == len(test) == 32 and summary["requests"] == 4
        assert summary["accuracy"] == pytest.approx(want, abs=1e-6)

        # a steady stream of requests while SIGTERM arrives: every call is answered or cleanly refused
        codes, stop = [], threading.Event()

        def stream():
            with Client(address, timeout_s=HANG_S) as client:
                while not stop.is_set():
                    try:
                        client.predict(images(2, seed=len(codes)))
                        codes.append("OK")
                    except grpc.RpcError as exc:
                        codes.append(exc.code().name)
                        return

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        # a stream that dies (or stalls) early fails here, not at the suite's timeout
        end = time.monotonic() + HANG_S
        while len(codes) < 5 and t.is_alive() and time.monotonic() < end:
            t.join(0.01)
        assert len(codes) >= 5 and codes.count("OK") == len(codes), (
            f"the request stream stopped before SIGTERM (thread alive: {t.is_alive()}): {codes}")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=HANG_S)
        stop.set()
        t.join(HANG_S)
        assert not t.is_alive(), "the request stream did not end after the server stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert set(codes) <= {"OK", "UNAVAILABLE"} and codes.count("OK") >= 5, codes
    last = json.loads(out.strip().splitlines()[-1])
    assert last["drained"] is True and last["address"] == address
    assert last["requests"]["Predict:OK"] == codes.count("OK") + 4
    assert last["checkpoint"] == str(ckpt)


def test_serve_script_reports_a_missing_checkpoint_in_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch/serve.py"), "--checkpoint", str(tmp_path / "nope")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr
    assert "error" in json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(tmp_path, local_backend):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    cfg = tiny_cfg(tls_cert=str(cert), tls_key=str(key))
    x = images(3, seed=11)
    with ServerThread(cfg, local_backend, token="t0ken") as srv:
        with Client(srv.address, tls_ca=str(cert), token="t0ken") as client:
            np.testing.assert_allclose(client.predict(x).scores, local_backend.infer(x).numpy(), atol=1e-6)
        # no TLS: the handshake fails, so the call fails at once with UNAVAILABLE (the generous
        # deadline only bounds a hang: reaching it would be DEADLINE_EXCEEDED, a failure)
        with Client(srv.address, token="t0ken", timeout_s=HANG_S) as plain:
            with pytest.raises(grpc.RpcError) as info:
                plain.predict(x)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
