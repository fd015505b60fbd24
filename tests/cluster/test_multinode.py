"""Placement across nodes, proven on a multi-node Ray cluster on one machine (a head and two worker
nodes on 127.0.0.1, each its own raylet with 1 CPU, from Ray's multi-node test utility):

- parallel.placement=STRICT_SPREAD puts the 3 branch workers on 3 distinct nodes, and the trained
  model equals the single-process run's (same seed, same data): same test accuracy, same weights;
- STRICT_PACK puts all 3 on one node;
- three serving replica groups (parallel.replicas) land on three distinct nodes and answer alike.

    .venv/bin/python -m pytest -q tests/cluster/test_multinode.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from cluster_helpers import REPO, kill_session, last_json, ray_env, ray_temp_dir, run, tail, train_cmd

from layerpar.cluster_utils import stop_ray_processes
from layerpar.train.checkpoint import load_checkpoint, model_state

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

# The tiny synthetic config (4 branches, 4 classes): 16 steps, seconds of compute, and a model well
# above chance (~0.6 test accuracy), so "the same result" is a statement about a trained model. In
# float64, where the distributed algebra equals the single-process algebra to rounding (~1e-16): a
# float32 comparison sits on reordering noise that AdamW amplifies to ~1e-5 (issue 13).
TRAIN = ["--config", "tiny", "--set", "train.epochs=4", "--set", "model.dtype=float64"]


def _read_first_line(proc: subprocess.Popen, timeout_s: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return box[0] if box else ""


@pytest.fixture(scope="module")
def three_nodes():
    """Head + 2 worker nodes; stopped at the end by closing the helper's stdin (Cluster.shutdown), and
    then by pid for anything left under the cluster's temp dir."""
    root = Path(tempfile.mkdtemp(prefix="lpc-", dir="/tmp"))
    env = ray_env(root)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "cluster" / "multinode_cluster.py"), str(ray_temp_dir(root))],
        env=env, cwd=root, text=True, start_new_session=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = _read_first_line(proc, timeout_s=240)  # three raylets beside the suite on 2 cores
        if not line.startswith("{"):
            proc.kill()
            raise AssertionError(f"the 3-node cluster did not come up:\n{line}{proc.stdout.read()}")
        info = json.loads(line)
        yield {**info, "env": env, "root": root}
    finally:
        try:
            proc.stdin.close()  # the helper shuts its cluster down
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
        stop_ray_processes(ray_temp_dir(root), grace_s=2)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def single_process_run(three_nodes):
    out = run(train_cmd(*TRAIN, "--set", "parallel.workers=0",
                        "--out-dir", str(three_nodes["root"] / "runs-single")),
              env=three_nodes["env"], timeout_s=120)
    assert out.returncode == 0, tail(out.stdout)
    return last_json(out.stdout)


def _cluster_run(nodes: dict, placement: str, name: str, *extra: str) -> dict:
    out = run(train_cmd(*TRAIN, "--set", "parallel.workers=3", "--set", f"parallel.placement={placement}",
                        *extra, "--address", nodes["address"],
                        "--out-dir", str(nodes["root"] / f"runs-{name}")),
              env=nodes["env"], timeout_s=180)
    assert out.returncode == 0, tail(out.stdout)
    summary = last_json(out.stdout)
    assert "worker_nodes" in summary, f"the run summary lists no worker_nodes: {sorted(summary)}"
    assert summary["workers"] == 3 and len(summary["worker_nodes"]) == 3
    return summary


def _weights(summary: dict) -> dict[str, torch.Tensor]:
    return model_state(load_checkpoint(summary["checkpoint"]))


def _assert_same_model(dist: dict, single: dict) -> None:
    assert dist["steps"] == single["steps"]
    assert dist["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-12)
    assert dist["test_loss"] == pytest.approx(single["test_loss"], abs=1e-8)
    assert single["test_accuracy"] >= 0.5  # a trained model: chance is 0.25
    # the saved weights, piece by piece, at float64's parity tolerance
    a, b = _weights(dist), _weights(single)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-10, msg=lambda m, k=key: f"{k}: {m}")


def test_strict_spread_puts_each_worker_on_its_own_node(three_nodes, single_process_run):
    summary = _cluster_run(three_nodes, "STRICT_SPREAD", "spread")
    # three distinct nodes, and exactly the three this test started
    assert len(set(summary["worker_nodes"])) == 3
    assert set(summary["worker_nodes"]) == set(three_nodes["nodes"].values())
    _assert_same_model(summary, single_process_run)


def test_strict_pack_puts_all_workers_on_one_node(three_nodes, single_process_run):
    # 3 x 0.3 CPU fit one 1-CPU node, so STRICT_PACK is satisfiable
    summary = _cluster_run(three_nodes, "STRICT_PACK", "pack", "--set", "parallel.cpus_per_worker=0.3")
    assert len(set(summary["worker_nodes"])) == 1
    assert summary["worker_nodes"][0] in three_nodes["nodes"].values()
    _assert_same_model(summary, single_process_run)


REPLICAS_DRIVER = """
import json, sys, torch
from layerpar.config import load_config
from layerpar.runtime.replicas import ReplicaSet
from layerpar.train.local import LocalBackend
cfg = load_config("tiny", ["parallel.workers=1", "parallel.replicas=3", "parallel.cpus_per_worker=0.3",
                           "parallel.placement=PACK", "parallel.address=" + sys.argv[1]])
x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
want = LocalBackend(load_config("tiny")).infer(x)
with ReplicaSet(cfg) as rs:
    diffs = [float((rs.infer(x) - want).abs().max()) for _ in range(6)]
    print(json.dumps({"nodes": rs.info()["nodes"], "calls": rs.calls, "max_diff": max(diffs)}))
"""


def test_replica_groups_spread_over_the_nodes(three_nodes):
    # 3 groups of one 0.3-CPU worker would all fit one node: PACK alone may stack them; the replica
    # set pins each group to its own node, and every group answers like the single process
    out = run([sys.executable, "-c", REPLICAS_DRIVER, three_nodes["address"]], env=three_nodes["env"],
              timeout_s=180)
    assert out.returncode == 0, tail(out.stdout)
    got = last_json(out.stdout)
    assert sorted(got["nodes"]) == sorted(three_nodes["nodes"].values()), got
    assert all(c >= 1 for c in got["calls"]) and got["max_diff"] < 1e-5, got
