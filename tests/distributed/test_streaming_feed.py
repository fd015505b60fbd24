"""Dist tier: the streamed feed's two verbs on gloo processes, no Ray -- broadcast_batch (the branch
group's leader sends its batch once; shapes first, so any dtype, size, and a replica's empty share)
and sum_over_replicas (the replicas' evaluation counts, the same bits on every rank, in replica
order). The Ray Data side is in tests/ray/test_streaming_feed_ray.py, the whole loop in
tests/raytrain/test_raytrain_streaming.py."""

import pytest
import torch

from layerpar.parallel import process_group
from layerpar.parallel.comm import GroupComm, LocalComm
from layerpar.parallel.layout import BranchLayout
from tests.distributed.ranks import start_ranks

pytestmark = pytest.mark.dist


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 10, (5,), generator=g)),
            (torch.randn(3, 3, 4, 4, generator=g).double(), torch.arange(3)),  # another dtype and shape
            (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))]  # an empty share


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    process_group.set_env(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=world)
    process_group.init_from_env(timeout_s=60)
    layout = BranchLayout(4, world)
    group = GroupComm(layout, None)  # one branch group of 2: rank 0 leads
    got = [group.broadcast_batch(*(b if rank == 0 else (None, None))) for b in batches()]
    mesh = GroupComm(BranchLayout(4, 1), *process_group.new_mesh(2, 1, torch.device("cpu"), timeout_s=60))
    counts = torch.tensor([1.0 + rank, 0.1 * (rank + 1), 3.0], dtype=torch.float64)
    summed = mesh.sum_over_replicas(counts)
    torch.save({"got": got, "summed": summed, "replica": mesh.replica,
                "bytes": group.traffic.bytes}, f"{out}/rank{rank}.pt")
    process_group.destroy()


def test_broadcast_batch_and_sum_over_replicas(tmp_path):
    start_ranks(_worker, 2, str(tmp_path))
    want = batches()
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        for (x, y), (wx, wy) in zip(r["got"], want, strict=True):
            assert x.dtype == wx.dtype and torch.equal(x, wx) and torch.equal(y, wy)
        # replica order: (1 + 2, 0.1 + 0.2, 3 + 3), the same bits on both ranks
        assert r["summed"].tolist() == [3.0, 0.1 + 0.2, 6.0] and r["replica"] == rank
    # the leader sent each non-empty batch once; the receiver sent nothing
    sizes = sum(x.nbytes + y.nbytes for x, y in want[:2])
    assert torch.load(tmp_path / "rank0.pt")["bytes"] == sizes
    assert torch.load(tmp_path / "rank1.pt")["bytes"] == 0
    x, y = LocalComm().broadcast_batch(*want[0])  # a world of one: the batch as it is
    assert x is want[0][0] and y is want[0][1]
