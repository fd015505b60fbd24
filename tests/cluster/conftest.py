"""Fixtures of the cluster tests: a short private temp root, and a `ray start --head` node on
127.0.0.1 that is stopped by pid (never a global `ray stop`: other Ray instances share the machine)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from cluster_helpers import RAY, free_ports, ray_env, ray_temp_dir, run, tail

from layerpar.cluster_utils import stop_ray_processes


def _private_root() -> Path:
    # Short and under /tmp: Ray's unix sockets live below it and their paths must stay < 108 bytes.
    return Path(tempfile.mkdtemp(prefix="lpc-", dir="/tmp"))


@pytest.fixture
def cluster_root():
    root = _private_root()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def start_head(root: Path, *, num_cpus: int, dashboard: bool) -> dict:
    """`ray start --head` on 127.0.0.1 with every port chosen free; returns addresses and env."""
    env = ray_env(root)
    gcs, dash, client, agent, agent_grpc, rt_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--num-cpus={num_cpus}", f"--temp-dir={ray_temp_dir(root)}",
           f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
           "--disable-usage-stats"]
    out = run(cmd, env=env, timeout_s=90)
    assert out.returncode == 0, f"ray start --head failed:\n{tail(out.stdout)}"
    return {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env,
            "temp_dir": ray_temp_dir(root), "root": root, "client_port": client}


def _head(root: Path):
    """A one-node cluster from `ray start --head` with the dashboard (job API) on a free port."""
    try:
        yield start_head(root, num_cpus=3, dashboard=True)
    finally:
        # by pid: the processes whose command line names this head's temp dir, and their children
        stop_ray_processes(ray_temp_dir(root), grace_s=2)


@pytest.fixture
def ray_head(cluster_root):
    yield from _head(cluster_root)


@pytest.fixture(scope="module")
def module_ray_head():
    """The same head, shared by a module's tests (each must leave it as it found it: no jobs or
    actors left behind, nothing that tests after it would count)."""
    root = _private_root()
    try:
        yield from _head(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
