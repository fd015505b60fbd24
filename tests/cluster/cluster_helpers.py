"""Shared pieces of the cluster tests: an isolated environment for every Ray process a test starts
(loopback, its own auth token and temp dir), free ports, subprocesses that cannot outlive their
timeout, and the last JSON line of a run.

Isolation matters here: other Ray instances may run on the same machine, so nothing below uses a fixed
port, the default /tmp/ray, ~/.ray/auth_token or a global `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests has layerpar and ray
RAY = str(VENV_BIN / "ray")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for every process of one test cluster: Ray on loopback, token auth with a token of
    this test's own, TMPDIR under root (so Ray's default temp dir, `ray up`'s state files and its
    config cache are this test's own), and the venv first on PATH."""
    token = root / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    (root / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        TMPDIR=str(root / "tmp"),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def ray_temp_dir(root: Path) -> Path:
    """Ray's default temp dir for processes started with ray_env(root)."""
    return root / "tmp" / "ray"


def run(cmd: list[str], *, env: dict[str, str], timeout_s: float, cwd: Path = REPO,
        stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run cmd in a session of its own; on timeout kill the whole session (daemons included) and
    fail with the output so far."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, start_new_session=True,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[:4])} ... timed out after {timeout_s}s:\n{tail(out)}") \
            from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def kill_session(pid: int) -> None:
    """SIGKILL the process group led by pid (a process started with start_new_session=True)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def tail(text: str, lines: int = 40) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


def last_json(text: str) -> dict:
    """The last line of text that is a JSON object (the run summary of launch/train.py)."""
    for line in reversed((text or "").splitlines()):
        line = line.strip().strip("\r")
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON line in the output:\n{tail(text)}")


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "train.py"), *args]


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
