"""Dist tier: the training mesh without Ray -- gloo processes from the torchrun variables form the
(replica, branch) device mesh (process_group.new_mesh) and train 5 batches; every rank's weights (its
branches and the replicated embedding and head) and losses equal the single process trained on the
whole batches: R = 2 x W = 2 and R = 2 x W = 1, both modes, float64 to 1e-10, float32 within
tests/parity.py's tolerance, shares of 5 and 4 rows in one case. The Ray Train runs of the same
mesh are in tests/raytrain (parity of the whole loop, SIGKILL restart).
"""

import pytest
import torch

from layerpar.parallel import process_group
from layerpar.parallel.comm import LocalComm
from layerpar.train.optim import make_optimizer
from layerpar.train.shard import BranchShard
from layerpar.train.step import train_step
from tests.distributed.ranks import start_ranks
from tests.distributed.test_comm import STEPS, batch, make_cfg
from tests.parity import assert_weights_match, loss_atol

pytestmark = pytest.mark.dist
# (replicas, workers, mode, dtype, rows of each batch); each world size is one spawn of processes
CASES = {4: [(2, 2, "joint", "float64", 10), (2, 2, "progressive", "float64", 10),
             (2, 2, "progressive", "float32", 10)],
         2: [(2, 1, "joint", "float64", 9), (2, 1, "progressive", "float64", 10)]}


def mesh_cfg(replicas, workers, mode, dtype):
    return make_cfg(workers, mode, dtype).replace(parallel={"replicas": replicas})


def _mesh_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    process_group.set_env(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=world)
    process_group.init_from_env(timeout_s=60)
    results = []
    for r, w, mode, dtype, rows in CASES[world]:  # every rank forms each case's mesh, in order
        shard = BranchShard(mesh_cfg(r, w, mode, dtype), worker_rank=rank % w, total_steps=30)
        comm = shard.attach_group()
        losses = [shard.train_step(*(t[:rows] for t in batch(i)))["loss"] for i in range(STEPS)]
        results.append({"losses": losses, "state": shard.model.state_dict(), "replica": comm.replica})
    torch.save(results, f"{out}/rank{rank}.pt")
    process_group.destroy()


def _single(cfg, rows: int):
    torch.set_num_threads(1)
    from layerpar.model import ParaFormer

    model = ParaFormer(cfg.model)
    opt = make_optimizer(model, cfg.train)
    step, losses = 0, []
    for i in range(STEPS):
        out = train_step(model, opt, LocalComm(), *(t[:rows] for t in batch(i)), cfg=cfg, step=step,
                         total_steps=30)
        step = out["step"]
        losses.append(out["loss"])
    return model.state_dict(), losses, step


@pytest.mark.parametrize("world", sorted(CASES))
def test_mesh_training_equals_single_process(tmp_path, world):
    start_ranks(_mesh_worker, world, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    for i, (r, w, mode, dtype, rows) in enumerate(CASES[world]):
        cfg = mesh_cfg(r, w, mode, dtype)
        expected, losses, steps = _single(cfg, rows)
        assert sorted(g[i]["replica"] for g in got) == sorted(list(range(r)) * w)
        for rank in range(world):
            # the loss of the whole batch: the replicas' shares summed
            assert got[rank][i]["losses"] == pytest.approx(losses, abs=loss_atol(cfg)), (r, w, mode)
            assert_weights_match(got[rank][i]["state"], expected, cfg, steps=steps, total_steps=30)
