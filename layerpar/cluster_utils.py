"""Small helpers for running on a Ray cluster: which address a driver connects to, how to stop one Ray
node without `ray stop` (which stops every Ray process of the user on the machine), and a check of a
cluster YAML before `ray up`.

    address, why = choose_address(cfg.parallel.address)  # parallel.address, else RAY_ADDRESS, else the
                                                  # running head of a `ray up` cluster, else None
    stop_ray_processes("/tmp/my-ray")             # the node(s) started with --temp-dir=/tmp/my-ray

    python -m layerpar.cluster_utils stop-ray /tmp/my-ray
    python -m layerpar.cluster_utils check cluster/aws.yaml      # before `ray up`: exit 2 if unfilled
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

from layerpar.cluster_check import check_cluster_yaml

# `ray up` writes this into the head node's home directory and starts the head's autoscaler with
# `--autoscaling-config=~/ray_bootstrap_config.yaml`. `ray down` leaves the file behind, so the file
# alone proves nothing: a driver joins only a head whose autoscaler names this file and answers.
BOOTSTRAP_CONFIG = "ray_bootstrap_config.yaml"
CLIENT_SERVER = "ray.util.client.server"  # Ray's client server module (port 10001)


def bootstrap_path() -> Path:
    return Path.home() / BOOTSTRAP_CONFIG


def on_cluster_head() -> bool:
    """True where `ray up` left its bootstrap file (a head node, or one that used to be one)."""
    return bootstrap_path().is_file()


def _flag(cmdline: list[str], name: str) -> str | None:
    """The value of `--name=value` in a command line, if present."""
    prefix = f"--{name}="
    return next((arg[len(prefix):] for arg in cmdline if arg.startswith(prefix)), None)


def running_head(bootstrap: Path | None = None) -> str | None:
    """The GCS address of the running head started with this bootstrap file (its autoscaler monitor
    carries `--autoscaling-config=FILE --gcs-address=HOST:PORT`), or None."""
    psutil = _psutil()
    target = os.path.realpath(bootstrap or bootstrap_path())
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        config, gcs = _flag(cmdline, "autoscaling-config"), _flag(cmdline, "gcs-address")
        if not config or not gcs:
            continue
        try:
            path = _as_the_process_sees_it(proc, config)
        except psutil.Error:  # gone, or another user's
            continue
        if os.path.realpath(path) == target:
            return gcs
    return None


def _as_the_process_sees_it(proc, path: str) -> str:
    """path with `~` expanded by the process's own HOME and made absolute against its cwd, as the
    monitor itself does (`ray start` passes `~/ray_bootstrap_config.yaml` through unexpanded)."""
    if path == "~" or path.startswith("~/"):
        home = proc.environ().get("HOME") or os.path.expanduser("~")
        path = home + path[1:]
    return path if os.path.isabs(path) else os.path.join(proc.cwd(), path)


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `HOST:PORT`, `ray://HOST:PORT` or `http://HOST:PORT`; None for `auto` etc."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def reachable(address: str, timeout_s: float = 5.0) -> bool:
    """Whether something accepts a TCP connection at the address (False if it names no port)."""
    hp = host_port(address)
    if hp is None:
        return False
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            return True
    except OSError:
        return False


def choose_address(address: str | None = None) -> tuple[str | None, str | None]:
    """(the Ray address a driver should use, a note for the user or None). In this order: the explicit
    address (parallel.address / --address; `auto` means this machine's `ray up` head when one runs,
    else Ray's own search), RAY_ADDRESS (set by `ray job submit` and KubeRay), the running and
    reachable head of a `ray up` cluster on this node (`ray submit`). Otherwise None: start a local Ray
    instance, with a note when a leftover bootstrap file was ignored."""
    if address:
        if address == "auto":
            head = running_head() if on_cluster_head() else None
            return (head if head and reachable(head) else "auto"), None
        return address, None
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], None
    if not on_cluster_head():
        return None, None
    head = running_head()
    if head and reachable(head):
        return head, None
    why = (f"its head runs but nothing answers at {head}" if head
           else "no head of that cluster is running here")
    return None, (f"note: ~/{BOOTSTRAP_CONFIG} is left from an earlier `ray up` and {why}; starting a "
                  "local Ray instance (set parallel.address or RAY_ADDRESS to join a cluster; "
                  "docs/CLUSTER.md, \"Teardown\", removes the leftovers)")


def resolve_address(address: str | None = None) -> str | None:
    """choose_address without the note: the address to join, or None to start a local Ray."""
    return choose_address(address)[0]


def _psutil():
    try:
        return importlib.import_module("psutil")
    except ImportError:  # Ray ships its own copy and puts it on sys.path when imported
        importlib.import_module("ray")
        return importlib.import_module("psutil")


def find_processes(path: str | Path) -> list:
    """psutil.Process objects whose command line names path (an argument equal to it or below it),
    plus all their descendants (Ray's dashboard agent renames itself and loses its arguments);
    never this process or its ancestors."""
    psutil = _psutil()
    marker = os.path.realpath(path).rstrip("/")
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        # exact path or a path below it: /tmp/a must not match /tmp/ab
        if any(arg == marker or marker + "/" in arg for arg in cmdline):
            found[proc.pid] = proc
    return _with_descendants(found)


def _with_descendants(found: dict) -> list:
    psutil = _psutil()
    for proc in list(found.values()):
        try:
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            pass
    me = psutil.Process(os.getpid())
    ancestors = {p.pid for p in me.parents()} | {me.pid}
    return [p for pid, p in found.items() if pid not in ancestors]


def node_processes(temp_dir: str | Path) -> list:
    """Every process of the Ray node(s) started with this temp dir: find_processes(temp_dir), plus
    Ray's client server, whose command line names only the node's GCS address (`--address=...`)
    and which `ray start` leaves to init: missed, it keeps port 10001 for about a minute."""
    psutil = _psutil()
    procs = {p.pid: p for p in find_processes(temp_dir)}
    gcs = set()
    for proc in procs.values():
        try:
            value = _flag(proc.cmdline(), "gcs-address")
        except psutil.Error:
            continue
        if value:
            gcs.add(value)
    if gcs:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if any(CLIENT_SERVER in arg for arg in cmdline) and _flag(cmdline, "address") in gcs:
                procs.setdefault(proc.pid, proc)
    return _with_descendants(procs)


def stop_ray_processes(temp_dir: str | Path, *, grace_s: float = 5.0) -> list[int]:
    """Stop the Ray processes of the node(s) started with this temp dir (`ray start --temp-dir`, or the
    dir under TMPDIR/RAY_TMPDIR), client server included: SIGTERM, then SIGKILL after grace_s. Returns
    the pids it signalled. Unlike `ray stop`, other Ray instances on the machine are left alone."""
    psutil = _psutil()
    procs = node_processes(temp_dir)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in procs]


USAGE = ("usage: python -m layerpar.cluster_utils stop-ray TEMP_DIR\n"
         "       python -m layerpar.cluster_utils check CLUSTER_YAML [...]")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "stop-ray":
        t0 = time.perf_counter()
        pids = stop_ray_processes(argv[1])
        print(f"stopped {len(pids)} Ray processes under {argv[1]} in {time.perf_counter() - t0:.1f}s")
        return 0
    if len(argv) >= 2 and argv[0] == "check":
        bad = 0
        for path in argv[1:]:
            problem = check_cluster_yaml(path)
            print(problem or f"{path}: ok (no placeholders left, Ray's schema accepts it)",
                  file=sys.stderr if problem else sys.stdout)
            bad += problem is not None
        return 2 if bad else 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
