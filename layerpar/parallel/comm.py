"""Every collective of the layer-parallel runtime, each a named verb: the only file that runs
collectives on the workers' process group. Elsewhere torch.distributed is only set up or inspected --
parallel/process_group.py creates and destroys the group (init/new_group/destroy), runtime/recovery.py
reads its error type -- except two benchmark baselines with their own collectives: bench/pipeline.py
(the pipelined ViT: its own process group, start broadcast and torch.distributed.pipelining's
send/recv) and bench/ddp.py (DistributedDataParallel's bucketed gradient all-reduce).

The autograd algebra of a layer-parallel Para-Former (docs/RUNTIME.md, "Training: the autograd algebra"):

    forward:  x is broadcast to every worker;      y = sum_w p_w        (reduce_branch_sums;
              inference: gather_branch_sums, y on rank 0 only)
    backward: dL/dy is broadcast to every worker;  dL/dx0 = sum_w dL/dx0_w
              (sum_grads: the embedding's gradients summed over ranks)

Every worker holds the full y after the reduce and computes the same head and loss, so every worker
already holds the full dL/dy: the backward of the reduce is the identity (broadcast_output_grad).
Making it an all-reduce as well -- the classic trap -- would multiply every branch gradient by W.

The training mesh adds a replica axis: R replicas x W branch ranks (a device_mesh of shape
(replica, branch), process_group.new_mesh). Each replica trains on its share of every batch, with the
loss of its rows divided by the whole batch's size, so sums over the replica axis are the gradients of
the whole batch's mean loss (sum_grads): a branch's and the head's gradients are summed over the
replica axis, the embedding's over the whole mesh, the squared norm over the branch axis after that.

Streamed training data (data.streaming, train/feed.py): only rank 0 of a branch group reads each
batch and sends it to the group's other ranks once (broadcast_batch); each replica evaluates its share
of val / test and the counts are summed over the replica axis (sum_over_replicas).

`LocalComm` is the world of one process: the same verbs, no communication. The training step in
`layerpar.train.step` is written once against these verbs and runs unchanged in both.
"""

from __future__ import annotations

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


class Traffic:
    """What this rank put on the wire: bytes sent and collectives joined, counted from the tensors
    under ring algorithms (an all_gather of S bytes over n ranks sends (n-1)S, an all_reduce
    2(n-1)S/n, a gather S from every rank but the root). bench/train_costmodel.py has the same rules."""

    def __init__(self) -> None:
        self.bytes, self.calls = 0.0, 0

    def add(self, kind: str, nbytes: int, n: int, *, root: bool = False) -> None:
        if n > 1:
            self.calls += 1
            self.bytes += {"all_gather": (n - 1) * nbytes, "all_reduce": 2 * (n - 1) * nbytes / n,
                           "gather": 0 if root else nbytes, "broadcast": nbytes if root else 0}[kind]


class LocalComm:
    """One process holds every branch: every verb is the identity."""

    world_size, rank, replicas, replica = 1, 0, 1, 0

    def __init__(self) -> None:
        self.traffic = Traffic()  # nothing is sent

    def reduce_branch_sums(self, outputs: torch.Tensor, num_branches: int | None = None) -> torch.Tensor:
        return ordered_sum(outputs)

    def gather_branch_sums(self, outputs: torch.Tensor, num_branches: int | None = None) -> torch.Tensor:
        return ordered_sum(outputs)

    def sum_grads(self, owned: list[torch.nn.Parameter], head: list[torch.nn.Parameter],
                  embed: list[torch.nn.Parameter], loss: torch.Tensor) -> tuple[torch.Tensor, float]:
        return sq_norm([p.grad for p in owned]), float(loss)

    def all_branch_rows(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def share_objects(self, obj, *, mesh: bool = False) -> list:
        return [obj]

    def any_true(self, flag: bool) -> bool:
        return bool(flag)

    def broadcast_batch(self, x: torch.Tensor | None, y: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def sum_over_replicas(self, t: torch.Tensor) -> torch.Tensor:
        return t


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
    def forward(ctx, outputs: torch.Tensor, comm: GroupComm, counts: list[int]) -> torch.Tensor:
        padded = _padded(outputs, counts)
        parts = [torch.empty_like(padded) for _ in counts]
        comm.traffic.add("all_gather", padded.nbytes, len(counts))
        _run(dist.all_gather, parts, padded, group=comm.group)  # blocks until every rank joins
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
    sub-group of ranks 0..r-1 that own the branches of a prefix model. In a training mesh `group` is
    this rank's branch group (its replica's W ranks) and `replica_group` the R ranks that own the same
    branches; rank and world_size are those of the branch group."""

    def __init__(self, layout, group=None, replica_group=None) -> None:
        self.layout, self.group, self.replica_group = layout, group, replica_group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.replicas = 1 if replica_group is None else dist.get_world_size(replica_group)
        self.replica = 0 if replica_group is None else dist.get_rank(replica_group)
        self._everyone = None if replica_group is not None else group  # the whole mesh (None: world)
        self.traffic = Traffic()

    def reduce_branch_sums(self, outputs: torch.Tensor, num_branches: int | None = None) -> torch.Tensor:
        """Every worker's pooled rows of its branches below `num_branches` (K_w, B, D) -> the (B, D)
        sum over all of them, on every worker of the group."""
        return _ReduceBranchSums.apply(outputs, self, self._counts(num_branches))

    def gather_branch_sums(self, outputs: torch.Tensor, num_branches: int | None = None
                           ) -> torch.Tensor | None:
        """Inference: the same (B, D) sum, on rank 0 only (None on the others), with one gather: the
        other ranks need no result, and a rank that arrives last returns once its rows are sent
        (an all_gather would also make it wait for its peers' rows). No autograd."""
        counts = self._counts(num_branches)
        padded = _padded(outputs, counts)
        parts = [torch.empty_like(padded) for _ in counts] if self.rank == 0 else None
        self.traffic.add("gather", padded.nbytes, len(counts), root=self.rank == 0)
        _run(dist.gather, padded, parts, dst=0, group=self.group)  # global rank 0 is every group's rank 0
        return _sum_in_branch_order(parts, counts) if self.rank == 0 else None

    def reduce_to_leader(self, partial: torch.Tensor) -> torch.Tensor | None:
        """Decoding (runtime/lm_worker.py): this rank's branch sum (B, D) -> the sum over the group's
        ranks on rank 0 (None elsewhere), one reduce (NCCL's on GPUs); in place. No autograd."""
        self.traffic.add("gather", partial.nbytes, self.world_size, root=self.rank == 0)
        _run(dist.reduce, partial, dst=0, group=self.group)
        return partial if self.rank == 0 else None

    def _counts(self, num_branches: int | None) -> list[int]:
        """Branches below num_branches that each rank of the group owns."""
        k = self.layout.num_branches if num_branches is None else num_branches
        return [sum(1 for b in self.layout.owned(r) if b < k) for r in range(self.world_size)]

    def sum_grads(self, owned: list[torch.nn.Parameter], head: list[torch.nn.Parameter],
                  embed: list[torch.nn.Parameter], loss: torch.Tensor) -> tuple[torch.Tensor, float]:
        """After backward: the gradients of the whole mesh's batch, in place, in at most two sums.
        (1) Over the replica axis (R > 1): every gradient this rank holds -- its branches', the
        head's, the embedding's -- and the loss, in one flat buffer (replicas that own the same
        branches hold the same set of gradients). (2) Over the branch axis (W > 1): the embedding's
        gradients (a missing one counts as zero), with this rank's squared norm of its branch
        gradients riding at the end (a collective costs ~1 ms of latency here, its few KB nothing).
        The head's gradients already agree across a replica's ranks. Returns the squared norm of
        every branch gradient of the model (the caller adds the replicated ones' once: the global
        norm the clip needs) and the loss of the whole batch."""
        if self.replicas > 1:
            held = [p for p in [*owned, *head, *embed] if p.grad is not None]
            grads = [p.grad for p in held]
            flat = _flat(grads + [loss.detach()], grads[0] if grads else loss)
            flat = _sum_over_ranks(flat, self.replica_group, self.traffic)
            _unflat(flat, held)
            loss = flat[-1]
        owned_sq = sq_norm([p.grad for p in owned])
        if self.world_size > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in embed]
            # the buffer takes the gradients' dtype (the norm only sets the clip factor; a float64
            # run stays float64); every rank must use the same dtype, which the model's dtype fixes
            like = grads[0] if grads else torch.zeros((), dtype=torch.float64, device=_device())
            flat = _sum_over_ranks(_flat(grads + [owned_sq], like), self.group, self.traffic)
            _unflat(flat, embed)
            owned_sq = flat[-1]
        return owned_sq.to(torch.float64), float(loss)

    def all_branch_rows(self, outputs: torch.Tensor) -> torch.Tensor:
        """Evaluation: every rank's pooled rows of all its branches (K_w, B, D) -> all N rows
        (N, B, D) in branch order, on every rank of the branch group (one all_gather; no autograd)."""
        counts = self._counts(None)
        padded = _padded(outputs, counts)
        parts = [torch.empty_like(padded) for _ in counts]
        _run(dist.all_gather, parts, padded, group=self.group)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    def share_objects(self, obj, *, mesh: bool = False) -> list:
        """Every rank's small picklable object, in rank order, on every rank of the branch group (or
        of the whole mesh: mesh=True) -- checkpoint hashes, per-rank timings."""
        group = self._everyone if mesh else self.group
        out: list = [None] * dist.get_world_size(group)
        _run(dist.all_gather_object, out, obj, group=group)
        return out

    def any_true(self, flag: bool) -> bool:
        """True on every rank of the mesh if any rank's flag is true (ranks agree on stopping early)."""
        t = torch.tensor([1.0 if flag else 0.0], device=_device())
        return bool(_sum_over_ranks(t, self._everyone).item() > 0)

    def broadcast_batch(self, x: torch.Tensor | None, y: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Streamed training data: rank 0 of the branch group (the replica's leader, which alone reads
        the data) passes its batch (x (B, ...) float, y (B,) int64), the other ranks None; every rank
        of the group returns the leader's batch, on this rank's device. Shapes and dtype go first
        (one small int64 broadcast), then x, then y: each byte of the batch is sent once per group,
        not read W times. A batch of 0 rows (a replica's empty share) sends only the shapes."""
        device, leader = _device(), self.rank == 0
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        head = torch.zeros(_HEAD, dtype=torch.int64, device=device)
        if leader:
            if x.dim() > _HEAD - 2:
                raise ValueError(f"broadcast_batch takes x of at most {_HEAD - 2} dimensions, not {x.dim()}")
            head[0], head[1] = _DTYPES.index(x.dtype), x.dim()
            head[2:2 + x.dim()] = torch.tensor(x.shape, dtype=torch.int64)
        _run(dist.broadcast, head, src=src, group=self.group)
        dtype, ndim = _DTYPES[int(head[0])], int(head[1])
        shape = tuple(int(v) for v in head[2:2 + ndim])
        if leader:
            x, y = x.to(device).contiguous(), y.to(device, torch.int64).contiguous()
        else:
            x = torch.empty(shape, dtype=dtype, device=device)
            y = torch.empty(shape[0], dtype=torch.int64, device=device)
        if shape[0] > 0:
            self.traffic.add("broadcast", x.nbytes + y.nbytes, self.world_size, root=leader)
            _run(dist.broadcast, x, src=src, group=self.group)
            _run(dist.broadcast, y, src=src, group=self.group)
        return x, y

    def sum_over_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of a small 1-D float tensor over the replica axis (the replicas' evaluation
        counts), in replica order: the same bits on every rank."""
        if self.replicas == 1:
            return t
        return _sum_over_ranks(t.to(_device()), self.replica_group, self.traffic).cpu()


_HEAD = 8  # broadcast_batch's header: dtype code, ndim, up to 6 sizes
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.uint8)


def _flat(tensors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """One 1-D buffer of `like`'s dtype and device holding every tensor, in order."""
    return torch.cat([t.reshape(-1).to(device=like.device, dtype=like.dtype) for t in tensors])


def _unflat(flat: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    """Set each parameter's gradient from its slice of `flat` (the inverse of _flat)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n


GATHER_SUM_MAX = 1 << 20  # elements gathered in all (size x ranks) below which gloo sums by gathering


def _sum_over_ranks(flat: torch.Tensor, group, traffic: Traffic | None = None) -> torch.Tensor:
    """The sum over the group's ranks of a 1-D tensor, the same bits on every rank. On gloo a small
    buffer is all-gathered and added in rank order: gloo's all_reduce of a few KB costs ~1.5-2.4 ms
    on two CPU ranks, an all_gather of 128 KB ~0.5 ms (docs/BENCHMARKS.md, "SPMD step"); NCCL, or a
    buffer too large to hold W times, takes the all_reduce."""
    world = dist.get_world_size(group)
    if world == 1:
        return flat
    if dist.get_backend(group) != "gloo" or flat.numel() * world > GATHER_SUM_MAX:
        if traffic is not None:
            traffic.add("all_reduce", flat.nbytes, world)
        _run(dist.all_reduce, flat, group=group)
        return flat
    if traffic is not None:
        traffic.add("all_gather", flat.nbytes, world)
    parts = [torch.empty_like(flat) for _ in range(world)]
    _run(dist.all_gather, parts, flat, group=group)
    return ordered_sum(parts)  # rank order: the same bits on every rank


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
