"""The Generate RPC on a real gRPC server (127.0.0.1) over real tiny causal LMs: streaming, continuous
batching, bad input with no leaked cache slot, cancel, Predict/Generate on the wrong kind of model,
and a worker SIGKILLed mid-generation (W = 2 Ray workers)."""

from __future__ import annotations

import os
import signal
import threading
import urllib.request

import grpc
import pytest

from layerpar.config import load_config
from layerpar.model.lm import build_lm, generate
from layerpar.runtime.decoder import LocalDecoder
from layerpar.serve import layerpar_v1_pb2 as pb
from layerpar.serve import layerpar_v1_pb2_grpc as pb_grpc
from layerpar.serve.generate_rpc import GenerationServerThread
from tests.serve.helpers import HANG_S, tiny_cfg, wait_until

BOS = 256


def lm_cfg(context: int = 32, workers: int = 0, **serve):
    serve = {"port": 0, "metrics_port": 0, "health_interval_s": 0.2, "drain_timeout_s": 5.0, **serve}
    sets = ["model.kind=paraformer_lm", "data.name=text", "model.dim=32", "model.heads=2", "model.mlp_dim=64",
            "model.num_branches=3", "model.branch_depth=1", f"model.context={context}",
            f"parallel.workers={workers}", "parallel.cpus_per_worker=0.5", "parallel.timeout_s=30",
            "parallel.placement_timeout_s=120", "parallel.heartbeat_s=30"]
    sets += [f"serve.{k}={v}" for k, v in serve.items()]
    return load_config(None, sets)


class GatedDecoder(LocalDecoder):
    """A LocalDecoder whose decode steps wait at a gate once `block_at` steps have run."""

    def __init__(self, model, slots, block_at=None):
        super().__init__(model, slots)
        self.block_at, self.steps, self.gate = block_at, 0, threading.Event()

    def step(self, slots, tokens, num_branches=None):
        self.steps += 1
        if self.block_at is not None and self.steps >= self.block_at:
            assert self.gate.wait(HANG_S)
        return super().step(slots, tokens, num_branches)


@pytest.fixture(scope="module")
def model():
    return build_lm(lm_cfg().model, seed=0)


@pytest.fixture(scope="module")
def server(model):
    cfg = lm_cfg(generate_slots=2, max_new_tokens=64)
    dec = LocalDecoder(model, 2)
    with GenerationServerThread(cfg, dec) as srv:
        srv.decoder = dec
        yield srv


def stub(srv):
    return pb_grpc.InferenceStub(grpc.insecure_channel(srv.address))


def run(srv, **req):
    tokens, done = [], None
    for msg in stub(srv).Generate(pb.GenerateRequest(**req), timeout=HANG_S):
        if msg.WhichOneof("event") == "token":
            tokens.append(msg.token)
        else:
            done = msg.done
    return tokens, done


def metrics(srv) -> str:
    return urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()


def test_generate_streams_greedy_tokens(server, model):
    tokens, done = run(server, prompt="def f(x):", max_tokens=10)
    ref = generate(model, [[BOS, *b"def f(x):"]], 10)[0]
    assert [t.id for t in tokens] == ref == list(done.tokens)
    assert [t.index for t in tokens] == list(range(10))
    assert all(t.num_branches == 3 and t.latency_ms > 0 and t.step_ms > 0 for t in tokens)
    assert done.stop_reason == "length" and done.completion_tokens == 10 and done.prompt_tokens == 10
    assert len(done.token_ms) == 10
    assert done.text == bytes(b for t in tokens for b in t.piece).decode("utf-8", "replace")
    assert server.decoder.num_used() == 0
    text = metrics(server)
    assert 'layerpar_requests_total{method="Generate",status="OK"}' in text
    assert "layerpar_generated_tokens_total" in text and 'layerpar_generations_total{reason="length"}' in text


def test_sampling_seed_stop_and_prefix(server, model):
    a = run(server, prompt="abc", max_tokens=12, temperature=1.3, top_k=8, seed=5)[1]
    b = run(server, prompt="abc", max_tokens=12, temperature=1.3, top_k=8, seed=5)[1]
    assert list(a.tokens) == list(b.tokens) and a.seed == 5
    free = run(server, prompt="abc", max_tokens=8)[1]
    stop = free.text.encode()[3:5].decode("utf-8", "replace")
    if "\ufffd" not in stop and stop:
        s = run(server, prompt="abc", max_tokens=8, stop=[stop])[1]
        assert s.stop_reason == "stop" and s.stop_sequence == stop and stop not in s.text
    # a per-token deadline no step can meet: the next generation decodes with the 1-branch prefix
    fast = run(server, prompt="abc", max_tokens=4, token_deadline_ms=1e-6)
    assert fast[1].num_branches == 1 and all(t.num_branches == 1 for t in fast[0])
    k1 = run(server, prompt="abc", max_tokens=5, num_branches=1)
    assert all(t.num_branches == 1 for t in k1[0]) and k1[1].num_branches == 1
    assert list(k1[1].tokens) == generate(model, [[BOS, *b"abc"]], 5, num_branches=1)[0]


def test_concurrent_generations_share_slots(server, model):
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]  # 5 generations through 2 slots
    out = [None] * len(prompts)

    def one(i):
        out[i] = run(server, prompt=prompts[i], max_tokens=6 + i)[1]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
    for i, p in enumerate(prompts):
        assert list(out[i].tokens) == generate(model, [[BOS, *p.encode()]], 6 + i)[0]
    assert server.decoder.num_used() == 0


def raw_generate(srv, raw: bytes):
    call = grpc.insecure_channel(srv.address).unary_stream("/layerpar.v1.Inference/Generate",
                                                          request_serializer=lambda b: b)
    return list(call(raw, timeout=HANG_S))


@pytest.mark.parametrize("req, words", [
    (dict(prompt="", max_tokens=4), "empty"),
    (dict(prompt="x" * 40, max_tokens=4), "context holds 32"),
    (dict(prompt="hi", max_tokens=0), "max_tokens must be at least 1"),
    (dict(prompt="hi", max_tokens=10 ** 6), "more than this server allows"),
    (dict(prompt="hi", max_tokens=3, num_branches=9), "num_branches"),
    (dict(prompt="hi", max_tokens=3, temperature=float("nan")), "temperature"),
])
def test_bad_requests_are_invalid_argument(server, req, words):
    with pytest.raises(grpc.RpcError) as err:
        run(server, **req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
    assert server.decoder.num_used() == 0 and server.server.scheduler.depth() == 0


def test_non_utf8_prompt_and_garbage(server):
    raw = pb.GenerateRequest(prompt="PLACEHOLDER", max_tokens=3).SerializeToString()
    with pytest.raises(grpc.RpcError) as err:
        raw_generate(server, raw.replace(b"PLACEHOLDER", b"bad \xff\xfebytes"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt is not valid UTF-8" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        raw_generate(server, b"\xff\xff\xff garbage")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.decoder.num_used() == 0


def test_client_cancel_mid_stream_frees_slot(model):
    dec = GatedDecoder(model, 1, block_at=3)
    cfg = lm_cfg(generate_slots=1, max_new_tokens=64)
    with GenerationServerThread(cfg, dec) as srv:
        stream = stub(srv).Generate(pb.GenerateRequest(prompt="cancel me", max_tokens=20), timeout=HANG_S)
        got = [next(stream), next(stream)]  # the prefill's token and step 1's
        assert [m.token.index for m in got] == [0, 1]
        wait_until(lambda: dec.steps >= 3, "the decoder reached the gate")
        stream.cancel()
        wait_until(lambda: 'method="Generate",status="CANCELLED"} 1.0' in metrics(srv), "cancel counted")
        dec.gate.set()
        wait_until(lambda: dec.num_used() == 0, "the cancelled generation's slot freed")
        assert 'layerpar_generations_total{reason="cancelled"} 1.0' in metrics(srv)
        dec.block_at = None
        assert run(srv, prompt="next", max_tokens=3)[1].stop_reason == "length"  # the slot is reusable


def test_predict_on_lm_and_generate_on_image_model(server, local_backend):
    with pytest.raises(grpc.RpcError) as err:
        stub(server).Predict(pb.PredictRequest(), timeout=HANG_S)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "language model" in err.value.details()
    info = stub(server).ModelInfo(pb.ModelInfoRequest(), timeout=HANG_S)
    assert info.model_kind == "paraformer_lm" and info.num_branches == 3 and info.max_batch == 2
    from layerpar.serve.server import ServerThread

    with ServerThread(tiny_cfg(), local_backend) as srv:
        with pytest.raises(grpc.RpcError) as err:
            run(srv, prompt="hi", max_tokens=3)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "language model checkpoint" in err.value.details()


def test_health_serving(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    h = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    resp = h.Check(health_pb2.HealthCheckRequest(service="layerpar.v1.Inference"), timeout=HANG_S)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_worker_sigkilled_mid_generation(ray_local):
    """W = 2 workers: SIGKILL one mid-stream; the stream ends UNAVAILABLE, the server rebuilds its
    decoder and serves the next generation; no slot leaks, nothing hangs."""
    from layerpar.serve.lm_source import make_decoder

    cfg = lm_cfg(context=1024, workers=2, generate_slots=2, max_new_tokens=1000)
    lm = build_lm(cfg.model, seed=0)
    dec = make_decoder(cfg, lm)
    with GenerationServerThread(cfg, dec, rebuild=lambda: make_decoder(cfg, lm), workers=2) as srv:
        stream = stub(srv).Generate(pb.GenerateRequest(prompt="kill", max_tokens=1000), timeout=HANG_S)
        assert next(stream).token.index == 0
        os.kill(dec.worker_pids()[1], signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "worker" in err.value.details()
        tokens, done = run(srv, prompt="after", max_tokens=4)
        assert done.stop_reason == "length" and list(done.tokens) == generate(lm, [[BOS, *b"after"]], 4)[0]
        sched = srv.server.scheduler
        assert sched.rebuilds == 1 and sched.decoder.num_used() == 0
        assert 'layerpar_generations_total{reason="error"} 1.0' in metrics(srv)


def test_serve_script_detects_an_lm_checkpoint(tmp_path):
    """launch/serve.py --checkpoint on an LM run: Generate streams, Predict is FAILED_PRECONDITION,
    SIGTERM drains, the last line is JSON."""
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    from tests.unit.test_generate_cli import write_lm_checkpoint

    root = Path(__file__).resolve().parents[2]
    model = write_lm_checkpoint(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, str(root / "launch/serve.py"), "--checkpoint",
                             str(tmp_path / "run"), "--port", "0", "--set", "serve.health_interval_s=0.2"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"\(Generate: paraformer_lm\) on (127\.0\.0\.1:\d+)", line)
        assert match, line + proc.stderr.read()
        s = pb_grpc.InferenceStub(grpc.insecure_channel(match.group(1)))
        msgs = list(s.Generate(pb.GenerateRequest(prompt="for ", max_tokens=5), timeout=HANG_S))
        assert list(msgs[-1].done.tokens) == generate(model, [[BOS, *b"for "]], 5)[0]
        with pytest.raises(grpc.RpcError) as err:
            s.Predict(pb.PredictRequest(), timeout=HANG_S)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert s.ModelInfo(pb.ModelInfoRequest(), timeout=HANG_S).checkpoint_id == "step_0000005@step5"
        proc.send_signal(signal.SIGTERM)
        out, err_text = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err_text
    last = json.loads(out.strip().splitlines()[-1])
    assert last["drained"] and last["requests"]["Generate:OK"] == 1 and last["model_kind"] == "paraformer_lm"


def test_generate_cli_over_two_workers_equals_one_process(ray_local, tmp_path, capsys):
    import json

    from layerpar.serve.generate_cli import generate_main
    from tests.unit.test_generate_cli import write_lm_checkpoint

    model = write_lm_checkpoint(tmp_path / "run")
    args = ["--checkpoint", str(tmp_path / "run"), "--prompt", "while ", "--max-tokens", "6", "--greedy",
            "--quiet", "--set", "parallel.cpus_per_worker=0.5", "--set", "parallel.placement_timeout_s=120"]
    assert generate_main([*args, "--workers", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["workers"] == 2 and out["tokens"] == generate(model, [[BOS, *b"while "]], 6)[0]


def test_worker_sigkilled_stream_continues_under_degraded_allow(ray_local):
    """serve.degraded: allow: the stream survives the SIGKILL (its cache re-filled on a rebuilt
    decoder), marked degraded, with exactly the tokens of an unbroken run."""
    from layerpar.serve.lm_source import make_decoder

    cfg = lm_cfg(context=1024, workers=2, generate_slots=2, max_new_tokens=1000, degraded="allow")
    lm = build_lm(cfg.model, seed=0)
    dec = make_decoder(cfg, lm)
    with GenerationServerThread(cfg, dec, rebuild=lambda: make_decoder(cfg, lm), workers=2) as srv:
        stream = stub(srv).Generate(pb.GenerateRequest(prompt="go", max_tokens=300), timeout=HANG_S)
        assert next(stream).token.index == 0
        os.kill(dec.worker_pids()[0], signal.SIGKILL)
        msgs = list(stream)
        done = msgs[-1].done
        assert done.stop_reason == "length" and done.degraded and done.recoveries == 1
        assert list(done.tokens) == generate(lm, [[BOS, *b"go"]], 300)[0]
        assert msgs[-2].token.degraded and srv.server.scheduler.decoder.num_used() == 0


def test_token_required_when_set(model):
    cfg = lm_cfg(generate_slots=1)
    with GenerationServerThread(cfg, LocalDecoder(model, 1), token="s3cret") as srv:
        with pytest.raises(grpc.RpcError) as err:
            run(srv, prompt="hi", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        msgs = list(stub(srv).Generate(pb.GenerateRequest(prompt="hi", max_tokens=2), timeout=HANG_S,
                                       metadata=[("authorization", "Bearer s3cret")]))
        assert msgs[-1].done.completion_tokens == 2
