"""`ray up` / `ray submit` / `ray down` with cluster/local.yaml on this one machine, over a real sshd.

The test follows the one-machine steps in cluster/local.yaml's header (openssh-server and rsync, which
`make setup` installs; a key of its own authorised for login, the venv on the login shell's PATH,
`ray get-auth-token --generate`), then runs the documented commands. Differences, all for sharing the
machine safely:

- sshd runs in inetd mode (`sshd -i`, one per connection, through the YAML's ssh_proxy_command), with a
  config of its own, instead of a daemon on port 22: nothing listens, nothing is left running, and
  concurrent runs cannot collide;
- every login lands in a private HOME under the test's temp dir (sshd's ForceCommand), so
  ~/.bashrc, ~/ray_bootstrap_config.yaml and the copied script stay out of the real home;
- the head gets free ports instead of 6379/8265/... and a temp dir under the test's root instead of
  /tmp/ray-layerpar-local (the YAML's own port flags and temp dir, rewritten);
- a guard `ray` on PATH refuses a bare `ray stop` (which as root stops every Ray instance on the
  machine) and records it: the YAML must never run one, `ray down` included.

It also checks what issue 14 item 9 is about: `ray submit` without --address joins the running head,
and after `ray down` a plain local run in the same home (the bootstrap file left behind) trains on a
local Ray of its own. Skipped only where `make setup` cannot install sshd (not root, or no apt-get);
a failed login is a failure.

    .venv/bin/python -m pytest -q tests/cluster/test_ray_submit.py
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from cluster_helpers import RAY, REPO, VENV_BIN, free_ports, last_json, ray_env, ray_temp_dir, run, tail

from layerpar.cluster_utils import find_processes, node_processes, stop_ray_processes

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

SSHD = "/usr/sbin/sshd"


def _require_sshd_and_rsync() -> None:
    """sshd, ssh and rsync come from `make setup` (target cluster-tools, root with apt-get only)."""
    if Path(SSHD).exists() and shutil.which("rsync") and shutil.which("ssh"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("sshd/rsync are not installed and `make setup` cannot install them here "
                    "(its cluster-tools target needs root and apt-get)")
    pytest.fail("sshd, ssh or rsync is missing: run `make setup` (its cluster-tools target installs "
                "openssh-server, openssh-client and rsync with apt-get)")


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
    assert check.returncode == 0, f"sshd rejects the test's config: {check.stderr.strip()}"
    return key, config


def _login_shell(root: Path, home: Path) -> Path:
    """The one-machine step "login shells find the venv with layerpar", plus this test's isolation:
    Ray's temp dir under root, and a guard that refuses (and records) a bare `ray stop`, which would
    stop every Ray instance on the machine. Returns the guard's record file."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    record = root / "bare-ray-stop-was-run"
    shim = bin_dir / "ray"
    shim.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = stop ]; then echo "ray $*" >> {record}; exit 1; fi\n'
        f'exec {VENV_BIN / "ray"} "$@"\n')
    shim.chmod(0o755)
    (home / ".bashrc").write_text(
        f'export PATH="{VENV_BIN}:$PATH"\n'  # the documented step
        f'export TMPDIR="{root / "tmp"}" PATH="{bin_dir}:$PATH"\n')  # test isolation
    return record


def _set_flag(cmd: str, flag: str, value: object) -> str:
    """cmd with `--flag=VALUE` set to value (replaced where the YAML writes it, else appended)."""
    new, n = re.subn(rf"--{flag}=\S+", f"--{flag}={value}", cmd)
    return new if n else f"{cmd} --{flag}={value}"


def _test_yaml(root: Path, key: Path, sshd_config: Path) -> Path:
    """cluster/local.yaml with this test's login (key, sshd -i), free ports and temp dir."""
    text = (REPO / "cluster" / "local.yaml").read_text()
    assert "/tmp/ray-layerpar-local" in text
    cfg = yaml.safe_load(text.replace("/tmp/ray-layerpar-local", str(ray_temp_dir(root))))
    cfg["cluster_name"] = f"layerpar-test-{uuid.uuid4().hex[:8]}"
    cfg["auth"] = {"ssh_user": getpass.getuser(),
                   "ssh_private_key": str(key),  # ssh expands ~ from the passwd entry, not $HOME
                   "ssh_proxy_command": f"{SSHD} -i -f {sshd_config}"}
    start = cfg["head_start_ray_commands"][-1]
    assert "--port=6379" in start and "--dashboard-agent-listen-port=52365" in start
    flags = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    for flag, port in zip(flags, free_ports(len(flags)), strict=True):
        start = _set_flag(start, flag, port)
    cfg["head_start_ray_commands"][-1] = f"{start} --num-cpus=2 --include-dashboard=false"
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


def _stale_bootstrap_run_trains_locally(root: Path, home: Path) -> None:
    """After `ray down` the home still holds ~/ray_bootstrap_config.yaml: a plain run there trains on
    a local Ray instance of its own and says why (the old code tried address=auto and failed)."""
    assert (home / "ray_bootstrap_config.yaml").is_file()
    local = root / "local"
    local.mkdir()
    env = ray_env(local, HOME=str(home))
    out = run([str(VENV_BIN / "python"), str(REPO / "launch" / "train.py"), "--config", "tiny",
               "--set", "parallel.workers=1", "--set", "train.epochs=1", "--out-dir", str(local / "runs")],
              env=env, timeout_s=180)
    stop_ray_processes(ray_temp_dir(local), grace_s=2)
    assert out.returncode == 0, f"the local run after `ray down` failed:\n{tail(out.stdout)}"
    summary = last_json(out.stdout)
    assert summary["workers"] == 1 and summary["steps"] > 0  # on Ray Train (workers >= 1), locally
    notes = [line for line in out.stdout.splitlines() if "ray_bootstrap_config.yaml" in line]
    assert len(notes) == 1 and "starting a local Ray instance" in notes[0], tail(out.stdout)


def test_ray_up_submit_down_on_one_machine(cluster_root):
    _require_sshd_and_rsync()
    root, home = cluster_root, cluster_root / "home"
    key, sshd_config = _ssh_setup(root, home)
    bare_stops = _login_shell(root, home)
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
        assert login.returncode == 0 and str(home) in login.stdout, \
            f"the key-based ssh login through sshd -i failed:\n{tail(login.stdout, 10)}"

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
                      "--out-dir", "runs"], env=env, timeout_s=180)  # no --address: it finds the head
        assert submit.returncode == 0, f"ray submit failed:\n{tail(submit.stdout, 60)}"
        summary = last_json(submit.stdout)
        assert summary["workers"] == 2 and summary["dataset"] == "digits"
        assert len(summary["worker_nodes"]) == 2 and len(set(summary["worker_nodes"])) == 1
        run_dir = Path(summary["run_dir"])
        if not run_dir.is_absolute():
            run_dir = home / run_dir  # relative to the login's working directory, the home
        assert run_dir.parent == home / "runs" and (run_dir / "result.json").is_file()
        assert (home / "train.py").is_file()  # `ray submit` copied the one script to the home
        assert "left from an earlier `ray up`" not in submit.stdout  # it joined the running head

        down = run([RAY, "down", "-y", str(cluster_yaml)], env=env, timeout_s=120)
        assert down.returncode == 0, f"ray down failed:\n{tail(down.stdout, 40)}"
        assert node_processes(ray_temp_dir(root)) == [], "ray down left Ray processes running"
        assert not bare_stops.exists(), f"the YAML ran a bare `ray stop`: {bare_stops.read_text()}"
        _stale_bootstrap_run_trains_locally(root, home)
    finally:
        stop_ray_processes(ray_temp_dir(root), grace_s=2)
        _kill_processes_naming(control_dir)
        _kill_processes_naming(sshd_config)
        shutil.rmtree(control_dir, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(control_dir))  # only if no other cluster of this user uses it
        except OSError:
            pass
