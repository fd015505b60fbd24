"""The systems of the training sweep as one rank runs them, and their measurement, side by side.

    systems = build_systems(cfg, layouts=[(1, 2), (2, 1)], ddp=True, total_steps=40)
    out = measure(systems, fixed_batches(cfg, 4), warmup=2, rounds=3, steps=4)   # on every rank

Every rank of a D-rank process group (a Ray Train worker group, or the two ranks of a shaped link)
builds every system of its D: layerpar meshes R x W = D (parallel/comm.py's verbs; R = W = 1 is the
one-process step, LocalComm), DDP of the whole model (bench/ddp.py) and DDP's compute alone (no_sync).
They are timed in rounds -- each system a few steps, then the next -- so drift of this machine's speed
falls on all of them alike, and every system takes the same number of steps on the same batches, so
its weights can be compared with the single process's afterwards. One process also runs with half
the branches and on half the rows: calibration points of the cost model.

    python -m layerpar.bench.train_systems SPEC.json   # one rank, group from the torchrun variables
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from layerpar.config import from_dict
from layerpar.model.layers import seeded
from layerpar.parallel import process_group
from layerpar.train.shard import BranchShard

ONE = "one-process"
CALIBRATIONS = ("one-process@N/2", "one-process@B/2")  # half the branches, half the rows


def layout_name(replicas: int, workers: int) -> str:
    return ONE if replicas * workers == 1 else f"{replicas}x{workers}"


class MeshTrainer:
    """layerpar's training step on R replicas x W branch ranks (BranchShard.train_step)."""

    def __init__(self, cfg, replicas: int, workers: int, *, rank: int, total_steps: int) -> None:
        one = replicas * workers == 1
        c = cfg.replace(parallel={"workers": 0 if one else workers, "replicas": replicas})
        if one:  # no collectives to time (its LocalComm verbs are local arithmetic)
            self.shard = BranchShard(c, worker_rank=0, total_steps=total_steps)
            self.comm = self.shard.comms[1]
        else:
            self.shard, self.comm = BranchShard.attached(c, global_rank=rank, total_steps=total_steps)
        self.traffic = self.comm.traffic

    def train_step(self, x, y) -> dict:
        return self.shard.train_step(x, y)

    def collective_seconds(self) -> float:
        return getattr(self.comm, "seconds", 0.0)

    def state(self) -> dict[str, torch.Tensor]:
        """The whole model's weights, on every rank (replica 0's ranks hold every piece)."""
        mine = self.shard.pieces(replicated=self.comm.rank == 0) if self.comm.replica == 0 else {}
        flat: dict[str, torch.Tensor] = {}
        for pieces in self.comm.share_objects(mine, mesh=True):
            for piece in pieces.values():
                flat.update(piece)
        return flat


class HalfBatch:
    """One process on the first half of every batch's rows: a calibration point of the cost model."""

    def __init__(self, inner: MeshTrainer) -> None:
        self.inner, self.traffic = inner, inner.traffic

    def train_step(self, x, y) -> dict:
        half = len(y) // 2
        return self.inner.train_step(x[:half], y[:half])

    def collective_seconds(self) -> float:
        return 0.0


class DDPSystem:
    """bench/ddp.py's trainer with the same interface; its collectives are inside DDP."""

    def __init__(self, cfg, *, total_steps: int, communicate: bool) -> None:
        from layerpar.bench.ddp import DDPTrainer

        self.inner = DDPTrainer(cfg, total_steps=total_steps, communicate=communicate)
        self.traffic = self.inner.traffic

    def train_step(self, x, y) -> dict:
        return self.inner.train_step(x, y)

    def collective_seconds(self) -> float:
        return 0.0  # overlapped with the backward pass: measured as step - compute (no_sync)

    def state(self) -> dict[str, torch.Tensor]:
        return self.inner.state()


def build_systems(cfg, *, layouts: list[tuple[int, int]], ddp: bool, total_steps: int, rank: int,
                  world: int) -> dict[str, object]:
    """Every system of this D (= world), in a fixed order (every rank forms the groups alike)."""
    systems: dict[str, object] = {}
    for r, w in layouts:
        if r * w != world:
            raise ValueError(f"layout {r}x{w} needs {r * w} ranks, the group has {world}")
        systems[layout_name(r, w)] = MeshTrainer(cfg, r, w, rank=rank, total_steps=total_steps)
    if ddp and world > 1:
        systems["ddp"] = DDPSystem(cfg, total_steps=total_steps, communicate=True)
        systems["ddp-compute"] = DDPSystem(cfg, total_steps=total_steps, communicate=False)
    if world == 1 and cfg.model.num_branches > 1:  # what only one process can tell the cost model
        half = cfg.replace(model={"num_branches": cfg.model.num_branches // 2})
        systems[CALIBRATIONS[0]] = MeshTrainer(half, 1, 1, rank=rank, total_steps=total_steps)
        systems[CALIBRATIONS[1]] = HalfBatch(MeshTrainer(cfg, 1, 1, rank=rank, total_steps=total_steps))
    return systems


def fixed_batches(cfg, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` seeded random batches of train.batch_size, the same on every rank and every run."""
    m, b = cfg.model, cfg.train.batch_size
    dtype = getattr(torch, m.dtype)
    out = []
    for i in range(count):
        g = seeded(4321, i)
        x = torch.randn(b, m.in_channels, m.image_size, m.image_size, generator=g).to(dtype)
        out.append((x, torch.randint(0, m.num_classes, (b,), generator=g)))
    return out


def _barrier(systems: dict) -> None:
    """Line the ranks up between systems (DDP's compute-only steps never wait for each other)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def measure(systems: dict[str, object], data: list, *, warmup: int, rounds: int, steps: int,
            wire=None) -> dict:
    """Per system on this rank: median step, collective time and bytes per step -- `bytes` as the
    collectives *counted* them (the ring rules' payload), and with `wire` (a function returning the
    bytes this rank's link has sent so far: bench/netns.egress_bytes) `wire_bytes`, what the link
    *measured* per timed step, headers, acknowledgements and one barrier per round included. Every
    system takes warmup + rounds * steps steps on data[0], data[1], ... (cycled)."""
    taken = dict.fromkeys(systems, 0)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in systems}
    sent = {k: 0.0 for k in systems}
    on_wire = {k: 0.0 for k in systems}

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # a GPU step is done when its kernels are

    def one(name, timed):
        s = systems[name]
        x, y = data[taken[name] % len(data)]
        taken[name] += 1
        sync()
        b0, c0, t0 = s.traffic.bytes, s.collective_seconds(), time.perf_counter()
        s.train_step(x, y)
        sync()
        if timed:
            times[name].append((time.perf_counter() - t0, s.collective_seconds() - c0))
            sent[name] += s.traffic.bytes - b0

    for name in systems:
        for _ in range(warmup):
            one(name, False)
        _barrier(systems)
    for _ in range(rounds):
        for name in systems:
            # the counter is read outside the steps, before the barrier: no peer waits on it mid-step
            w0 = wire() if wire else 0
            _barrier(systems)
            for _ in range(steps):
                one(name, True)
            on_wire[name] += (wire() - w0) if wire else 0
            _barrier(systems)
    med = statistics.median
    return {k: {"step_ms": 1e3 * med(t for t, _ in v), "collectives_ms": 1e3 * med(c for _, c in v),
                "bytes": sent[k] / len(v), "wire_bytes": on_wire[k] / len(v) if wire else None,
                "steps_taken": taken[k]} for k, v in times.items()}


def run_rank(spec: dict, *, rank: int, world: int, wire=None) -> dict | None:
    """One rank's whole measurement; returns every rank's figures (and weights) on rank 0."""
    cfg = from_dict(spec["cfg"])
    torch.set_num_threads(cfg.parallel.threads_per_worker)
    layouts = [tuple(lw) for lw in spec["layouts"]]
    total = spec["warmup"] + spec["rounds"] * spec["steps"]
    systems = build_systems(cfg, layouts=layouts, ddp=spec["ddp"], total_steps=total, rank=rank,
                            world=world)
    out = measure(systems, fixed_batches(cfg, spec.get("batches", 4)), warmup=spec["warmup"],
                  rounds=spec["rounds"], steps=spec["steps"], wire=wire)
    weights = {}
    if spec.get("weights"):
        weights = {k: s.state() for k, s in systems.items() if k != "ddp-compute" and "@" not in k}
    gather = next(s for s in systems.values() if isinstance(s, MeshTrainer)).comm
    ranks = gather.share_objects({"rank": rank, **out}, mesh=True)
    return {"ranks": ranks, "weights": weights} if rank == 0 else None


def main(argv: list[str]) -> int:
    """A rank started outside Ray (a shaped link's namespace): the group from the torchrun variables;
    rank 0 prints the figures (no weights) as one JSON line."""
    import functools
    import os

    from layerpar.bench.netns import egress_bytes

    spec = json.loads(open(argv[0]).read())
    dev = os.environ.get("LAYERPAR_LINK_DEV")  # the shaped veth end this rank sends on (ShapedLink)
    wire = functools.partial(egress_bytes, dev) if dev else None
    rank, world = process_group.init_from_env(timeout_s=spec.get("timeout_s", 300))
    try:
        out = run_rank({**spec, "weights": False}, rank=rank, world=world, wire=wire)
    finally:
        process_group.destroy()
    print(json.dumps(out if rank == 0 else {"rank": rank}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
