"""Fused branch stack: K branches run as one batched computation.

The branches keep their own parameters (so each can be frozen, saved, dropped or stepped alone);
the stack gathers their weights into tensors with a leading branch axis and runs every layer as one
batched matmul. Under autograd the stacking is part of the graph, so gradients land on each branch's
own parameters; without autograd the stacked weights are cached until a parameter changes.

On a CPU, once a branch's activations are large (B*T*D >= LOOP_MIN_ELEMENTS) one branch at a time
is faster than the batched matmuls (each branch's working set stays in cache; measured at width
192 and 197 tokens: 30 vs 35 ms for 8 branches at batch 1, 139 vs 218 ms at batch 8), so the stack
runs its branches in a loop there: the same math, the same outputs.

Depth-1 branches of a CLS-pooled model take neither route: every branch is one block reading the same
x0 and only its CLS row is needed, so `cls_blocks_shared_input` normalises x0 once and scores it with
all branches' heads in one product (no K copies of x0, no key/value projections), at any size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layerpar.model.blocks import block_forward, cls_blocks_shared_input
from layerpar.model.dropout import DropoutDraw

# On CPU, branches with at least this many activation elements (B*T*D) run one by one (see above).
LOOP_MIN_ELEMENTS = 32768


class Branch(nn.Module):
    """`depth` blocks applied in sequence: (B, T, D) -> (B, T, D)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h: torch.Tensor, *, cls_only: bool = False, draw: DropoutDraw | None = None,
                branch_id: int = 0) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); with cls_only the last block computes the CLS row only: (B, 1, D).
        draw: where the dropout masks of this branch (`branch_id`) come from; None: torch's generator."""
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            masks = None if draw is None else draw.sites([branch_id], i, stacked=False)
            h = block(h, cls_only=cls_only and i == last, masks=masks)
        return h


class FusedBranchStack:
    """Runs `branches` (same shapes) as one batched computation. Holds references, not copies."""

    def __init__(self, branches: Sequence[Branch], branch_ids: Sequence[int] | None = None):
        if not branches:
            raise ValueError("a fused stack needs at least one branch")
        self.branches = list(branches)
        # which branch each one is: names its dropout masks, so they do not depend on the stack
        self.branch_ids = list(range(len(self.branches)) if branch_ids is None else branch_ids)
        first = self.branches[0].blocks[0]
        self.heads, self.style, self.dropout = first.heads, first.style, first.dropout
        self._cache_key: tuple | None = None
        self._cache: list[dict[str, torch.Tensor]] | None = None
        self._blocks = [block for br in self.branches for block in br.blocks]

    def _params(self) -> list[torch.Tensor]:
        # each block's own parameter dict: ~8x cheaper than Module.parameters() (no recursion);
        # this runs on every no-grad call, and at 32 branches parameters() cost ~1-3 ms per call
        return [p for block in self._blocks for p in block._parameters.values() if p is not None]

    def stacked_weights(self) -> list[dict[str, torch.Tensor]]:
        """Per layer, each weight stacked over branches: {"qkv_w": (K, 3D, D), ...}."""
        if torch.is_grad_enabled():
            self._cache_key = self._cache = None
            return self._stack()
        # .to()/.float() swap a parameter's storage without touching its version: key on the storage too
        key = tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in self._params())
        if key != self._cache_key:
            self._cache, self._cache_key = self._stack(), key
        return self._cache

    def _stack(self) -> list[dict[str, torch.Tensor]]:
        depth = len(self.branches[0].blocks)
        layers = []
        for d in range(depth):
            per_branch = [br.blocks[d].weights() for br in self.branches]
            layers.append({name: torch.stack([w[name] for w in per_branch])
                           for name in per_branch[0]})
        return layers

    def __call__(self, x0: torch.Tensor, *, cls_only: bool = False,
                 draw: DropoutDraw | None = None) -> torch.Tensor:
        """x0 (B, T, D), read by every branch -> (K, B, T, D), one output per branch;
        (K, B, 1, D) with cls_only (the last block computes the CLS row alone). draw: where the
        dropout masks come from (each branch's own, whichever route runs it); None: torch's generator."""
        training = self.branches[0].training
        shared_input = cls_only and len(self.branches[0].blocks) == 1  # see the module docstring
        if len(self.branches) > 1 and shared_input:
            masks = None if draw is None else draw.sites(self.branch_ids, 0, stacked=True)
            return cls_blocks_shared_input(self.stacked_weights()[0], x0, heads=self.heads, style=self.style,
                                           dropout=self.dropout, training=training, masks=masks)
        # one branch has nothing to batch: stacking its weights would only add copies
        if len(self.branches) == 1 or (x0.device.type == "cpu" and x0.numel() >= LOOP_MIN_ELEMENTS):
            return torch.stack([br(x0, cls_only=cls_only, draw=draw, branch_id=b)
                                for b, br in zip(self.branch_ids, self.branches, strict=True)])
        h = x0.unsqueeze(0).expand(len(self.branches), *x0.shape)  # (K, B, T, D)
        layers = self.stacked_weights()
        for i, weights in enumerate(layers):
            masks = None if draw is None else draw.sites(self.branch_ids, i, stacked=True)
            h = block_forward(weights, h, heads=self.heads, style=self.style, dropout=self.dropout,
                              training=training, cls_only=cls_only and i == len(layers) - 1, masks=masks)
        return h
