"""Every collective of the layer-parallel runtime, each a named verb: the only file that runs
collectives on the workers' process group. Elsewhere torch.distributed is only set up or inspected --
parallel/process_group.py creates and destroys the group (init/new_group/destroy), runtime/recovery.py
reads its error type -- except bench/pipeline.py, a benchmark baseline (the pipelined ViT) with its
own process group, its own start broadcast and torch.distributed.pipelining's send/recv.

The autograd algebra of a layer-parallel Para-Former (docs/RUNTIME.md, "Training: the autograd algebra"):

    forward:  x is broadcast to every worker;      y = sum_w p_w        (reduce_branch_sums;
              inference: gather_branch_sums, y on rank 0 only)
    backward: dL/dy is broadcast to every worker;  dL/dx0 = sum_w dL/dx0_w
              (sum_replicated_grads_and_owned_sq: the embedding's gradients summed over ranks)

Every worker holds the full y after the reduce and computes the same head and loss, so every worker
already holds the full dL/dy: the backward of the reduce is the identity (broadcast_output_grad).
Making it an all-reduce as well -- the classic trap -- would multiply every branch gradient by W.

`LocalComm` is the world of one process: the same verbs, no communication. The training step in
`layerpar.train.step` is written once against these verbs and runs unchanged in both.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from layerpar.model.paraformer import ordered_sum


class CollectiveError(RuntimeError):
    """A collective (or forming the group) failed: a peer died, hung past the group's timeout, or its
    connection broke. Raised from here and from process_group; the runtime tells such a failure from a
    bug in the call by this type (failed_collective), never by the message."""


def failed_collective(exc: BaseException | None) -> bool:
    """Did this exception come from a failed collective (or rendezvous), not a bug in the call?"""
    return isinstance(exc, CollectiveError | dist.DistError)


def _run(verb, *args, **kwargs):
    """Every torch.distributed call of this file goes through here: its failure becomes a
    CollectiveError (gloo reports a dead peer as a RuntimeError naming its socket)."""
    try:
        return verb(*args, **kwargs)
    except RuntimeError as exc:
        raise CollectiveError(f"{verb.__name__} failed: {exc}") from exc


class LocalComm:
    """One process holds every branch: every verb is the identity."""

    world_size, rank = 1, 0

    def reduce_branch_sums(self, outputs: torch.Tensor, num_branches: int | None = None) -> torch.Tensor:
        return ordered_sum(outputs)

    def gather_branch_sums(self, outputs: torch.Tensor, num_branches: int | None = None) -> torch.Tensor:
        return ordered_sum(outputs)

    def sum_replicated_grads_and_owned_sq(self, params: Iterable[torch.nn.Parameter],
                                          owned: Iterable[torch.Tensor]) -> torch.Tensor:
        return sq_norm(list(owned))

    def all_branch_rows(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def share_objects(self, obj) -> list:
        return [obj]

    def any_true(self, flag: bool) -> bool:
        return bool(flag)


def sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squared norms as a float64 scalar on every rank, whatever the gradients' dtype: ranks
    all-reduce it together, so its dtype must not depend on which gradients a rank holds (a rank with
    no trainable branch in a prefix step has none), and float64 adds no rounding to a float64 run."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    wide = [g.detach() if g.dtype == torch.float64 else g.detach().float() for g in grads]
    return torch.stack(torch._foreach_norm(wide)).double().square().sum()


def _padded(outputs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(K_w, B, D) -> (max K, B, D): gathers need one shape on every rank."""
    k_max, (_, b, d) = max(counts), outputs.shape
    padded = outputs.new_zeros((k_max, b, d))
    padded[: outputs.shape[0]] = outputs
    return padded


def _sum_in_branch_order(parts: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    rows = torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])  # (N, B, D) in branch order
    return ordered_sum(rows)


class _ReduceBranchSums(torch.autograd.Function):
    """Forward: gather every worker's pooled branch rows (K_w, B, D) and add all N of them in branch
    order, exactly as one process would: every rank gets the same bits as the single-process model.
    Backward: broadcast_output_grad -- each worker already holds the full dL/dy."""

    @staticmethod
    def forward(ctx, outputs: torch.Tensor, group, counts: list[int]) -> torch.Tensor:
        padded = _padded(outputs, counts)
        parts = [torch.empty_like(padded) for _ in counts]
        _run(dist.all_gather, parts, padded, group=group)  # blocks until every rank joins
        ctx.num_own = outputs.shape[0]
        return _sum_in_branch_order(parts, counts)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return broadcast_output_grad(grad_y, ctx.num_own), None, None


def broadcast_output_grad(grad_y: torch.Tensor, num_own: int) -> torch.Tensor:
    """dL/dy reaches every branch (y is a plain sum, so each branch row gets dL/dy). Every rank
    computed the same loss from the same y, so each already holds it: no communication, and no
    factor W."""
    return grad_y.unsqueeze(0).expand(num_own, *grad_y.shape)


class GroupComm:
    """The worker group of a torch.distributed process group (gloo on CPU, NCCL on GPU), or the
    sub-group of ranks 0..r-1 that own the branches of a prefix model."""

    def __init__(self, layout, group=None) -> None:
        self.layout, self.group = layout, group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def reduce_branch_sums(self, outputs: torch.Tensor, num_branches: int | None = None) -> torch.Tensor:
        """Every worker's pooled rows of its branches below `num_branches` (K_w, B, D) -> the (B, D)
        sum over all of them, on every worker of the group."""
        return _ReduceBranchSums.apply(outputs, self.group, self._counts(num_branches))

    def gather_branch_sums(self, outputs: torch.Tensor, num_branches: int | None = None
                           ) -> torch.Tensor | None:
        """Inference: the same (B, D) sum, on rank 0 only (None on the others), with one gather: the
        other ranks need no result, and a rank that arrives last returns once its rows are sent
        (an all_gather would also make it wait for its peers' rows). No autograd."""
        counts = self._counts(num_branches)
        padded = _padded(outputs, counts)
        parts = [torch.empty_like(padded) for _ in counts] if self.rank == 0 else None
        _run(dist.gather, padded, parts, dst=0, group=self.group)  # global rank 0 is every group's rank 0
        return _sum_in_branch_order(parts, counts) if self.rank == 0 else None

    def _counts(self, num_branches: int | None) -> list[int]:
        """Branches below num_branches that each rank of the group owns."""
        k = self.layout.num_branches if num_branches is None else num_branches
        return [sum(1 for b in self.layout.owned(r) if b < k) for r in range(self.world_size)]

    def sum_replicated_grads_and_owned_sq(self, params: Iterable[torch.nn.Parameter],
                                          owned: Iterable[torch.Tensor]) -> torch.Tensor:
        """Sum the gradients of replicated parameters (the embedding; a missing one counts as zero) so
        every replica steps alike, and the squared norms of every rank's own gradients, in ONE sum
        over ranks: this rank's owned squared norm rides at the end of the flat replicated gradients
        (a collective costs ~1 ms of latency here, its few KB nothing). Returns the sum over ranks of
        the owned squared norms; the caller adds the replicated gradients' squared norm once (the
        global norm the clip needs)."""
        params = list(params)
        owned_sq = sq_norm(list(owned))
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # the buffer takes the gradients' dtype (the norm only sets the clip factor; a float64
        # run stays float64); every rank must use the same dtype, which the model's dtype fixes
        wide = grads[0].dtype if grads else torch.float64
        device = grads[0].device if grads else _device()
        flat = torch.cat([g.reshape(-1).to(wide) for g in grads]
                         + [owned_sq.to(device=device, dtype=wide).reshape(1)])
        flat = _sum_over_ranks(flat, self.group)  # blocks until every rank contributes
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        return flat[-1].to(torch.float64)

    def all_branch_rows(self, outputs: torch.Tensor) -> torch.Tensor:
        """Evaluation: every rank's pooled rows of all its branches (K_w, B, D) -> all N rows
        (N, B, D) in branch order, on every rank (one all_gather; no autograd)."""
        counts = self._counts(None)
        padded = _padded(outputs, counts)
        parts = [torch.empty_like(padded) for _ in counts]
        _run(dist.all_gather, parts, padded, group=self.group)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    def share_objects(self, obj) -> list:
        """Every rank's small picklable object, in rank order, on every rank (checkpoint hashes,
        per-rank timings)."""
        out: list = [None] * self.world_size
        _run(dist.all_gather_object, out, obj, group=self.group)
        return out

    def any_true(self, flag: bool) -> bool:
        """True on every rank if any rank's flag is true (ranks agree on stopping early)."""
        t = torch.tensor([1.0 if flag else 0.0], device=_device())
        return bool(_sum_over_ranks(t, self.group).item() > 0)


GATHER_SUM_MAX = 1 << 20  # elements gathered in all (size x ranks) below which gloo sums by gathering


def _sum_over_ranks(flat: torch.Tensor, group) -> torch.Tensor:
    """The sum over the group's ranks of a 1-D tensor, the same bits on every rank. On gloo a small
    buffer is all-gathered and added in rank order: gloo's all_reduce of a few KB costs ~1.5-2.4 ms
    on two CPU ranks, an all_gather of 128 KB ~0.5 ms (docs/BENCHMARKS.md, "SPMD step"); NCCL, or a
    buffer too large to hold W times, takes the all_reduce."""
    world = dist.get_world_size(group)
    if world == 1:
        return flat
    if dist.get_backend(group) != "gloo" or flat.numel() * world > GATHER_SUM_MAX:
        _run(dist.all_reduce, flat, group=group)
        return flat
    parts = [torch.empty_like(flat) for _ in range(world)]
    _run(dist.all_gather, parts, flat, group=group)
    return ordered_sum(parts)  # rank order: the same bits on every rank


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
