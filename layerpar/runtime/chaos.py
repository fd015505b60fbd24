"""Kill a branch worker with SIGKILL at a chosen moment, during serving or training.

By hand, next to a running `launch/serve.py` or `launch/train.py` (any engine on the Ray cluster):

    python launch/chaos.py --list                         # every engine's workers: rank, pid, node
    python launch/chaos.py --rank 1                       # SIGKILL worker 1 now
    python launch/chaos.py --rank 1 --after 10            # ... in 10 seconds
    python launch/chaos.py --rank 0 --engine 3fa2c1d0     # when several engines run
    python launch/chaos.py --pid 12345 --after 2          # any process on this machine
    python launch/chaos.py --rank 1 --address 127.0.0.1:6379

The engine names its actors `layerpar-<engine id>-w<rank>.<generation>`; this script finds them on
the cluster (--address, default RAY_ADDRESS or `auto`: the newest cluster on this machine), asks the
worker for its pid and node, and kills it there (on another node through a one-off Ray task pinned to
that node). Its last stdout line is one JSON object: {"killed_pid", "rank", "engine", "node_ip", "at"}.

From Python (tests/faults: `from layerpar.runtime import chaos`): the same, plus timing helpers that
run in a thread:

    pid = kill_worker(engine, rank=1)                       # via engine.group.placement
    k = kill_later(engine, rank=1, delay_s=0.2); ...; k.join()   # k.pid, k.killed_at (monotonic)
    k = kill_when(lambda: (run_dir / "checkpoints").exists(), rank=1)   # the engine found by name
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import threading
import time

NAME = re.compile(r"^layerpar-(?P<engine>[0-9a-f]+)-w(?P<rank>\d+)\.(?P<gen>\d+)$")


def find_workers(engine_id: str | None = None) -> list[dict]:
    """Every live branch worker on the connected Ray cluster: engine, rank, pid, node_id, ip, name."""
    import ray

    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        m = NAME.match(entry["name"])
        if not m or (engine_id and m["engine"] != engine_id):
            continue
        try:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            where = ray.get(actor.where.remote(), timeout=10)  # the worker's side thread: never blocked
        except Exception:  # noqa: BLE001 - died between listing and asking
            continue
        found.append({"engine": m["engine"], "rank": int(m["rank"]), "pid": where["pid"],
                      "node_id": where["node_id"], "ip": where["ip"], "name": entry["name"]})
    return sorted(found, key=lambda w: (w["engine"], w["rank"]))


def locate(target, rank: int, ignore: set[str] = frozenset()) -> dict:
    """The worker `rank` of an Engine (from its placement), or of the only engine on the cluster
    (target None; engines whose id is in `ignore` do not count), or of the engine with that id."""
    if target is not None and not isinstance(target, str):
        where = target.group.placement[rank]
        return {"engine": target.group.id, "rank": rank, "pid": int(where["pid"]),
                "node_id": where["node_id"], "ip": where["ip"]}
    workers = [w for w in find_workers(target) if w["rank"] == rank and w["engine"] not in ignore]
    engines = sorted({w["engine"] for w in workers})
    if len(engines) != 1:
        raise LookupError(f"found {len(engines)} engines with a worker of rank {rank} "
                          f"({', '.join(engines) or 'none'}); name one with --engine")
    return workers[0]


def _local(ip: str) -> bool:
    return ip in ("127.0.0.1", "localhost", socket.gethostbyname(socket.gethostname()))


def sigkill(pid: int, *, node_id: str | None = None, ip: str = "127.0.0.1") -> None:
    """SIGKILL `pid` on this machine, or on the Ray node `node_id` through a task pinned there."""
    if _local(ip) or node_id is None:
        os.kill(pid, signal.SIGKILL)
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote_kill = ray.remote(num_cpus=0)(os.kill)
    ray.get(remote_kill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
            .remote(pid, signal.SIGKILL), timeout=60)


def kill_worker(target, rank: int, ignore: set[str] = frozenset()) -> dict:
    """SIGKILL worker `rank` now (target: an Engine, an engine id, or None for the only engine not
    in `ignore`); returns what was killed, with `at` = time.monotonic() of the kill."""
    w = locate(target, rank, ignore)
    sigkill(w["pid"], node_id=w.get("node_id"), ip=w.get("ip", "127.0.0.1"))
    return {**w, "at": time.monotonic()}


class _Killer(threading.Thread):
    """A daemon thread that kills once; .killed (dict) or .error after join()."""

    def __init__(self, wait, target, rank: int, ignore: set[str] = frozenset()):
        super().__init__(daemon=True, name="chaos")
        self._wait, self.target, self.rank, self.ignore = wait, target, rank, ignore
        self.killed: dict | None = None
        self.error: BaseException | None = None

    @property
    def pid(self) -> int | None:
        return None if self.killed is None else self.killed["pid"]

    @property
    def killed_at(self) -> float | None:
        return None if self.killed is None else self.killed["at"]

    def run(self) -> None:
        try:
            if self._wait():
                self.killed = kill_worker(self.target, self.rank, self.ignore)
        except BaseException as exc:  # noqa: BLE001 - reported through .error
            self.error = exc


def kill_later(target, rank: int, delay_s: float) -> _Killer:
    """Kill worker `rank` after `delay_s` seconds, from a thread (started)."""
    k = _Killer(lambda: time.sleep(delay_s) or True, target, rank)
    k.start()
    return k


def kill_when(predicate, rank: int, target=None, *, poll_s: float = 0.02, timeout_s: float = 120.0,
              ignore: set[str] = frozenset()) -> _Killer:
    """Kill worker `rank` as soon as predicate() is true (polled every poll_s, for at most
    timeout_s), from a thread (started). target None: the only engine on the cluster then, not
    counting the engines in `ignore` (e.g. those that ran before: {w["engine"] for w in find_workers()})."""
    def wait() -> bool:
        end = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > end:
                return False
            time.sleep(poll_s)
        return True

    k = _Killer(wait, target, rank, ignore)
    k.start()
    return k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list every engine's workers and exit")
    ap.add_argument("--rank", type=int, help="worker rank to kill")
    ap.add_argument("--engine", default=None, help="engine id (the <id> in layerpar-<id>-w<rank>)")
    ap.add_argument("--pid", type=int, help="kill this local process instead (no Ray needed)")
    ap.add_argument("--after", type=float, default=0.0, help="seconds to wait before the kill")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"), help="Ray cluster")
    args = ap.parse_args(argv)
    if args.pid is None and args.rank is None and not args.list:
        ap.error("give --rank, --pid or --list")
    if args.pid is not None:
        time.sleep(args.after)
        os.kill(args.pid, signal.SIGKILL)
        print(json.dumps({"killed_pid": args.pid, "at": time.time()}))
        return 0
    import ray

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    try:
        if args.list:
            for w in find_workers(args.engine):
                print(f"engine={w['engine']} rank={w['rank']} pid={w['pid']} node={w['ip']} {w['name']}")
            return 0
        time.sleep(args.after)
        w = kill_worker(args.engine, args.rank)
        print(json.dumps({"killed_pid": w["pid"], "rank": w["rank"], "engine": w["engine"],
                          "node_ip": w["ip"], "at": time.time()}))
        return 0
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()

