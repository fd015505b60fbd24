"""Dist tier: the language model's training across gloo processes (no Ray) equals one process.

Every rank of W = 2 branch ranks, of R = 2 replicas x W = 1 and of the 2 x 2 mesh trains its share
of a Para-Former LM (train/lm_shard.LMShard, the tied head included) for a few batches of token
windows; its weights (its branches, and the replicated embedding, positions, norm) and losses equal
the single process trained on the whole batches: float64 to 1e-10 after a few AdamW steps, joint and
progressive. The tied head's gradient is the trap here: its head part is the same on every rank and
must not be summed with the embedding's per-rank part (that would count it W times).
"""

import pytest
import torch

from layerpar.config import load_config
from layerpar.parallel import process_group
from layerpar.train.lm_shard import LMShard
from tests.distributed.ranks import start_ranks
from tests.parity import assert_weights_match, loss_atol

pytestmark = pytest.mark.dist
STEPS, ROWS, T = 3, 6, 12
# (replicas, workers, mode) per world size; each world size is one spawn of processes
CASES = {2: [(1, 2, "joint"), (1, 2, "progressive"), (2, 1, "joint")],
         4: [(2, 2, "progressive")]}


def lm_cfg(replicas: int, workers: int, mode: str, dtype: str = "float64"):
    return load_config(None, ["model.kind=paraformer_lm", "data.name=text", f"model.context={T}",
                              "model.dim=16", "model.heads=2", "model.mlp_dim=32", "model.num_branches=4",
                              "model.branch_depth=2", f"model.dtype={dtype}", "train.lr=3e-3",
                              f"train.mode={mode}", f"parallel.workers={workers}",
                              f"parallel.replicas={replicas}", "parallel.timeout_s=60"])


def batch(i: int):
    w = torch.randint(0, 259, (ROWS, T + 1), generator=torch.Generator().manual_seed(i))
    return w[:, :-1], w[:, 1:]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    process_group.set_env(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=world)
    process_group.init_from_env(timeout_s=60)
    results = []
    for r, w, mode in CASES[world]:  # every rank forms each case's group, in order
        shard = LMShard(lm_cfg(r, w, mode), worker_rank=rank % w, total_steps=30)
        shard.attach_group()
        losses = [shard.train_step(*batch(i))["loss"] for i in range(STEPS)]
        results.append({"losses": losses, "state": shard.model.state_dict(), "owned": shard.model.branch_ids})
    torch.save(results, f"{out}/rank{rank}.pt")
    process_group.destroy()


def single(cfg):
    """The whole model in one process (LocalComm), trained on the whole batches."""
    torch.set_num_threads(1)
    shard = LMShard(cfg.replace(parallel={"workers": 0, "replicas": 1}), worker_rank=0, total_steps=30)
    losses = [shard.train_step(*batch(i))["loss"] for i in range(STEPS)]
    return shard.model.state_dict(), losses, shard.step


@pytest.mark.parametrize("world", sorted(CASES))
def test_lm_training_equals_single_process(tmp_path, world):
    start_ranks(_worker, world, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    for i, (r, w, mode) in enumerate(CASES[world]):
        cfg = lm_cfg(r, w, mode)
        expected, losses, steps = single(cfg)
        assert steps == STEPS * (5 if mode == "progressive" else 1)
        for rank in range(world):
            g = got[rank][i]
            assert g["owned"] == [b for b in range(4) if b // (4 // w) == rank % w]
            assert g["losses"] == pytest.approx(losses, abs=loss_atol(cfg)), (r, w, mode, rank)
            assert_weights_match(g["state"], expected, cfg, steps=steps, total_steps=30)
            assert {k for k in g["state"] if k.startswith("branches.")} < \
                {k for k in expected if k.startswith("branches.")} or w == 1
