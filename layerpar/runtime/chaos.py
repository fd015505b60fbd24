"""Kill a branch worker with SIGKILL at a chosen moment, during serving or training.

By hand, next to a running `launch/serve.py` (an engine's workers) or `launch/train.py` (the ranks of
a Ray Train run) on the Ray cluster:

    python launch/chaos.py --list                         # every engine's workers and training rank
    python launch/chaos.py --rank 1                       # SIGKILL worker (or training rank) 1 now
    python launch/chaos.py --rank 1 --signal STOP         # SIGSTOP it instead (a hung rank)
    python launch/chaos.py --rank 1 --after 10            # ... in 10 seconds
    python launch/chaos.py --rank 0 --engine 3fa2c1d0     # when several engines run
    python launch/chaos.py --pid 12345 --after 2          # any process on this machine
    python launch/chaos.py --rank 1 --address 127.0.0.1:6379

The engine names its actors `layerpar-<engine id>-w<rank>.<generation>`; this script finds them on
the cluster (--address, default RAY_ADDRESS or `auto`: the newest cluster on this machine), asks the
worker for its pid and node, and kills it there (on another node through a one-off Ray task pinned to
that node). With no engine on the cluster, --rank is the world rank of a running Ray Train run: its
ranks are Ray Train's worker actors (unnamed), found in Ray Train's own record of the run's workers
(world rank, pid, node; `engine` is then "train-<run name>", the run directory's name). Its last
stdout line is one JSON object: {"killed_pid", "rank", "engine", "node_ip", "signal", "at"}.

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


def find_train_ranks(run: str | None = None) -> list[dict]:
    """Every live rank of the running Ray Train runs on the connected cluster: engine
    ("train-<run name>"), rank (world rank), pid, node_id, ip, name. Ray Train's worker actors have no
    names; Ray Train's state actor (kept when RAY_TRAIN_ENABLE_STATE_TRACKING=1, which
    layerpar.train.raytrain.fit sets: the dashboard's Train view reads the same) records every
    attempt's workers with their world rank, pid and node."""
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    state = get_state_actor()
    if state is None:  # no Ray Train run with state tracking on this cluster yet
        return []
    runs = ray.get(state.get_train_runs.remote(), timeout=30)
    attempts = ray.get(state.get_train_run_attempts.remote(), timeout=30)
    found = []
    for run_id, by_attempt in attempts.items():
        name = getattr(runs.get(run_id), "name", run_id)
        if run is not None and name != run:
            continue
        for attempt in by_attempt.values():
            if str(getattr(attempt.status, "value", attempt.status)) != "RUNNING":
                continue
            for w in attempt.workers:
                if str(getattr(w.status, "value", w.status)) == "DEAD":
                    continue
                found.append({"engine": f"train-{name}", "rank": w.world_rank, "pid": w.pid,
                              "node_id": w.node_id, "ip": w.node_ip, "name": f"RayTrainWorker {w.actor_id}"})
    return sorted(found, key=lambda w: (w["engine"], w["rank"]))


def locate(target, rank: int, ignore: set[str] = frozenset()) -> dict:
    """The worker `rank` of an Engine (from its placement), or of the only engine on the cluster
    (target None; engines whose id is in `ignore` do not count), or of the engine with that id."""
    if target is not None and not isinstance(target, str):
        where = target.group.placement[rank]
        return {"engine": target.group.id, "rank": rank, "pid": int(where["pid"]),
                "node_id": where["node_id"], "ip": where["ip"]}
    workers = [w for w in find_workers(target) if w["rank"] == rank and w["engine"] not in ignore]
    if not workers and (target is None or target.startswith("train-")):  # a Ray Train run's ranks
        run = target.removeprefix("train-") if target else None
        workers = [w for w in find_train_ranks(run) if w["rank"] == rank and w["engine"] not in ignore]
    engines = sorted({w["engine"] for w in workers})
    if len(engines) != 1:
        raise LookupError(f"found {len(engines)} engines or running Ray Train runs with a worker of rank "
                          f"{rank} ({', '.join(engines) or 'none'}); name one with --engine")
    return workers[0]


def _local(ip: str) -> bool:
    return ip in ("127.0.0.1", "localhost", socket.gethostbyname(socket.gethostname()))


def sigkill(pid: int, *, node_id: str | None = None, ip: str = "127.0.0.1",
            sig: int = signal.SIGKILL) -> None:
    """SIGKILL (or `sig`) `pid` on this machine, or on the Ray node `node_id` through a task pinned
    there."""
    if _local(ip) or node_id is None:
        os.kill(pid, sig)
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote_kill = ray.remote(num_cpus=0)(os.kill)
    ray.get(remote_kill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
            .remote(pid, sig), timeout=60)


def kill_worker(target, rank: int, ignore: set[str] = frozenset(), *, sig: int = signal.SIGKILL) -> dict:
    """SIGKILL (or `sig`) worker `rank` now (target: an Engine, an engine id, "train-<run name>", or
    None for the only engine not in `ignore`, else the only Ray Train run); returns what was killed,
    with `at` = time.monotonic() of the kill."""
    w = locate(target, rank, ignore)
    sigkill(w["pid"], node_id=w.get("node_id"), ip=w.get("ip", "127.0.0.1"), sig=sig)
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
    ap.add_argument("--engine", default=None, help="engine id (the <id> in layerpar-<id>-w<rank>), or "
                    "train-<run name> for a Ray Train run's ranks")
    ap.add_argument("--signal", choices=("KILL", "STOP"), default="KILL",
                    help="SIGKILL (a lost worker, default) or SIGSTOP (a hung one)")
    ap.add_argument("--pid", type=int, help="kill this local process instead (no Ray needed)")
    ap.add_argument("--after", type=float, default=0.0, help="seconds to wait before the kill")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"), help="Ray cluster")
    args = ap.parse_args(argv)
    if args.pid is None and args.rank is None and not args.list:
        ap.error("give --rank, --pid or --list")
    sig = signal.Signals[f"SIG{args.signal}"]
    if args.pid is not None:
        time.sleep(args.after)
        os.kill(args.pid, sig)
        print(json.dumps({"killed_pid": args.pid, "signal": sig.name, "at": time.time()}))
        return 0
    import ray

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    try:
        if args.list:
            train = args.engine is None or args.engine.startswith("train-")
            run = args.engine.removeprefix("train-") if args.engine and train else None
            for w in find_workers(args.engine) + (find_train_ranks(run) if train else []):
                print(f"engine={w['engine']} rank={w['rank']} pid={w['pid']} node={w['ip']} {w['name']}")
            return 0
        time.sleep(args.after)
        w = kill_worker(args.engine, args.rank, sig=sig)
        print(json.dumps({"killed_pid": w["pid"], "rank": w["rank"], "engine": w["engine"],
                          "node_ip": w["ip"], "signal": sig.name, "at": time.time()}))
        return 0
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()

