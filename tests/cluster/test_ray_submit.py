"""`ray up` / `ray submit` / `ray down` with cluster/local.yaml on this one machine, over a real sshd.

The test follows the one-machine steps in cluster/local.yaml's header (openssh-server and rsync, a key
of its own authorised for login, the venv on the login shell's PATH, `ray get-auth-token --generate`),
then runs the three commands exactly as documented. Differences, all for sharing the machine safely:

- sshd runs in inetd mode (`sshd -i`, one per connection, through the YAML's ssh_proxy_command), with a
  config of its own, instead of a daemon on port 22: nothing listens, nothing is left running, and
  concurrent runs cannot collide;
- every login lands in a private HOME under the test's temp dir (sshd's ForceCommand), so
  ~/.bashrc, ~/ray_bootstrap_config.yaml and the copied script stay out of the real home;
- the head gets free ports instead of 6379/8265/..., and `ray stop` (in head_start_ray_commands and
  in `ray down`) is a shim that stops this cluster's processes only: a real `ray stop` stops every
  Ray process of the user on the machine.

Skipped, with the reason, only where sshd cannot be installed or started.

    .venv/bin/python -m pytest -q tests/cluster/test_ray_submit.py
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from cluster_helpers import RAY, REPO, VENV_BIN, free_ports, last_json, ray_env, ray_temp_dir, run, tail

from layerpar.cluster_utils import find_processes, stop_ray_processes

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

SSHD = "/usr/sbin/sshd"


def _ensure_sshd_and_rsync() -> None:
    """Install openssh-server and rsync where missing (root with apt only); else skip, saying why."""
    if Path(SSHD).exists() and shutil.which("rsync") and shutil.which("ssh"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("sshd/rsync are not installed and cannot be installed here (needs root and apt-get)")
    install = ["apt-get", "install", "-y", "-q", "openssh-server", "openssh-client", "rsync"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    ok = subprocess.run(install, env=env, capture_output=True, timeout=300).returncode == 0
    if not ok:  # a fresh machine may need the package lists first
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        ok = subprocess.run(install, env=env, capture_output=True, timeout=300).returncode == 0
    if not (ok and Path(SSHD).exists() and shutil.which("rsync")):
        pytest.skip("could not install openssh-server and rsync with apt-get")


def _ssh_setup(root: Path, home: Path) -> tuple[Path, Path]:
    """The documented key-based login, plus an sshd config of the test's own. Returns (key, config)."""
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True, mode=0o700)
    key = ssh_dir / "layerpar_cluster"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (ssh_dir / "authorized_keys").write_text((ssh_dir / "layerpar_cluster.pub").read_text())
    (ssh_dir / "authorized_keys").chmod(0o600)
    sshd_dir = root / "sshd"
    sshd_dir.mkdir()
    host_key = sshd_dir / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    session = sshd_dir / "session.sh"
    # every login: the private HOME, then the command Ray sent (or a login shell)
    session.write_text(
        "#!/bin/bash\n"
        f"export HOME={home}\n"
        'cd "$HOME" || exit 1\n'
        'if [ -n "$SSH_ORIGINAL_COMMAND" ]; then exec /bin/bash -c "$SSH_ORIGINAL_COMMAND"; fi\n'
        "exec /bin/bash -l\n")
    session.chmod(0o755)
    config = sshd_dir / "sshd_config"
    config.write_text("\n".join([
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {ssh_dir / 'authorized_keys'}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",  # the key lives under /tmp, which is world-writable
        f"ForceCommand {session}",
        "LogLevel ERROR",
        "",
    ]))
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"sshd cannot be started here: {check.stderr.strip()}")
    return key, config


def _login_shell(root: Path, home: Path) -> None:
    """The one-machine step "login shells find the venv with layerpar", plus this test's isolation:
    Ray's temp dir under root, and `ray stop` scoped to this cluster."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "ray"
    shim.write_text(
        "#!/bin/sh\n"
        "# `ray stop` stops every Ray process of the user on the machine; stop this cluster's only\n"
        f'if [ "$1" = stop ]; then exec {VENV_BIN / "python"} -m layerpar.cluster_utils stop-ray '
        f"{ray_temp_dir(root)}; fi\n"
        f'exec {VENV_BIN / "ray"} "$@"\n')
    shim.chmod(0o755)
    (home / ".bashrc").write_text(
        f'export PATH="{VENV_BIN}:$PATH"\n'  # the documented step
        f'export TMPDIR="{root / "tmp"}" PATH="{bin_dir}:$PATH"\n')  # test isolation


def _test_yaml(root: Path, key: Path, sshd_config: Path) -> Path:
    """cluster/local.yaml with this test's login (key, sshd -i) and free ports."""
    cfg = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    cfg["cluster_name"] = f"layerpar-test-{uuid.uuid4().hex[:8]}"
    cfg["auth"] = {"ssh_user": getpass.getuser(),
                   "ssh_private_key": str(key),  # ssh expands ~ from the passwd entry, not $HOME
                   "ssh_proxy_command": f"{SSHD} -i -f {sshd_config}"}
    gcs, dash, client, agent, agent_grpc, rt_agent, metrics = free_ports(7)
    start = cfg["head_start_ray_commands"][-1]
    assert "--port=6379" in start
    cfg["head_start_ray_commands"][-1] = start.replace("--port=6379", (
        f"--port={gcs} --num-cpus=2 --include-dashboard=false --dashboard-port={dash} "
        f"--ray-client-server-port={client} --dashboard-agent-listen-port={agent} "
        f"--dashboard-agent-grpc-port={agent_grpc} --runtime-env-agent-port={rt_agent} "
        f"--metrics-export-port={metrics}"))
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _kill_processes_naming(path: str | Path) -> None:
    """The ssh ControlMaster Ray leaves behind (it daemonises, ControlPersist 10 s) and its sshd -i."""
    for proc in find_processes(path):
        try:
            proc.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass


def test_ray_up_submit_down_on_one_machine(cluster_root):
    _ensure_sshd_and_rsync()
    root, home = cluster_root, cluster_root / "home"
    key, sshd_config = _ssh_setup(root, home)
    _login_shell(root, home)
    cluster_yaml = _test_yaml(root, key, sshd_config)
    env = ray_env(root, HOME=str(home))
    env.pop("RAY_AUTH_TOKEN_PATH")  # this test uses the documented ~/.ray/auth_token
    name = yaml.safe_load(cluster_yaml.read_text())["cluster_name"]
    # where Ray's ssh keeps its ControlMaster socket for this cluster (command_runner.py)
    user_hash = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    control_dir = f"/tmp/ray_ssh_{user_hash}/{hashlib.sha256(name.encode()).hexdigest()[:10]}"
    try:
        login = run(["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                     "-o", "UserKnownHostsFile=/dev/null", "-o", f"ProxyCommand={SSHD} -i -f {sshd_config}",
                     f"{getpass.getuser()}@127.0.0.1", "echo $HOME"], env=env, timeout_s=30)
        if login.returncode != 0 or str(home) not in login.stdout:
            pytest.skip(f"sshd cannot be started here: {tail(login.stdout, 5)}")

        token = run([RAY, "get-auth-token", "--generate"], env=env, timeout_s=60)
        assert token.returncode == 0 and (home / ".ray" / "auth_token").is_file(), tail(token.stdout)

        up = run([RAY, "up", "-y", "--no-config-cache", "--log-style", "record", str(cluster_yaml)],
                 env=env, timeout_s=180)
        assert up.returncode == 0, f"ray up failed:\n{tail(up.stdout, 60)}"
        # setup_commands ran on the "node": the login shell's environment file, the synced package
        assert "RAY_AUTH_MODE=token" in (home / ".layerpar_env").read_text()
        assert (home / "layerpar-src" / "layerpar" / "config.py").is_file()
        assert not (home / "layerpar-src" / ".venv").exists()
        assert (home / "ray_bootstrap_config.yaml").is_file()

        submit = run([RAY, "submit", str(cluster_yaml), "launch/train.py", "--",
                      "--config", "digits", "--set", "train.epochs=1", "--set", "data.limit_train=256",
                      "--set", "train.threads=1", "--set", "parallel.workers=2",
                      "--address", "auto", "--out-dir", "runs"], env=env, timeout_s=180)
        assert submit.returncode == 0, f"ray submit failed:\n{tail(submit.stdout, 60)}"
        summary = last_json(submit.stdout)
        assert summary["workers"] == 2 and summary["dataset"] == "digits"
        assert len(summary["worker_nodes"]) == 2 and len(set(summary["worker_nodes"])) == 1
        run_dir = Path(summary["run_dir"])
        if not run_dir.is_absolute():
            run_dir = home / run_dir  # relative to the login's working directory, the home
        assert run_dir.parent == home / "runs" and (run_dir / "result.json").is_file()
        assert (home / "train.py").is_file()  # `ray submit` copied the one script to the home

        down = run([RAY, "down", "-y", str(cluster_yaml)], env=env, timeout_s=120)
        assert down.returncode == 0, f"ray down failed:\n{tail(down.stdout, 40)}"
        assert find_processes(ray_temp_dir(root)) == [], "ray down left Ray processes running"
    finally:
        stop_ray_processes(ray_temp_dir(root), grace_s=2)
        _kill_processes_naming(control_dir)
        _kill_processes_naming(sshd_config)
        shutil.rmtree(control_dir, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(control_dir))  # only if no other cluster of this user uses it
        except OSError:
            pass
