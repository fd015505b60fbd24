"""The branch workers of one engine: the actors in their placement-group bundles, the process group
they form, waiting on them, and replacing one rank.

    group = WorkerGroup(cfg)                             # its Transport: group.transport
    group.start()                                        # place, start, form the process group
    outs = group.call("stats")                           # a default-thread call on every worker
    fresh = group.restart([1]); group.install(fresh); group.rejoin()   # a recovery's restart of rank 1

Every call on the workers' default threads goes through `transport.submit` (the fast-path rule lives
there); `get` turns a dead, silent or failed-collective worker into a WorkerError.
"""

from __future__ import annotations

import logging
import time
import uuid

import ray

from layerpar.config import Config
from layerpar.parallel.comm import failed_collective
from layerpar.parallel.layout import BranchLayout
from layerpar.runtime.errors import WorkerError
from layerpar.runtime.heartbeat import Heartbeat, WorkerSilent
from layerpar.runtime.placement import (
    PlacementError,
    bundle_strategy,
    current_group_bundles,
    node_alive,
    place_workers,
    release,
)
from layerpar.runtime.transport import Transport
from layerpar.runtime.worker import RemoteBranchWorker

log = logging.getLogger("layerpar.runtime")


def kill(handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


class WorkerGroup:
    def __init__(self, cfg: Config, *, total_steps: int = 0, node_id: str | None = None):
        p = cfg.parallel
        self.cfg, self.total_steps, self.node_id = cfg, total_steps, node_id
        self.layout = BranchLayout(cfg.model.num_branches, p.workers)
        self.collective = p.transport == "collective"
        self.timeout_s = p.timeout_s  # training, loads, state reads, the gloo group
        self.call_timeout_s = p.call_timeout_s  # one inference call, all ranks together
        self.heartbeat_s = p.heartbeat_s  # a worker silent this long is lost
        # starting an actor imports torch and builds its branches: allowed longer than one call
        self.startup_timeout_s = p.placement_timeout_s + p.timeout_s
        self.id = uuid.uuid4().hex[:8]  # names the actors: layerpar-<id>-w<rank>.<generation>
        self.transport = Transport(p, tag=self.id, timeout_s=self.call_timeout_s,
                                   startup_timeout_s=self.startup_timeout_s)
        self._generation = 0
        self._pg = None
        # parallel.placement_group `current`: the workers take bundles 1..W of the caller's group (a
        # Ray Serve replica's; bundle 0 is the replica), which the group neither reserves nor removes.
        self._borrowed = cfg.parallel.placement_group == "current"
        self._first_bundle = 1 if self._borrowed else 0
        self.workers: list = []
        self.placement: list[dict] = []
        self.placement_fallbacks = 0  # times the group left its pinned node (gone or full)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._place()
        self.workers = [self.new_worker(rank) for rank in range(self.layout.num_workers)]
        self.refresh_placement()
        self.form()

    def _place(self) -> None:
        """Reserve the group's bundles: on its pinned node while that node is alive; once it is gone
        (or cannot fit the group in time), on any node with room, said in the log and counted in
        `placement_fallbacks` (the server's layerpar_placement_fallbacks)."""
        if self._borrowed:
            self._pg = current_group_bundles(self.cfg.parallel)
            return
        if self.node_id is not None:
            if node_alive(self.node_id):
                try:
                    self._pg = place_workers(self.cfg.parallel, self.node_id)
                    return
                except PlacementError as exc:
                    why = f"cannot take the group ({exc})"
            else:
                why = "is gone"
            log.warning("worker group %s: its node %s %s; placing it on any node with room "
                        "(parallel.placement %s)", self.id, self.node_id, why, self.cfg.parallel.placement)
            self.node_id = None
            self.placement_fallbacks += 1
        self._pg = place_workers(self.cfg.parallel, None)

    def new_worker(self, rank: int):
        """Start the actor for `rank` in its own bundle (a restarted worker gets the same bundle)."""
        p = self.cfg.parallel
        self._generation += 1
        return RemoteBranchWorker.options(
            num_cpus=p.cpus_per_worker, num_gpus=p.gpus_per_worker,
            scheduling_strategy=bundle_strategy(self._pg, self._first_bundle + rank),
            name=f"layerpar-{self.id}-w{rank}.{self._generation}",  # launch/chaos.py finds it by name
        ).remote(self.cfg.to_dict(), rank, self.total_steps)

    def refresh_placement(self) -> None:
        self.placement = self.get([w.where.remote() for w in self.workers], self.startup_timeout_s)

    def form(self) -> None:
        """Ray Train's rendezvous: rank 0 offers an address and a free port, every rank joins at once,
        and the driver waits on all of them together. Nothing to form for one worker or object_store."""
        if not self.collective or len(self.workers) < 2:
            return
        same_node = len({p["node_id"] for p in self.placement}) == 1  # a file rendezvous, loopback only
        (offer,) = self.call("offer_rendezvous", same_node, workers=self.workers[:1],
                             timeout_s=self.startup_timeout_s)
        addr, port, init_file = offer
        self.call("join_group", addr, port, len(self.workers), init_file, timeout_s=self.startup_timeout_s)

    def restart(self, ranks: list[int]) -> dict[int, object]:
        """Kill the workers of `ranks` and start fresh ones in their bundles (answering a ping); they
        are not installed (see install) until restored. A group whose pinned node is gone is placed
        anew and every rank restarted (the returned dict then holds them all)."""
        fresh: dict[int, object] = {}
        if self.node_id is not None and not node_alive(self.node_id):
            # The pinned node is gone and its bundles with it: the whole group moves to a new
            # placement (removing the old one ends whatever still ran in it).
            for w in self.workers:
                kill(w)
            release(self._pg)
            self._pg = None
            self._place()
            ranks = list(range(self.layout.num_workers))
        try:
            for rank in ranks:  # a stuck worker's collective would only end at the gloo timeout
                kill(self.workers[rank])
                fresh[rank] = self.new_worker(rank)
            self.get([w.ping.remote() for w in fresh.values()], self.startup_timeout_s)
        except BaseException:
            for w in fresh.values():
                kill(w)
            raise
        return fresh

    def install(self, fresh: dict[int, object]) -> None:
        """Put restarted (and restored) workers in their ranks; then `rejoin`."""
        for rank, w in fresh.items():
            self.workers[rank] = w
        self.transport.workers_changed()

    def rejoin(self) -> None:
        """Every worker joins a new process group on a fresh port (after a recovery's restart)."""
        self.refresh_placement()
        self.form()

    def shutdown(self) -> None:
        self.transport.close()
        for w in self.workers:
            kill(w)
        self.workers = []
        if not self._borrowed:  # a borrowed group is its owner's (Ray Serve removes a replica's)
            release(self._pg)
        self._pg = None

    # ------------------------------------------------------------------ calls

    def call(self, method: str, *args, workers: list | None = None, per_worker: list[tuple] | None = None,
             timeout_s: float | None = None, watch: bool = False, field: str = "parallel.timeout_s"):
        """`method` on the default thread of every worker (or of `workers`), results in rank order.
        watch: a worker that misses its heartbeat ends the wait at once."""
        workers = self.workers if workers is None else workers
        refs = self.transport.submit(workers, method, *args, per_worker=per_worker)
        return self.get(refs, timeout_s, watch=workers if watch else None, field=field)

    def get(self, refs, timeout_s: float | None = None, *, watch: list | None = None,
            field: str = "parallel.timeout_s"):
        """ray.get with the group's timeout; a dead or silent worker, or a collective that failed
        because of one, becomes a WorkerError. With `watch` (the worker behind each of `refs`), a
        worker that misses its heartbeat ends the wait at once (runtime/heartbeat.py)."""
        timeout_s = timeout_s or self.timeout_s
        try:
            if watch is not None:
                self._wait_watched(refs, watch, time.monotonic() + timeout_s)
            return ray.get(refs, timeout=timeout_s if watch is None else 0.1)
        except WorkerSilent as exc:
            raise WorkerError(str(exc)) from None
        except ray.exceptions.GetTimeoutError:
            raise WorkerError(f"a worker did not answer within {field}={timeout_s:g}s") from None
        except ray.exceptions.RayActorError as exc:
            raise WorkerError(f"a branch worker died: {str(exc).splitlines()[0]}") from None
        except ray.exceptions.RayTaskError as exc:
            if not failed_collective(exc.cause):
                raise
            raise WorkerError(f"a collective failed (a peer died or hung): "
                              f"{str(exc.cause).splitlines()[0][:300]}") from None

    def _wait_watched(self, refs: list, workers: list, deadline: float) -> None:
        """Wait for refs[i] (from workers[i]) until every one is ready or failed, or the deadline."""
        beat = Heartbeat(workers, self.heartbeat_s)
        pending = list(refs)
        while pending and (left := deadline - time.monotonic()) > 0:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, beat.interval_s))
            beat.check(i for i, ref in enumerate(refs) if ref in pending)

    def nodes(self) -> list[str]:
        return [p["node_id"] for p in self.placement]

    def pids(self) -> list[int]:
        return [int(p["pid"]) for p in self.placement]
