"""Dist tier: real gloo process groups of 2-3 processes, formed from the torchrun variables, no Ray.

The shard code here is exactly what a Ray worker runs; these tests show it also runs under plain
torchrun-style processes and that its gradients and weights equal the single-process model's: in
float64 to 1e-10 (the algebra), in float32 within tests/parity.py's step-size tolerance.
"""

import pytest
import torch

from layerpar.config import load_config
from layerpar.model import ParaFormer
from layerpar.parallel import process_group
from layerpar.parallel.comm import LocalComm, sq_norm
from layerpar.train.optim import make_optimizer
from layerpar.train.shard import BranchShard
from layerpar.train.step import train_step
from tests.distributed.ranks import start_ranks
from tests.parity import assert_weights_match, loss_atol

pytestmark = pytest.mark.dist
N = 6
STEPS = 5  # batches of training steps


def make_cfg(workers: int, mode: str = "joint", dtype: str = "float32"):
    return load_config(None, [f"model.num_branches={N}", "model.dim=32", "model.heads=2",
                              "model.mlp_dim=64", f"parallel.workers={workers}", "train.lr=1e-3",
                              f"train.mode={mode}", f"model.dtype={dtype}", "parallel.timeout_s=60"])


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 1, 8, 8, generator=g), torch.randint(0, 10, (10,), generator=g)


class _NaiveAllReduce(torch.autograd.Function):
    """The classic trap: an all-reduce whose backward is also an all-reduce."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        torch.distributed.all_reduce(g)
        return g


def _grads_worker(rank: int, world: int, port: int, dtype: str, out: str) -> None:
    torch.set_num_threads(1)
    process_group.set_env(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=world)
    shard = BranchShard(make_cfg(world, dtype=dtype), worker_rank=rank)
    shard.join_group()
    model, comm = shard.model, shard.comms[world]
    x, y = batch(0)
    result = {}
    for name in ("layerpar", "naive"):
        model.zero_grad(set_to_none=True)
        x0 = model.embed(x)
        rows = model.branch_outputs(x0, model.branch_ids)
        if name == "layerpar":
            total = comm.reduce_branch_sums(rows)
        else:
            total = _NaiveAllReduce.apply(rows.sum(0))
        loss = torch.nn.functional.cross_entropy(model.head(total), y)
        loss.backward()
        if name == "layerpar":
            own = [p for b in model.branch_ids for p in model.branch(b).parameters()]
            owned_sq, _ = comm.sum_grads(own, list(model.head.parameters()),
                                         list(model.embed.parameters()), loss.detach())
            rep = [p.grad for m in (model.embed, model.head) for p in m.parameters()]
            result["norm"] = (owned_sq + sq_norm(rep)).sqrt().item()
        result[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
    torch.save(result, f"{out}/rank{rank}.pt")
    process_group.destroy()


def _train_worker(rank: int, world: int, port: int, mode: str, dtype: str, out: str) -> None:
    torch.set_num_threads(1)
    process_group.set_env(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=world)
    shard = BranchShard(make_cfg(world, mode, dtype), worker_rank=rank, total_steps=30)
    shard.join_group()
    losses = [shard.train_step(*batch(i))["loss"] for i in range(STEPS)]
    torch.save({"losses": losses, "state": shard.model.state_dict()}, f"{out}/rank{rank}.pt")
    process_group.destroy()


# float64 (the algebra) at both group sizes; float32 (the tolerance) at the larger one.
@pytest.mark.parametrize(("world", "dtype"), [(2, "float64"), (3, "float64"), (3, "float32")])
def test_gradients_equal_single_process_and_naive_allreduce_is_w_times(tmp_path, world, dtype):
    start_ranks(_grads_worker, world, dtype, str(tmp_path))
    torch.set_num_threads(1)
    reference = ParaFormer(make_cfg(world, dtype=dtype).model)
    x, y = batch(0)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    expected = {k: p.grad for k, p in reference.named_parameters()}
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()])).item()
    # One backward pass: no optimizer amplifies the reordering noise (float32: ~1e-7 relative).
    atol, rtol = (1e-12, 1e-10) if dtype == "float64" else (1e-6, 1e-5)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["norm"] == pytest.approx(norm, rel=rtol)
        for name, grad in got["layerpar"].items():
            assert grad.dtype == expected[name].dtype
            torch.testing.assert_close(grad, expected[name], atol=atol, rtol=rtol, msg=name)
            if name.startswith("branches."):
                # The trap multiplies every branch gradient by the world size.
                torch.testing.assert_close(got["naive"][name], world * expected[name], atol=10 * atol,
                                           rtol=10 * rtol, msg=name)


# float64 (the algebra) at both group sizes and in both modes; float32 (the tolerance) on the larger
# group in progressive mode (the most optimizer steps).
@pytest.mark.parametrize(("world", "mode", "dtype"), [
    (2, "joint", "float64"), (3, "joint", "float64"),  # W = 2 progressive: test_mesh.py's 2 x 2 meshes
    (3, "progressive", "float64"), (3, "progressive", "float32")])
def test_torchrun_style_training_equals_single_process(tmp_path, world, mode, dtype):
    start_ranks(_train_worker, world, mode, dtype, str(tmp_path))
    torch.set_num_threads(1)
    cfg = make_cfg(world, mode, dtype)
    reference = ParaFormer(cfg.model)
    opt = make_optimizer(reference, cfg.train)
    step, losses = 0, []
    for i in range(STEPS):
        out = train_step(reference, opt, LocalComm(), *batch(i), cfg=cfg, step=step, total_steps=30)
        step = out["step"]
        losses.append(out["loss"])
    expected = reference.state_dict()
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["losses"] == pytest.approx(losses, abs=loss_atol(cfg))
        # each rank holds its own branches and the replicas
        assert_weights_match(got["state"], expected, cfg, steps=step, total_steps=30)
