"""GPU tier: the model and a worker's shard on CUDA, with NCCL. Skipped where no GPU is present.

Run on a GPU machine:  python -m pytest -q tests/gpu
"""

import pytest
import torch
import torch.multiprocessing as mp

from layerpar.config import load_config
from layerpar.model import ParaFormer
from layerpar.parallel import process_group
from layerpar.parallel.comm import LocalComm
from layerpar.train.optim import make_optimizer
from layerpar.train.shard import BranchShard
from layerpar.train.step import train_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none found)"),
]


def make_cfg(*extra: str):
    return load_config(None, ["model.num_branches=8", "model.dim=64", "model.heads=4",
                              "model.mlp_dim=128", "train.lr=1e-3", *extra])


def test_fused_stack_matches_loop_on_cuda():
    model = ParaFormer(make_cfg().model).cuda().eval()
    x = torch.randn(16, 1, 8, 8, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(x, fused=True), model(x, fused=False), atol=1e-4, rtol=1e-4)
        cpu = ParaFormer(make_cfg().model).eval()
        torch.testing.assert_close(model(x).cpu(), cpu(x.cpu()), atol=1e-4, rtol=1e-4)


def _nccl_worker(rank: int, world: int, port: int, out: str) -> None:
    process_group.set_env(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    shard = BranchShard(make_cfg(f"parallel.workers={world}", "parallel.gpus_per_worker=1"),
                        worker_rank=rank, total_steps=20)
    shard.join_group()  # NCCL: one GPU per rank
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    losses = [shard.train_step(x, y)["loss"] for _ in range(3)]
    logits, _ = shard.infer(x, 8, reduce=True)
    torch.save({"losses": losses, "logits": logits,
                "state": {k: v.cpu() for k, v in shard.model.state_dict().items()}}, f"{out}/{rank}.pt")
    process_group.destroy()


def test_shard_trains_with_nccl_like_the_cpu_model(tmp_path):
    world = torch.cuda.device_count()  # NCCL needs a distinct GPU per rank
    mp.start_processes(_nccl_worker, args=(world, process_group.free_port(), str(tmp_path)),
                       nprocs=world, join=True, start_method="spawn")
    cfg = make_cfg(f"parallel.workers={world}")
    reference = ParaFormer(cfg.model)
    opt = make_optimizer(reference, cfg.train)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    step, losses = 0, []
    for _ in range(3):
        out = train_step(reference, opt, LocalComm(), x, y, cfg=cfg, step=step, total_steps=20)
        step = out["step"]
        losses.append(out["loss"])
    got = torch.load(tmp_path / "0.pt")
    assert got["losses"] == pytest.approx(losses, abs=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], reference.eval()(x), atol=1e-3, rtol=1e-3)
    expected = reference.state_dict()
    for name, value in got["state"].items():
        torch.testing.assert_close(value, expected[name], atol=1e-3, rtol=1e-3, msg=name)
