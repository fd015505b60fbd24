"""Training throughput of the SPMD path: W ranks of a Ray Train TorchTrainer each time
BranchShard.train_step on the same fixed batch, as `launch/bench.py` does for one process, and
report their per-step split (compute, collectives -- waiting for the peer included -- and data).

    out = spmd_train_step_ms(cfg, workers=2, steps=8)   # {"step_ms": p50, "ranks": [...]}
"""

from __future__ import annotations

import statistics
import tempfile
import time

import ray
import torch


def _loop(config: dict) -> None:
    """Per rank: warm up, then time `steps` train steps; rank 0 pushes every rank's figures."""
    import ray.train

    from layerpar.config import from_dict
    from layerpar.train.shard import BranchShard
    from layerpar.train.spmd import set_up_rank

    cfg = from_dict(config["cfg"])
    cores = set_up_rank(cfg)
    rank = ray.train.get_context().get_world_rank()
    shard, comm = BranchShard.attached(cfg, global_rank=rank, total_steps=10**6)
    m, g = cfg.model, torch.Generator().manual_seed(0)
    x = torch.randn(cfg.train.batch_size, m.in_channels, m.image_size, m.image_size, generator=g)
    y = torch.randint(0, m.num_classes, (x.shape[0],), generator=g)
    for _ in range(max(5, config["steps"] // 2)):  # past Ray's start-up work (idle workers importing)
        shard.train_step(x, y)
    steps, colls, datas = [], [], []
    for _ in range(config["steps"]):
        t0 = time.perf_counter()
        xb, yb = x.clone(), y.clone()  # the data phase: a batch built (here: copied) on the rank
        t1, c0 = time.perf_counter(), comm.seconds
        shard.train_step(xb, yb)
        t2 = time.perf_counter()
        steps.append(t2 - t1)
        colls.append(comm.seconds - c0)
        datas.append(t1 - t0)
    med = statistics.median
    mine = {"rank": rank, "cores": cores, "step_ms": 1e3 * med(steps), "collectives_ms": 1e3 * med(colls),
            "compute_ms": 1e3 * (med(steps) - med(colls)), "data_ms": 1e3 * med(datas)}
    ranks = comm.share_objects(mine)
    if rank == 0:
        ray.get(config["log"].push.remote({"kind": "bench", "ranks": ranks}))
    ray.train.report({"step_ms": mine["step_ms"]})


def spmd_train_step_ms(cfg, *, workers: int, steps: int) -> dict:
    """p50 step time of W ranks (the slowest rank's), and each rank's split."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from layerpar.train.raytrain import ProgressLog

    cfg = cfg.replace(parallel={"workers": workers})
    log = ProgressLog.remote()
    try:
        with tempfile.TemporaryDirectory() as storage:
            scaling = ScalingConfig(num_workers=workers,
                                    resources_per_worker={"CPU": cfg.parallel.cpus_per_worker})
            TorchTrainer(_loop, train_loop_config={"cfg": cfg.to_dict(), "steps": steps, "log": log},
                         scaling_config=scaling,
                         torch_config=TorchConfig(backend="gloo"),
                         run_config=RunConfig(name="bench", storage_path=storage)).fit()
        (event,) = [e for e in ray.get(log.since.remote(0)) if e["kind"] == "bench"]
    finally:
        ray.kill(log)
    ranks = event["ranks"]
    return {"step_ms": max(r["step_ms"] for r in ranks), "ranks": ranks}
