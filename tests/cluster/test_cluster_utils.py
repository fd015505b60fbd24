"""layerpar.cluster_utils: the address a driver picks (a leftover `~/ray_bootstrap_config.yaml` is not a
cluster), and stopping one node's processes by pid -- Ray's client server included -- without touching
anything else on the machine.

    .venv/bin/python -m pytest -q tests/cluster/test_cluster_utils.py
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import ray_env, run, start_head, tail, train_cmd

from layerpar.cluster_utils import (
    CLIENT_SERVER,
    _psutil,
    choose_address,
    find_processes,
    main,
    node_processes,
    resolve_address,
    running_head,
    stop_ray_processes,
)

pytestmark = pytest.mark.cluster


@pytest.fixture
def home(monkeypatch, tmp_path):
    """A private HOME with no RAY_ADDRESS: what a plain local run sees."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _fake_monitor(home: Path, gcs: str) -> subprocess.Popen:
    """A process with the command line of a `ray up` head's autoscaler monitor run with this HOME."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)",
         "--autoscaling-config=~/ray_bootstrap_config.yaml", f"--gcs-address={gcs}"],
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, cwd=home)


def _wait_for(predicate, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    return predicate()


def test_address_precedence(home, monkeypatch):
    """The choice of address; that a run then trains on its own local Ray beside a leftover bootstrap
    file is proven end to end after a real `ray down` (tests/cluster/test_ray_submit.py)."""
    assert choose_address(None) == (None, None)  # nothing named, no bootstrap: start a local Ray
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")  # left by `ray up` + `ray down`
    address, note = choose_address(None)
    assert address is None  # the old code answered "auto" here, and joined whatever it found
    assert "ray_bootstrap_config.yaml" in note and "no head of that cluster is running" in note
    assert resolve_address(None) is None
    assert choose_address("auto") == ("auto", None)  # told to: Ray's own search
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` sets for its driver
    assert choose_address(None) == ("127.0.0.1:6379", None)
    assert resolve_address("ray://head:10001") == "ray://head:10001"  # --address wins


def test_the_running_head_of_this_bootstrap_is_joined_and_no_other(home, tmp_path_factory):
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    gcs_sock = _listener()
    gcs = f"127.0.0.1:{gcs_sock.getsockname()[1]}"
    other_home = tmp_path_factory.mktemp("other-home")  # another cluster's head on this machine
    other = _fake_monitor(other_home, "127.0.0.1:1")
    ours = _fake_monitor(home, gcs)
    try:
        assert _wait_for(running_head) == gcs  # ours, never the other head's
        assert choose_address(None) == (gcs, None)  # `ray submit` on a live head: join it
        assert choose_address("auto") == (gcs, None)  # `auto` on a head means this cluster
        gcs_sock.close()  # the head's GCS no longer answers
        address, note = choose_address(None)
        assert address is None and f"nothing answers at {gcs}" in note
        ours.kill()
        ours.wait(timeout=30)
        assert running_head() is None  # the other head is not ours
    finally:
        gcs_sock.close()
        for proc in (ours, other):
            proc.kill()
            proc.wait(timeout=30)


def test_an_unreachable_address_is_one_sentence_and_exit_2(cluster_root):
    dead = _listener()
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there now
    out = run(train_cmd("--config", "tiny", "--set", "parallel.workers=2", "--address", f"127.0.0.1:{port}",
                        "--out-dir", str(cluster_root / "runs")),
              env=ray_env(cluster_root), timeout_s=120)
    assert out.returncode == 2, tail(out.stdout)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Ray cluster at"), tail(out.stdout)
    assert "parallel.address" in lines[0] and "Traceback" not in out.stdout


def _sleeper(*args: str) -> subprocess.Popen:
    """A python process whose command line carries args, with one child of its own."""
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    return subprocess.Popen([sys.executable, "-c", code, *args])


def test_stop_ray_processes_stops_only_the_named_dir(tmp_path):
    mine = tmp_path / "ray"
    other = tmp_path / "ray-other"  # a prefix match must not count
    ours = _sleeper(f"--temp-dir={mine}", f"--log-dir={mine}/session_1/logs")
    theirs = _sleeper(f"--temp-dir={other}")
    try:
        _wait_for(lambda: len(find_processes(mine)) >= 2)  # the child has started
        found = {p.pid for p in find_processes(mine)}
        assert ours.pid in found and theirs.pid not in found and len(found) == 2
        stopped = stop_ray_processes(mine, grace_s=2)
        assert set(stopped) == found
        assert ours.wait(timeout=10) is not None
        assert theirs.poll() is None  # untouched
        assert find_processes(mine) == []
    finally:
        for proc in (ours, theirs):
            proc.kill()
        stop_ray_processes(other, grace_s=1)


def _client_servers(gcs: str) -> list:
    """Live Ray client servers of the node whose GCS is at gcs."""
    found = []
    for proc in _psutil().process_iter(["cmdline"]):  # Ray's vendored psutil
        cmdline = proc.info.get("cmdline") or []
        if any(CLIENT_SERVER in arg for arg in cmdline) and f"--address={gcs}" in cmdline:
            found.append(proc)
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_stop_ray_stops_the_client_server_too(cluster_root):
    """`ray start --head --temp-dir=D`, then `stop-ray D`: every process of that node is signalled,
    Ray's client server included (its command line names only the GCS address; the old helper left it
    holding the client port for about a minute), and the client port comes free."""
    head = start_head(cluster_root, num_cpus=1, dashboard=False)
    try:
        servers = _wait_for(lambda: _client_servers(head["gcs"]))
        assert servers, "the head started no client server"
        server_pids = {p.pid for p in servers}
        stopped = set(stop_ray_processes(head["temp_dir"], grace_s=2))
        assert server_pids <= stopped, f"stop-ray left the client server {server_pids - stopped}"
        gone = _wait_for(lambda: not _client_servers(head["gcs"]) and not node_processes(head["temp_dir"]))
        assert gone, [(p.pid, p.info.get("cmdline")) for p in _client_servers(head["gcs"])]
        assert _wait_for(lambda: _port_free(head["client_port"])), "the client port is still held"
    finally:
        stop_ray_processes(head["temp_dir"], grace_s=2)
        for proc in _client_servers(head["gcs"]):
            proc.kill()


def test_cli_usage_is_exit_2(capsys):
    assert main([]) == 2 and "usage:" in capsys.readouterr().err
