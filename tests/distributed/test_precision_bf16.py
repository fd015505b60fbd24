"""Dist tier: bfloat16 mixed precision (train.precision=bfloat16) on a gloo group of two processes
equals the one-process bfloat16 run.

The tolerance. Both runs compute every branch under the same autocast and reduce the branch rows in
float32 in branch order, so the forward is the same up to the float32 reordering of the embedding's
gradient (a sum over ranks vs one sum) and of the fused stack's batching (~1e-7 relative). bfloat16
keeps 8 bits of mantissa: such a difference flips a bfloat16 rounding now and then (an error of
2^-8 relative in that element), and AdamW turns a changed gradient element into a move of up to ~lr
(tests/parity.py). So the weights are compared within a share of the summed learning rates, as for
float32, but a larger one: BF16_LR_SHARE = 25% (seen on this 2-core machine: 4.8% after 5 steps); an
algebra error (a branch missing, a gradient counted twice) moves nearly every weight by ~lr per step,
i.e. ~100% of the sum. The losses of each step agree to BF16_LOSS_RTOL (bfloat16's own resolution,
2^-8 ~ 0.4%, with margin).
"""

import pytest
import torch

from layerpar.parallel import process_group
from layerpar.train.shard import BranchShard
from tests.distributed.ranks import start_ranks
from tests.distributed.test_comm import batch, make_cfg
from tests.parity import lr_sum

pytestmark = pytest.mark.dist
STEPS = 5
TOTAL = 30
BF16_LR_SHARE = 0.25
BF16_LOSS_RTOL = 0.02


def bf16_cfg(workers: int):
    return make_cfg(workers).replace(train={"precision": "bfloat16"})


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    process_group.set_env(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=world)
    shard = BranchShard(bf16_cfg(world), worker_rank=rank, total_steps=TOTAL)
    shard.join_group()
    losses = [shard.train_step(*batch(i))["loss"] for i in range(STEPS)]
    torch.save({"losses": losses, "state": shard.model.state_dict()}, f"{out}/rank{rank}.pt")
    process_group.destroy()


def test_bf16_on_two_ranks_equals_one_process_bf16(tmp_path):
    world = 2
    start_ranks(_worker, world, str(tmp_path))
    torch.set_num_threads(1)
    cfg = bf16_cfg(0)
    one = BranchShard(cfg, worker_rank=0, total_steps=TOTAL)  # the world of one: every branch, LocalComm
    losses = [one.train_step(*batch(i))["loss"] for i in range(STEPS)]
    expected = one.model.state_dict()
    assert all(v.dtype == torch.float32 for v in expected.values())  # master weights stay float32
    atol = BF16_LR_SHARE * lr_sum(cfg, STEPS, TOTAL)
    worst = 0.0
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["losses"] == pytest.approx(losses, rel=BF16_LOSS_RTOL)
        for name, value in got["state"].items():
            assert value.dtype == torch.float32, name
            worst = max(worst, (value - expected[name]).abs().max().item())
    owned = {k for r in range(world) for k in torch.load(tmp_path / f"rank{r}.pt")["state"]}
    assert {k for k in expected if k.startswith("branches.")} <= owned  # every branch was compared
    print(f"\n[bf16 W=2 vs one process] max weight diff {worst:.3g} = "
          f"{100 * worst / lr_sum(cfg, STEPS, TOTAL):.2f}% of the summed lr (bound {100 * BF16_LR_SHARE:g}%)")
    assert worst <= atol
