"""Small helpers for running on a Ray cluster: which address a driver connects to, and how to stop one
Ray node without `ray stop` (which stops every Ray process of the user on the machine).

    address = resolve_address(args.address)     # --address, else RAY_ADDRESS, else "auto" on a
                                                # `ray up` head node, else None (start a local Ray)
    stop_ray_processes("/tmp/my-ray")           # the node(s) started with --temp-dir=/tmp/my-ray

    python -m layerpar.cluster_utils stop-ray /tmp/my-ray
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from pathlib import Path

# `ray up` writes this into the head node's home directory; its presence means "this is the head node
# of a cluster-launcher cluster", where a driver should join the running cluster rather than start one.
BOOTSTRAP_CONFIG = "ray_bootstrap_config.yaml"


def on_cluster_head() -> bool:
    """True on the head node of a cluster started by `ray up` (where `ray submit` runs scripts)."""
    return (Path.home() / BOOTSTRAP_CONFIG).is_file()


def resolve_address(address: str | None = None) -> str | None:
    """The Ray address a driver should use: the explicit one (`--address`), else `RAY_ADDRESS` (set by
    `ray job submit` and KubeRay), else "auto" on a `ray up` head node (`ray submit`), else None, which
    means "start a local Ray instance in this process"."""
    if address:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    if on_cluster_head():
        return "auto"
    return None


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
    me = os.getpid()
    ancestors = {p.pid for p in psutil.Process(me).parents()} | {me}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        # exact path or a path below it: /tmp/a must not match /tmp/ab
        if any(arg == marker or marker + "/" in arg for arg in cmdline):
            found[proc.pid] = proc
    for proc in list(found.values()):
        try:
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            pass
    return [p for pid, p in found.items() if pid not in ancestors]


def stop_ray_processes(temp_dir: str | Path, *, grace_s: float = 5.0) -> list[int]:
    """Stop the Ray processes of the node(s) started with this temp dir (`ray start --temp-dir`, or the
    dir under TMPDIR/RAY_TMPDIR): SIGTERM, then SIGKILL after grace_s. Returns the pids it signalled.
    Unlike `ray stop`, other Ray instances on the machine are left alone."""
    psutil = _psutil()

    procs = find_processes(temp_dir)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "stop-ray":
        print("usage: python -m layerpar.cluster_utils stop-ray TEMP_DIR", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    pids = stop_ray_processes(argv[1])
    print(f"stopped {len(pids)} Ray processes under {argv[1]} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
