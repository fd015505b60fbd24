"""Every collective of layerpar, each a named verb. The only file that calls torch.distributed.

The autograd algebra of a layer-parallel Para-Former (DESIGN.md section 3):

    forward:  x is broadcast to every worker;      y = sum_w p_w        (reduce_branch_sums)
    backward: dL/dy is broadcast to every worker;  dL/dx0 = sum_w dL/dx0_w  (sum_replicated_grads)

Every worker holds the full y after the reduce and computes the same head and loss, so every worker
already holds the full dL/dy: the backward of the reduce is the identity (broadcast_output_grad).
Making it an all-reduce as well -- the classic trap -- would multiply every branch gradient by W.

`LocalComm` is the world of one process: the same verbs, no communication. The training step in
`layerpar.train.step` is written once against these verbs and runs unchanged in both.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist


class LocalComm:
    """One process holds every branch: every verb is the identity."""

    world_size, rank = 1, 0

    def reduce_branch_sums(self, partial: torch.Tensor) -> torch.Tensor:
        return partial

    def sum_replicated_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        return None

    def global_grad_norm(self, owned: Iterable[torch.Tensor], replicated: Iterable[torch.Tensor]
                         ) -> torch.Tensor:
        return _sq_norm(list(owned) + list(replicated)).sqrt()

    def barrier(self) -> None:
        return None


def _sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()


class _ReduceBranchSums(torch.autograd.Function):
    """Forward: gather every worker's partial sum and add them in rank (= branch) order.
    Backward: broadcast_output_grad -- each worker already holds the full dL/dy."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(partial) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, partial.contiguous())  # blocks until every rank contributes
        total = parts[0]
        for p in parts[1:]:  # fixed branch order: every rank gets bit-identical sums
            total = total + p
        return total

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        return broadcast_output_grad(grad_y)


def broadcast_output_grad(grad_y: torch.Tensor) -> torch.Tensor:
    """dL/dy reaches every branch. Every rank computed the same loss from the same y, so each
    already holds it: no communication, and no factor W."""
    return grad_y


class GroupComm:
    """The worker group of a torch.distributed process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self) -> None:
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()

    def reduce_branch_sums(self, partial: torch.Tensor) -> torch.Tensor:
        """Every worker's (B, D) partial sum -> the (B, D) total on every worker."""
        return _ReduceBranchSums.apply(partial)

    def sum_replicated_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of replicated parameters (the embedding) so every replica steps alike.
        One flat all-reduce; a missing gradient counts as zero."""
        params = list(params)
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        dist.all_reduce(flat)  # blocks until every rank contributes
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def global_grad_norm(self, owned: Iterable[torch.Tensor], replicated: Iterable[torch.Tensor]
                         ) -> torch.Tensor:
        """sqrt(sum over workers of their own branches' squared norms + the replicated ones once)."""
        owned_sq = _sq_norm(list(owned)).to(_device())
        dist.all_reduce(owned_sq)  # blocks until every rank contributes
        return (owned_sq + _sq_norm(list(replicated)).to(owned_sq.device)).sqrt()

    def gather_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Every worker's tensor of the same shape, in rank order (used for evaluation and checks)."""
        parts = [torch.empty_like(rows) for _ in range(self.world_size)]
        dist.all_gather(parts, rows.contiguous())
        return parts

    def barrier(self, timeout_s: float | None = None) -> None:
        if timeout_s is None:
            dist.barrier()
        else:
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s)) if dist.get_backend() == "gloo" \
                else dist.barrier()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
