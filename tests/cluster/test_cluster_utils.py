"""layerpar.cluster_utils: the address a driver picks, and stopping one node's processes by pid without
touching anything else on the machine.

    .venv/bin/python -m pytest -q tests/cluster/test_cluster_utils.py
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from layerpar.cluster_utils import find_processes, resolve_address, stop_ray_processes

pytestmark = pytest.mark.cluster


def test_address_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None  # nothing running: start a local Ray instance
    (tmp_path / "ray_bootstrap_config.yaml").write_text("{}\n")  # what `ray up` leaves on the head
    assert resolve_address(None) == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` sets for its driver
    assert resolve_address(None) == "127.0.0.1:6379"
    assert resolve_address("ray://head:10001") == "ray://head:10001"  # --address wins


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
        deadline = time.time() + 20
        while len(find_processes(mine)) < 2 and time.time() < deadline:  # the child has started
            time.sleep(0.1)
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
