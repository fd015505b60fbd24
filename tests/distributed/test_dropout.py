"""Dist tier: dropout > 0 in gloo processes, no Ray. Each branch's masks are drawn per (seed, step,
branch) for the whole batch and a replica takes its rows (model/dropout.py), so with dropout too a
distributed run is the one-process model: W = 2 (3 branches fused on each worker) and a 2 x 1 mesh
(replicas of 5 rows each) train 5 batches, joint and progressive, and every rank's weights and losses
equal the single process's in float64 to 1e-10."""

import pytest
import torch

from layerpar.model import ParaFormer
from layerpar.parallel import process_group
from layerpar.parallel.comm import LocalComm
from layerpar.train.optim import make_optimizer
from layerpar.train.shard import BranchShard
from layerpar.train.step import train_step
from tests.distributed.ranks import start_ranks
from tests.distributed.test_comm import STEPS, batch, make_cfg
from tests.parity import assert_weights_match, loss_atol

pytestmark = pytest.mark.dist
DROPOUT = 0.2
CASES = [(1, 2, "joint"), (1, 2, "progressive"), (2, 1, "joint")]  # (replicas, workers, mode)


def _cfg(replicas: int, workers: int, mode: str):
    return make_cfg(workers, mode, "float64").replace(parallel={"replicas": replicas},
                                                     model={"dropout": DROPOUT})


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    process_group.set_env(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=world)
    process_group.init_from_env(timeout_s=60)
    results = []
    for r, w, mode in CASES:  # every rank forms each case's groups, in order
        shard = BranchShard(_cfg(r, w, mode), worker_rank=rank % w, total_steps=30)
        shard.attach_group()
        losses = [shard.train_step(*batch(i))["loss"] for i in range(STEPS)]
        results.append({"losses": losses, "state": shard.model.state_dict()})
    torch.save(results, f"{out}/rank{rank}.pt")
    process_group.destroy()


def _single(cfg):
    model = ParaFormer(cfg.model)
    opt = make_optimizer(model, cfg.train)
    step, losses = 0, []
    for i in range(STEPS):
        out = train_step(model, opt, LocalComm(), *batch(i), cfg=cfg, step=step, total_steps=30)
        step, losses = out["step"], losses + [out["loss"]]
    return model.state_dict(), losses, step


def test_dropout_training_equals_single_process(tmp_path):
    start_ranks(_worker, 2, str(tmp_path))
    torch.set_num_threads(1)
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for i, (r, w, mode) in enumerate(CASES):
        cfg = _cfg(r, w, mode)
        expected, losses, steps = _single(cfg)
        no_dropout, _, _ = _single(cfg.replace(model={"dropout": 0.0}))
        assert any((expected[k] - no_dropout[k]).abs().max() > 1e-6 for k in expected)  # it drops
        for rank in range(2):
            assert got[rank][i]["losses"] == pytest.approx(losses, abs=loss_atol(cfg)), (r, w, mode)
            assert_weights_match(got[rank][i]["state"], expected, cfg, steps=steps, total_steps=30)
