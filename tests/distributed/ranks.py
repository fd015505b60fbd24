"""Rank processes for the dist tier, forked from a server that imported torch and layerpar once.

A spawned rank spends ~2.5 s of CPU importing torch and layerpar before it does anything, and the suite
is CPU-bound on 2 cores (docs/TESTING.md); the tier starts ~40 ranks. With multiprocessing's
forkserver, one server per test process imports them once (single-threaded: nothing has started an
OpenMP pool or a gloo group in it) and every rank is a fork of it. Each rank still forms its own gloo
group after the fork, exactly as a torchrun rank does.

    start_ranks(fn, world, *args)        # fn(rank, world, port, *args) in `world` processes, joined
    context().Process(target=..., ...)   # a rank started and watched by the test itself
"""

from __future__ import annotations

import multiprocessing

import torch.multiprocessing as mp

from layerpar.parallel import process_group

PRELOAD = ["torch", "torch.distributed", "layerpar.model", "layerpar.parallel.comm",
           "layerpar.parallel.process_group", "layerpar.train.shard", "layerpar.train.step",
           "layerpar.train.optim", "layerpar.model.lm", "layerpar.train.lm_shard"]


def context():
    """The forkserver context, its server preloading PRELOAD (taken when the server first starts)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_ranks(fn, world: int, *args) -> None:
    """fn(rank, world, port, *args) on `world` forked ranks with a free rendezvous port; raises if a
    rank fails (torch.multiprocessing's ProcessRaisedException names it)."""
    context()
    mp.start_processes(fn, args=(world, process_group.free_port(), *args), nprocs=world, join=True,
                       start_method="forkserver")
