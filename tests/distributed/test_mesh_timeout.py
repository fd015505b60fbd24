"""Dist tier: a stopped rank in a 2 x 2 training mesh of gloo processes. Rank 3 is SIGSTOPped after one
step; the other three ranks' next step raises CollectiveError within parallel.timeout_s (10 s here),
not after torch's default group timeout (30 min on gloo): the mesh's branch and replica sub-groups are
made with the configured timeout, like the default group."""

import os
import signal
import time

import pytest
import torch

from layerpar.parallel import process_group
from tests.distributed.ranks import context
from tests.distributed.test_comm import batch, make_cfg

pytestmark = pytest.mark.dist
TIMEOUT_S = 10
STOPPED = 3
DEADLINE_S = 300  # generous: the three ranks normally answer within ~2 x TIMEOUT_S


def _rank(rank: int, port: int, out: str) -> None:
    from layerpar.parallel.comm import CollectiveError
    from layerpar.train.shard import BranchShard

    torch.set_num_threads(1)
    process_group.set_env(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=4)
    process_group.init_from_env(timeout_s=TIMEOUT_S)
    cfg = make_cfg(2).replace(parallel={"replicas": 2, "timeout_s": TIMEOUT_S})
    shard = BranchShard(cfg, worker_rank=rank % 2, total_steps=10)
    shard.attach_group()
    shard.train_step(*batch(0))  # every rank takes one step together
    if rank == STOPPED:
        os.kill(os.getpid(), signal.SIGSTOP)  # hangs here until the test kills it
    t0 = time.monotonic()
    try:
        shard.train_step(*batch(1))
        outcome = "finished"
    except CollectiveError as exc:
        outcome = f"CollectiveError: {str(exc)[:200]}"
    except Exception as exc:  # noqa: BLE001 -- reported to the test, which names it
        outcome = f"{type(exc).__name__}: {str(exc)[:200]}"
    with open(f"{out}/rank{rank}.txt.tmp", "w") as f:
        f.write(f"{time.monotonic() - t0:.3f}\n{outcome}\n")
    os.rename(f"{out}/rank{rank}.txt.tmp", f"{out}/rank{rank}.txt")
    os._exit(0)  # no teardown: destroying a group whose peer is stopped could wait again


def test_stopped_rank_in_mesh_raises_within_timeout(tmp_path):
    ctx = context()  # forkserver: the ranks fork from a server that imported torch once
    port = process_group.free_port()
    procs = [ctx.Process(target=_rank, args=(rank, port, str(tmp_path))) for rank in range(4)]
    for p in procs:
        p.start()
    try:
        files = [tmp_path / f"rank{r}.txt" for r in range(4) if r != STOPPED]
        deadline = time.monotonic() + DEADLINE_S
        while not all(f.exists() for f in files) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
        assert all(f.exists() for f in files), \
            f"ranks still waiting after {DEADLINE_S} s: {[f.name for f in files if not f.exists()]}"
        for f in files:
            seconds, outcome = f.read_text().splitlines()
            assert outcome.startswith("CollectiveError"), (f.name, outcome)
            assert float(seconds) < 6 * TIMEOUT_S, (f.name, seconds)  # not torch's 30 min default
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)  # the stopped rank (a stopped process takes SIGKILL)
            p.join(30)
