"""In the embedded default (local Ray, every worker on the driver's node) no worker process and not
the driver opens a listening TCP socket beyond loopback: the worker group meets through a file and
gloo's sockets are bound to 127.0.0.1 (layerpar/parallel/process_group.py, docs/NETWORK.md).

Listening sockets are read from /proc/net/tcp{,6} and matched to a process through the socket
inodes in /proc/<pid>/fd. Ray's own daemons (raylet, GCS) are not this project's and not checked.

    .venv/bin/python -m pytest -q tests/ray/test_listeners.py
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest
import torch

from layerpar.config import load_config

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")]

LISTEN = "0A"  # TCP state in /proc/net/tcp


def _address(hex_addr: str) -> tuple[str, int]:
    """/proc/net/tcp{,6} writes addresses as host-order 32-bit words in hex."""
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words)), int(port, 16)


def listening_sockets() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket in this network namespace."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN:
                out[int(fields[9])] = _address(fields[1])
    return out


def listeners_of(pid: int) -> list[tuple[str, int]]:
    table = listening_sockets()
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inode = int(target[len("socket:["):-1])
            if inode in table:
                found.append(table[inode])
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_the_parser_sees_a_listener_on_all_interfaces_and_one_on_loopback():
    """The check below can fail: a socket on 0.0.0.0 is found as such, one on 127.0.0.1 as loopback."""
    with socket.socket() as wide, socket.socket() as narrow:
        wide.bind(("0.0.0.0", 0))
        narrow.bind(("127.0.0.1", 0))
        wide.listen()
        narrow.listen()
        mine = listeners_of(os.getpid())
        assert ("0.0.0.0", wide.getsockname()[1]) in mine
        assert ("127.0.0.1", narrow.getsockname()[1]) in mine
    assert not is_loopback("0.0.0.0") and is_loopback("127.0.0.1") and is_loopback("::1")


def test_workers_and_driver_listen_on_loopback_only(local_ray, one_thread):
    from layerpar.runtime import Engine

    cfg = load_config("tiny", ["parallel.workers=2", "parallel.cpus_per_worker=0.5",
                               "parallel.transport=collective"])
    with Engine(cfg) as engine:
        x = torch.randn(2, 1, 8, 8)
        engine.infer(x)  # the process group is formed and the fast path runs
        pids = engine.worker_pids()
        found = {pid: listeners_of(pid) for pid in [*pids, os.getpid()]}
    wide = {pid: [a for a in listeners if not is_loopback(a[0])] for pid, listeners in found.items()}
    assert all(not w for w in wide.values()), f"listening beyond loopback (pid: [(address, port)]): {wide}"
    assert any(found[pid] for pid in pids), "no worker listens at all: the check saw nothing"
