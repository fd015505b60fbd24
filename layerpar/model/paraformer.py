"""Para-Former: a sum of parallel branches that all read the same embedded input.

    x0     = embed(x)                              # (B, T, D)
    y      = sum_b pool(branch_b(x0))              # (B, D): pooled per branch, summed in branch order
    logits = head(y)                               # (B, classes)

A model may own only some of its branches (`branch_ids`): that is how a worker holds its share, with
the same parameter names as the whole model. Every piece is initialised from its own seeded generator,
so branch b has the same weights wherever it is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from layerpar.model.blocks import make_block
from layerpar.model.dropout import DropoutDraw
from layerpar.model.fused import Branch, FusedBranchStack
from layerpar.model.layers import Head, PatchEmbed, pool, seeded, torch_dtype

EMBED_TAG, HEAD_TAG, BRANCH_TAG = 1, 2, 3


def ordered_sum(outputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """(K, B, D) -> (B, D), added one branch at a time in branch order. Every place that sums branch
    outputs (one process, a worker group, the driver) uses this, so they agree bit for bit; a list
    of equal-shaped tensors is added in its order the same way (parallel/comm.py: a sum over ranks)."""
    total = outputs[0]
    for k in range(1, len(outputs)):
        total = total + outputs[k]
    return total


def prefix_sums(outputs: torch.Tensor) -> torch.Tensor:
    """(N, B, D) -> (N, B, D): row k is the sum of branches 0..k, added in branch order (row N-1 has
    the same bits as ordered_sum)."""
    sums = [outputs[0]]
    for k in range(1, outputs.shape[0]):
        sums.append(sums[-1] + outputs[k])
    return torch.stack(sums)


# Each piece is drawn in float32 and then cast to model.dtype: the same weights in either dtype.


def make_embed(cfg, seed: int) -> PatchEmbed:
    return PatchEmbed(image_size=cfg.image_size, patch_size=cfg.patch_size,
                      in_channels=cfg.in_channels, dim=cfg.dim,
                      generator=seeded(seed, EMBED_TAG)).to(torch_dtype(cfg))


def make_head(cfg, seed: int) -> Head:
    return Head(cfg.dim, cfg.num_classes, generator=seeded(seed, HEAD_TAG)).to(torch_dtype(cfg))


def make_branch(cfg, seed: int, branch_id: int) -> Branch:
    g = seeded(seed, BRANCH_TAG, branch_id)
    return Branch([make_block(cfg, g) for _ in range(cfg.branch_depth)]).to(torch_dtype(cfg))


class ParaFormer(nn.Module):
    def __init__(self, cfg, *, seed: int = 0, branch_ids: Iterable[int] | None = None):
        super().__init__()
        self.cfg = cfg
        ids = range(cfg.num_branches) if branch_ids is None else sorted(branch_ids)
        if any(not 0 <= b < cfg.num_branches for b in ids):
            raise ValueError(f"branch ids {list(ids)} out of range 0..{cfg.num_branches - 1}")
        self.embed = make_embed(cfg, seed)
        self.branches = nn.ModuleDict({str(b): make_branch(cfg, seed, b) for b in ids})
        self.head = make_head(cfg, seed)
        self._stacks: dict[tuple[int, ...], FusedBranchStack] = {}

    @property
    def branch_ids(self) -> list[int]:
        """The branches this model owns, in order."""
        return [int(b) for b in self.branches]

    def branch(self, branch_id: int) -> Branch:
        return self.branches[str(branch_id)]

    def branch_outputs(self, x0: torch.Tensor, branch_ids: Sequence[int], *,
                       fused: bool = True, draw: DropoutDraw | None = None) -> torch.Tensor:
        """Pooled output of each listed branch: x0 (B, T, D) -> (K, B, D); K may be 0. draw: where a
        training forward's dropout masks come from (model/dropout.py); None: torch's generator."""
        if not branch_ids:
            return x0.new_zeros((0, x0.shape[0], x0.shape[-1]))
        # CLS pooling reads one row: the last block of each branch computes only that row.
        cls_only = self.cfg.pool == "cls"
        if fused:
            key = tuple(branch_ids)
            stack = self._stacks.get(key)
            if stack is None:
                stack = self._stacks[key] = FusedBranchStack([self.branch(b) for b in key], key)
            return pool(stack(x0, cls_only=cls_only, draw=draw), self.cfg.pool)  # (K, B, D)
        return torch.stack([pool(self.branch(b)(x0, cls_only=cls_only, draw=draw, branch_id=b), self.cfg.pool)
                            for b in branch_ids])

    def branch_sum(self, x0: torch.Tensor, branch_ids: Sequence[int] | None = None, *,
                   fused: bool = True) -> torch.Tensor:
        """Sum of the pooled outputs of the listed branches (default: all owned), in branch order:
        (B, T, D) -> (B, D)."""
        ids = self.branch_ids if branch_ids is None else list(branch_ids)
        return ordered_sum(self.branch_outputs(x0, ids, fused=fused))

    def prefix_ids(self, num_branches: int | None) -> list[int]:
        """Owned branch ids below num_branches (all owned when None)."""
        k = self.cfg.num_branches if num_branches is None else num_branches
        if not 1 <= k <= self.cfg.num_branches:
            raise ValueError(f"num_branches ({k}) must be in 1..{self.cfg.num_branches}")
        return [b for b in self.branch_ids if b < k]

    def forward(self, x: torch.Tensor, num_branches: int | None = None, *,
                fused: bool = True) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, classes), using the prefix model of the first k branches."""
        x0 = self.embed(x)
        return self.head(self.branch_sum(x0, self.prefix_ids(num_branches), fused=fused))

    # ------------------------------------------------------------------ state by piece

    def piece_state(self, piece: str) -> dict[str, torch.Tensor]:
        """Weights of one piece: "embed", "head" or "branch.<id>"; keys as in state_dict()."""
        prefix = "branches." + piece.split(".", 1)[1] + "." if piece.startswith("branch.") \
            else piece + "."
        return {k: v for k, v in self.state_dict().items() if k.startswith(prefix)}

    def pieces(self) -> list[str]:
        return ["embed", "head"] + [f"branch.{b}" for b in self.branch_ids]
