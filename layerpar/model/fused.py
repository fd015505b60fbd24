"""Fused branch stack: K branches run as one batched computation.

The branches keep their own parameters (so each can be frozen, saved, dropped or stepped alone);
the stack gathers their weights into tensors with a leading branch axis and runs every layer as one
batched matmul. Under autograd the stacking is part of the graph, so gradients land on each branch's
own parameters; without autograd the stacked weights are cached until a parameter changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layerpar.model.blocks import block_forward


class Branch(nn.Module):
    """`depth` blocks applied in sequence: (B, T, D) -> (B, T, D)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return h


class FusedBranchStack:
    """Runs `branches` (same shapes) as one batched computation. Holds references, not copies."""

    def __init__(self, branches: Sequence[Branch]):
        if not branches:
            raise ValueError("a fused stack needs at least one branch")
        self.branches = list(branches)
        first = self.branches[0].blocks[0]
        self.heads, self.style, self.dropout = first.heads, first.style, first.dropout
        self._cache_key: tuple | None = None
        self._cache: list[dict[str, torch.Tensor]] | None = None

    def _params(self) -> list[torch.Tensor]:
        return [p for br in self.branches for p in br.parameters()]

    def stacked_weights(self) -> list[dict[str, torch.Tensor]]:
        """Per layer, each weight stacked over branches: {"qkv_w": (K, 3D, D), ...}."""
        if torch.is_grad_enabled():
            self._cache_key = self._cache = None
            return self._stack()
        key = tuple((id(p), p._version) for p in self._params())
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

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (B, T, D), read by every branch -> (K, B, T, D), one output per branch."""
        training = self.branches[0].training
        h = x0.unsqueeze(0).expand(len(self.branches), *x0.shape)  # (K, B, T, D)
        for weights in self.stacked_weights():
            h = block_forward(weights, h, heads=self.heads, style=self.style,
                              dropout=self.dropout, training=training)
        return h
