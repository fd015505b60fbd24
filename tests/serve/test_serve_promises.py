"""Serving promises without Ray: an explicit full-model request under a latency target,
the batcher's safety net, the operator's prefix floor and what ModelInfo says about it, and the
README's latency-target command on a one-process checkpoint (launch/serve.py as a real process).

    .venv/bin/python -m pytest -q tests/serve/test_serve_promises.py
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from layerpar.serve.batching import Batcher
from layerpar.serve.client import Client, make_request
from layerpar.serve.codec import InputSpec, decode_request
from layerpar.serve.runner import BackendRunner
from layerpar.serve.server import ServerThread
from layerpar.serve.slo import LatencyPlanner
from layerpar.train.local import LocalBackend
from tests.serve.helpers import HANG_S, images, tiny_cfg

ROOT = Path(__file__).resolve().parents[2]


def slow_full_model_planner(**kwargs) -> LatencyPlanner:
    """A real planner that has learned (from recorded calls) that the full model misses a 30 ms
    target and one branch meets it: it answers unset requests with a prefix."""
    planner = LatencyPlanner(slo_ms=30.0, num_branches=4, work=lambda k: k - 1, **kwargs)
    for rows in (1, 2, 1, 2, 1, 2, 1, 2):
        planner.observe(4, rows, 1.0 * rows)  # 1 s a row with every branch
        planner.observe(1, rows, 0.0005 * rows)  # 0.5 ms a row with one
    return planner


def test_an_explicit_full_model_request_is_answered_by_every_branch_under_a_latency_target():
    spec = InputSpec.from_config(tiny_cfg())
    batcher = Batcher(BackendRunner(LocalBackend(tiny_cfg())), max_batch=8, max_wait_ms=0, max_queue=8,
                      planner=slow_full_model_planner())
    try:
        x = images(1, seed=3).numpy()
        unset = decode_request(make_request(x), spec)
        out = batcher.submit(unset.x, unset.num_branches, None, unset.min_branches).result(HANG_S)
        assert out.num_branches == 1, "the planner should cut an unset request (the test's premise)"
        full = decode_request(make_request(x, num_branches=4), spec)
        out = batcher.submit(full.x, full.num_branches, None, full.min_branches).result(HANG_S)
        assert (out.num_branches or 4) == 4, "num_branches = N was answered by a prefix"
    finally:
        batcher.close(HANG_S)


class FailingPlanner(LatencyPlanner):
    """A real planner whose bookkeeping fails after a given number of engine calls."""

    def __init__(self, fail: str, **kwargs):
        super().__init__(**kwargs)
        self.fail = fail

    def observe(self, k, rows, seconds):
        if self.fail == "observe":
            raise RuntimeError("injected: observe failed")
        super().observe(k, rows, seconds)

    def choose(self, **kwargs):
        if self.fail == "choose":
            raise RuntimeError("injected: choose failed")
        return super().choose(**kwargs)


@pytest.mark.parametrize("fail", ["observe", "choose", "on_batch"])
def test_a_fault_after_compute_answers_every_caller_and_keeps_the_slot_running(fail):
    def on_batch(rows, requests):
        if fail == "on_batch":
            raise RuntimeError("injected: metrics failed")

    planner = FailingPlanner(fail, slo_ms=30.0, num_branches=4)
    batcher = Batcher(BackendRunner(LocalBackend(tiny_cfg())), max_batch=8, max_wait_ms=0, max_queue=8,
                      planner=planner, on_batch=on_batch)
    try:
        for seed in range(3):  # one slot: the second and third requests need the same thread alive
            out = batcher.submit(images(2, seed).numpy()).result(HANG_S)
            assert out.logits.shape == (2, 4)
    finally:
        assert batcher.close(HANG_S)


WEAK = [0.46, 0.81, 0.95, 0.98]  # a joint-trained model: one branch alone is weak


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """A one-process checkpoint (parallel.workers 0) with its run's metrics.jsonl beside it."""
    backend = LocalBackend(tiny_cfg())
    run_dir = tmp_path_factory.mktemp("run")
    ckpt = backend.save(run_dir / "checkpoints" / "step_0000000", epoch=1)
    lines = [{"epoch": 1, "step": 0, "val_accuracy": WEAK[-1], "val_prefix_accuracy": WEAK},
             {"epoch": 2, "step": 7, "val_accuracy": 0.5, "val_prefix_accuracy": [0.1, 0.2, 0.3, 0.5]}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir, Path(ckpt), backend


def test_the_server_knows_each_prefix_accuracy_and_keeps_weak_prefixes_out(one_process_run):
    from layerpar.serve.prefixes import prefix_floor, run_prefix_accuracy
    from layerpar.train.checkpoint import read_manifest

    run_dir, ckpt, backend = one_process_run
    acc = run_prefix_accuracy(ckpt, read_manifest(ckpt), 4)
    assert acc is not None and acc.accuracy == WEAK and "epoch 1" in acc.source  # this step's line
    cfg = tiny_cfg(latency_slo_ms=30.0, min_prefix_accuracy=0.9)
    floor = prefix_floor(cfg, acc)
    assert floor.k == 3  # the smallest prefix at least 90% accurate
    assert prefix_floor(tiny_cfg(latency_slo_ms=30.0, min_branches=2), acc).k == 2
    weak = prefix_floor(tiny_cfg(latency_slo_ms=30.0), acc)
    assert weak.k == 1 and any("0.460" in w for w in weak.warnings)  # said at start-up
    with pytest.raises(ValueError, match=r"serve.min_prefix_accuracy \(0.99\) is met by no prefix"):
        prefix_floor(tiny_cfg(latency_slo_ms=30.0, min_prefix_accuracy=0.99), acc)

    with ServerThread(cfg, backend, prefix_accuracy=acc) as srv, Client(srv.address) as client:
        client.wait_ready(HANG_S)
        info = client.model_info()
        assert info["prefix_accuracy"] == pytest.approx(WEAK, abs=1e-6) and info["min_branches"] == 3
        assert (info["replicas"], info["workers_per_replica"]) == (1, 0)

    # the planner honours the floor where it would otherwise answer with one branch
    batcher = Batcher(BackendRunner(backend), max_batch=8, max_wait_ms=0, max_queue=8,
                      planner=slow_full_model_planner(min_branches=floor.k))
    try:
        out = batcher.submit(images(1, seed=5).numpy()).result(HANG_S)
        assert out.num_branches == 3
    finally:
        batcher.close(HANG_S)


def test_the_readme_latency_target_command_serves_a_one_process_checkpoint(one_process_run):
    """`launch/serve.py --checkpoint runs/<run> --set parallel.replicas=2 --set serve.latency_slo_ms=20`
    on a checkpoint trained in one process: 2 groups of 1 worker, the prefix accuracies said."""
    run_dir, _, _ = one_process_run
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch/serve.py"), "--checkpoint", str(run_dir),
         "--set", "parallel.replicas=2", "--set", "serve.latency_slo_ms=20",
         "--port", "0", "--metrics-port", "-1", "--set", "parallel.cpus_per_worker=0.5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"serving layerpar.v1.Inference on (127\.0\.0\.1:\d+)", line)
        assert match, line + proc.stderr.read()
        with Client(match.group(1)) as client:
            client.wait_ready(HANG_S)
            info = client.model_info()
            assert (info["replicas"], info["workers_per_replica"], info["workers"]) == (2, 1, 2)
            assert info["prefix_accuracy"] == pytest.approx(WEAK, abs=1e-6)
            p = client.predict(images(2, seed=1).numpy(), num_branches=4, timeout_s=HANG_S)
            assert p.num_branches == 4
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "2 replica groups of 1 worker" in err and "prefix accuracy (validation, epoch 1" in err, err
    assert json.loads(out.strip().splitlines()[-1])["drained"] is True
